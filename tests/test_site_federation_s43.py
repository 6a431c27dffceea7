"""Session 43 (a site-path review): frame moments of a modality few participants have, malformed center
messages, refusals that must bind for the run, and key files of runs whose names overlap."""

from __future__ import annotations

import json

import pytest
import torch

from policies.schema import load_policy
from test_policy_privacy import _handshake, _refused
from test_secagg_site import _context

AUDIT_FIELDS = {"seq", "time", "event", "actor", "prev", "key", "sig"}    # what every audit entry carries


@pytest.fixture(scope="module")
def synth_site(tmp_path_factory):
    """This module's corpus (``site_ws`` extracts its first site): 6 labelled training participants (4 train,
    2 dev), only the first of them with video; the 2 test participants keep theirs."""
    from mllm_dr.corpus import read_corpus
    from mllm_dr.corpus.labels import effective_split
    from mllm_dr.dataset import TRAINING_SPLITS
    from mllm_dr.synth import SynthConfig, write_synthetic

    sites = write_synthetic(SynthConfig(tmp_path_factory.mktemp("one-video"), "edaic", participants=8, sites=1,
                                        seed=1, seconds=3.0))
    training = [p for p in read_corpus(sites[0]).participants if effective_split(p.id, p.split) in TRAINING_SPLITS]
    assert len(training) == 6
    for p in training[1:]:
        for path in (f for segment in p.media.openface for f in segment):
            path.unlink()
    return sites


def _write_policy(ws, **fields) -> None:
    (ws.root / "policy.json").write_text(json.dumps(load_policy().model_dump() | fields))


def _train(ws, key_path, run: str, state: dict | None = None, policy: str | None = None):
    """A signed training message of ``run`` (a stub global, 0 epochs) through the real ClientApp."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr.config import ModelConfig
    from mllm_dr.protocol import TrainInstruction
    from mllm_dr.signing import load_private, sign_state

    state = {"maa.v": torch.randn(4)} if state is None else state
    ctx = {"round": 0, "stage": 0, "base_model": "tiny-random", "base_sha256": "ab" * 32, "run": run,
           "model": ModelConfig().to_dict(), "dims": {"audio": 25}}
    t = TrainInstruction(context=json.dumps(ctx), signature=sign_state(load_private(key_path), state, ctx),
                         policy=load_policy().model_dump_json() if policy is None else policy, round=1, stage=1,
                         local_epochs=0, batch_size=2, lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3)
    msg = Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(t.to_record())}), dst_node_id=7,
                  message_type="train")
    return app(msg, _context(ws))


def _events(ws, event: str) -> list[dict]:
    from mllm_dr import audit

    return [e for e in audit.read(ws.audit_path) if e["event"] == event]


class _SiteGrid:
    """The center's grid, delivering each message to this site's real ClientApp in process."""

    def __init__(self, ws):
        self.ws = ws

    def send_and_receive(self, msgs, timeout):
        from fl_client.app import app

        return [app(m, _context(self.ws)) for m in msgs]


def test_a_modality_fewer_participants_than_the_release_floor_have_sends_no_frame_moments(site_ws, flower_task):
    """Defect 1: the moments of each modality are over the participants who have it, but the release floor
    was compared with all training participants: with one of 6 holding video, fm-visual-* were that
    patient's own frame count, per-dimension sums and sums of squares (sum / n = their mean). Below the floor
    a modality is now sent as a site without it sends (nothing), audited without ids; the center's
    handshake takes the site in and its norms leave that modality out, and a session runs under them."""
    from fl_server.app import handshake
    from fl_server.plan import RunPlan
    from mllm_dr.base_model import base_info
    from mllm_dr.dataset import examples, labelled_training_instances
    from mllm_dr.federated import RunSpec, SiteSession

    exs = examples(site_ws, labelled_training_instances(site_ws), 2)
    video = {ex.instance.participant: ex.features["visual"] for ex in exs if ex.features["visual"] is not None}
    assert len(video) == 1 and len({ex.instance.participant for ex in exs}) == 6
    (frames,) = video.values()
    sent = _handshake(site_ws, load_policy(), run="floor1", moments=True).content["metrics"]   # floor 1: all sent
    assert sent["fm-visual-n"] == frames.shape[0]
    assert sent["fm-visual-sum-0"] / sent["fm-visual-n"] == pytest.approx(float(frames[:, 0].double().mean()))

    _write_policy(site_ws, min_release_participants=3)
    reply = _handshake(site_ws, load_policy(), run="floor3", moments=True)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert "fm-audio-n" in metrics and not any(k.startswith("fm-visual") for k in metrics)
    (withheld,) = _events(site_ws, "feature_moments_withheld")
    assert {k: v for k, v in withheld.items() if k not in AUDIT_FIELDS} == {
        "run": "floor3", "modality": "visual", "participants": 1, "min_release_participants": 3}
    assert _events(site_ws, "federation_join")[-1]["feature_moments_sent"]

    plan = RunPlan.model_validate({"center-dir": "/c", "run-name": "center", "base-model": "tiny-random",
                                   "min-sites": 1, "feature-norms": "federated"})
    sha = base_info("tiny-random").sha256
    joined = handshake(_SiteGrid(site_ws), [7], plan, sha)
    assert joined.sites == {7: "site1"} and joined.dims["visual"] and sorted(joined.feature_norms) == ["audio"]
    spec = RunSpec("center", "tiny-random", sha, joined.dims, feature_norms=joined.feature_norms)
    session = SiteSession(site_ws, spec)
    assert session.validate().stats.n == 2        # the test participants' video goes in unscaled


def test_center_tensors_the_site_cannot_use_are_refused_and_audited(site_ws, flower_task, tmp_path):
    """Defect 2a: bf16 tensors unpack, but Flower's ArrayRecord cannot hold them: the TypeError escaped the
    app (outside the egress guard), the center read Flower's text and the site's log had nothing."""
    from mllm_dr.protocol import REFUSED

    reply = _train(site_ws, tmp_path / "center.key", "bf16", {"maa.v": torch.randn(4, dtype=torch.bfloat16)})
    assert reply.has_error() and reply.error.code == REFUSED and "\n" not in reply.error.reason
    assert "train message from the center" in reply.error.reason and "BFloat16" in reply.error.reason
    (entry,) = _events(site_ws, "center_message_refused")
    assert entry["message_type"] == "train" and entry["reason"] == reply.error.reason
    assert not (site_ws.checkpoints_dir / "federated").exists()


def test_a_train_message_whose_run_policy_the_site_cannot_read_is_refused_for_the_whole_run(site_ws, flower_task,
                                                                                            tmp_path):
    """Defect 2b: a run policy with a key this kit does not know failed in the secure-aggregation mod, before
    ``check_run``: the center read `site error (ValidationError)` and the site recorded no refusal. Now it
    is refused as unreadable, and that refusal binds for the run like any other."""
    newer = json.dumps(load_policy().model_dump() | {"retain_raw_audio": False})     # a newer center's key
    reply = _train(site_ws, tmp_path / "center.key", "newer", policy=newer)
    assert _refused(reply, "cannot read the run's policy (retain_raw_audio")
    (refusal,) = _events(site_ws, "federation_refused")
    assert refusal["run"] == "newer" and "cannot read the run's policy" in refusal["reasons"][0]
    assert not _events(site_ws, "handler_error")
    assert _refused(_handshake(site_ws, load_policy(), run="newer"), "binds for the whole run")


def test_an_unsigned_message_with_an_unreadable_policy_binds_nothing(site_ws, flower_task, tmp_path):
    """The secure-aggregation mod read the unreadable policy before the handler verified the signature, and its
    refusal bound the run: an unsigned message (here signed by another key) could make a site quit any run name.
    The handler verifies first; only a message the center signed binds (a second read, session 45)."""
    from mllm_dr.signing import new_signing_key

    stranger = tmp_path / "stranger.key"
    new_signing_key(stranger)
    newer = json.dumps(load_policy().model_dump() | {"retain_raw_audio": False})
    reply = _train(site_ws, stranger, "victim", policy=newer)
    assert reply.has_error() and not _events(site_ws, "federation_refused")
    assert not _refused(_handshake(site_ws, load_policy(), run="victim"), "binds for the whole run")


def test_a_site_without_the_runs_recipe_is_told_to_join_the_next_run(site_ws, flower_task):
    """Defect 3a: the refusal said to extract 'and join again', but a refusal binds for the whole run."""
    reason = _handshake(site_ws, load_policy(), run="rec", recipe="egemaps-openface").error.reason
    assert "join the center's next run" in reason and "join again" not in reason


def test_a_site_whose_policy_does_not_allow_frame_moments_refuses_the_federated_run_for_good(site_ws, flower_task,
                                                                                             tmp_path):
    """Defect 3b: with fm-* not allow-listed, check_run pinned the run and its egress guard then blocked the
    handshake reply, recording no refusal: the run's training messages were accepted although the site had
    not joined. Now check_run refuses the run (audited, binding), naming what its policy lacks."""
    metrics = [n for n in load_policy().egress.metric_names if n != "fm-*"]
    _write_policy(site_ws, egress=load_policy().egress.model_dump() | {"metric_names": metrics})
    assert _refused(_handshake(site_ws, load_policy(), run="nofm", moments=True), "fm-audio-n")
    assert not _events(site_ws, "egress_blocked")
    assert _refused(_train(site_ws, tmp_path / "center.key", "nofm"), "binds for the whole run")
    assert not (site_ws.checkpoints_dir / "federated").exists()
    assert not _handshake(site_ws, load_policy(), run="site-norms").has_error()   # nothing of the features sent


def test_a_key_exchange_keeps_the_keys_of_a_run_whose_name_extends_this_ones(tmp_path):
    """Defect 4: a new key of run 'r' deleted the files 'r-round*.x25519', among them the unused key of run
    'r-round1' (round 2: 'r-round1-round0002.x25519'), so that run's masked reply failed."""
    from mllm_dr.secagg import KeyStore, SecAggError, public_hex

    store = KeyStore(tmp_path / "secagg")
    other = store.new("r-round1", 2)
    store.new("r", 1)
    store.new("r", 2)                                   # an earlier unused key of the same run still goes
    assert public_hex(store.take("r-round1", 2)) == other
    with pytest.raises(SecAggError, match="used already"):
        store.take("r", 1)
