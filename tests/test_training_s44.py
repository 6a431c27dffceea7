"""Session 44's training review: a resumed local run ends where the uninterrupted one does (optimizer state
and LoRA A), a stage with nothing to train is no error (a text-only federated run's stage 1), and
``--moving-weight`` trains the MAA head in every epoch."""

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mllm_dr.adapters import build_site_model, get_adapter_state
from mllm_dr.config import LQFormerConfig, ModelConfig, TrainConfig
from mllm_dr.local_run import run_dir, train_local
from mllm_dr.training import train_stage
from mllm_dr.workspace import Workspace
from test_model import SMALL, _stream_examples

LOCAL_MODEL = ModelConfig(lq=LQFormerConfig(n_queries=4, n_layers=1))
LOCAL_TRAIN = TrainConfig(stage1_epochs=1, stage2_epochs=2, batch_size=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine a local run took 48 s with two, 7 s with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def extracted_ws(tmp_path_factory):
    """A small site (3 labelled participants) with features extracted once; each run trains in its own
    copy (``_copy``)."""
    from mllm_dr.corpus import read_corpus
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.synth import SynthConfig, write_synthetic

    root = tmp_path_factory.mktemp("s44")
    site = write_synthetic(SynthConfig(root / "synth", "edaic", participants=4, sites=1, seed=1, seconds=1.0))[0]
    ws = Workspace.init(root / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(site), "edaic"
    ws.save()
    extract_corpus(read_corpus(site), FeatureStore(ws.features_dir), ws.config.extraction)
    return ws.root


def _copy(src, dst) -> Workspace:
    shutil.copytree(src, dst)
    return Workspace(dst)


def _final(ws: Workspace) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir(ws) / "latest" / "adapters.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(extracted_ws, tmp_path_factory):
    ws = _copy(extracted_ws, tmp_path_factory.mktemp("straight") / "ws")
    train_local(ws, "tiny-random", LOCAL_MODEL, LOCAL_TRAIN)
    return _final(ws)


def _stop_when(prefix: str):
    """A progress callback that interrupts the run (as Ctrl-C does) when a task named ``prefix...`` starts."""
    def progress(description: str, _advance: int, _total: int) -> None:
        if description.startswith(prefix):
            raise KeyboardInterrupt
    return progress


@pytest.mark.parametrize("stop_at, restored", [("stage 2 epoch 2", True),    # mid stage 2: optimizer restored
                                               ("stage 2 epoch 1", None)])   # the stage boundary: LoRA A drawn
def test_local_resume_equals_an_uninterrupted_run(extracted_ws, uninterrupted, tmp_path, stop_at, restored):
    """`train --local --resume` after an interruption ends with the adapters of the same run uninterrupted,
    bit for bit: within stage 2 it restores AdamW's moments (a fresh optimizer gave max |diff| 8e-4); at the
    stage boundary LoRA A is drawn from the run's seed (the global RNG's draw differed by 0.25)."""
    ws = _copy(extracted_ws, tmp_path / "ws")
    with pytest.raises(KeyboardInterrupt):
        train_local(ws, "tiny-random", LOCAL_MODEL, LOCAL_TRAIN, progress=_stop_when(stop_at))
    result = train_local(ws, "tiny-random", LOCAL_MODEL, LOCAL_TRAIN, resume=True)
    resumed = _final(ws)
    assert sorted(resumed) == sorted(uninterrupted)
    assert [n for n in uninterrupted if not torch.equal(uninterrupted[n], resumed[n])] == []
    assert result["optimizer_restored"] is restored
    assert not list(run_dir(ws).glob("optimizer-stage*.pt"))       # a finished stage leaves no optimizer state


def test_a_resume_without_the_optimizer_state_says_so(extracted_ws, tmp_path):
    """A damaged optimizer state is refused, named; without one (a checkpoint of an older kit) the run
    resumes with a fresh optimizer, as before session 44, and its result says so."""
    from mllm_dr.errors import InputError

    ws = _copy(extracted_ws, tmp_path / "ws")
    with pytest.raises(KeyboardInterrupt):
        train_local(ws, "tiny-random", LOCAL_MODEL, LOCAL_TRAIN, progress=_stop_when("stage 2 epoch 2"))
    kept = run_dir(ws) / "optimizer-stage2.pt"
    kept.write_bytes(kept.read_bytes()[:100])
    with pytest.raises(InputError, match="damaged"):
        train_local(ws, "tiny-random", LOCAL_MODEL, LOCAL_TRAIN, resume=True)
    kept.unlink()
    result = train_local(ws, "tiny-random", LOCAL_MODEL, LOCAL_TRAIN, resume=True)
    assert result["optimizer_restored"] is False and [h["epoch"] for h in result["history"]] == [2]


def test_a_stage_with_nothing_to_train_returns_an_empty_update(extracted_ws, tiny, tmp_path):
    """A federated run without audio/visual features (dims {}): a stage-1 round has no LQ-former to train;
    the site returns an empty update and no losses, as the local run skips the stage, where
    ``loss.backward`` raised "element 0 of tensors does not require grad"."""
    from mllm_dr.federated import RunSpec, SiteSession

    session = SiteSession(_copy(extracted_ws, tmp_path / "ws"), RunSpec("text-only", "tiny-random", tiny[2].sha256,
                                                                        {}, SMALL))
    update, n, stats = session.train_round(1, 1, TrainConfig(batch_size=2))
    assert update == {} and stats == {} and n > 0
    update, _, stats = session.train_round(2, 1, TrainConfig(batch_size=2, local_steps=1))   # stage 2 trains
    assert sorted({n.split(".")[0] for n in update}) == ["lora", "maa"] and stats["steps"] == 1


def test_moving_weight_trains_the_head_in_a_single_epoch(tiny):
    """``--moving-weight`` with one stage-2 epoch changes the MAA head: alpha stays below 1 in every epoch
    (it was (epoch + 1) / epochs: L_mse's weight 0 in the last epoch, the head never trained in a one-epoch
    stage), and above 0, so L_lm trains in every epoch too."""
    base, tok, info = tiny
    sm = build_site_model(copy.deepcopy(base), tok, info, {"audio": 25, "visual": 49}, SMALL, seed=0)
    sm.model.enable_lora()
    before = {n: t.clone() for n, t in get_adapter_state(sm.model).items()}    # on CPU, views of the weights
    train_stage(sm, _stream_examples(), 2, 1, TrainConfig(batch_size=1, moving_weight=True))
    after = get_adapter_state(sm.model)
    assert [n for n in before if n.startswith("maa.") and not torch.equal(before[n], after[n])]
    from mllm_dr.training import moving_alpha

    assert all(0 < moving_alpha(e, n) < 1 for n in (1, 2, 5) for e in range(n))


@pytest.mark.parametrize("unit", ["patient", "site"])
def test_a_stage_with_nothing_to_train_charges_no_dp_budget(site_ws, flower_task, tmp_path, unit):
    """A second read of this session's change: the empty stage-1 round of a run without audio/visual features
    was still charged before training; under patient-level DP the steps guard then failed every DP site (no
    steps taken, 16 charged), and under site-level DP a round of epsilon went for an empty update. Through the
    real ClientApp: the round answers, and no ledger holds a charge."""
    import json as _json

    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record, unpacked
    from mllm_dr.base_model import base_info
    from mllm_dr.config import ModelConfig
    from mllm_dr.federated import RunSpec, initial_state
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.protocol import TrainInstruction
    from mllm_dr.signing import load_private, sign_state
    from policies.schema import load_policy

    pol = load_policy().model_dump() | {"min_participants": 2}
    pol["dp"].update(enabled=True, unit=unit, noise_multiplier=1.0, clip_norm=1.0, epsilon_budget=1000.0,
                     sample_rate=0.5)
    (site_ws.root / "policy.json").write_text(_json.dumps(pol))
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    spec = RunSpec("textonly", "tiny-random", base_info("tiny-random").sha256, {},      # no LQ-former
                   ModelConfig(feature_norm="participant" if unit == "patient" else "dataset"))
    state, ctx = initial_state(spec), spec.context(0, 0)
    t = TrainInstruction(context=_json.dumps(ctx), signature=sign_state(load_private(tmp_path / "center.key"),
                                                                       state, ctx),
                         policy=_json.dumps(pol), round=1, stage=1, local_epochs=1, batch_size=4,
                         lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3)
    reply = app(Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(t.to_record())}),
                        dst_node_id=7, message_type="train"), context)
    assert not reply.has_error(), reply.error
    assert unpacked(reply.content["arrays"], "reply") == {}
    assert all(PrivacyLedger.of(site_ws.root, u).own() == [] for u in ("site", "patient"))


def test_a_restored_optimizer_keeps_its_moments_and_takes_this_runs_learning_rates(tmp_path):
    """A second read of this session's change: Optimizer.load_state_dict also brought back the interrupted
    run's learning rates (and the new initial_lr the schedule scales), so a resume with other rates trained at
    the old ones and reported optimizer_restored True. The moments are restored; the rates stay this run's."""
    from mllm_dr.local_run import restore_optimizer, save_optimizer

    w = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.AdamW([{"params": [w], "lr": 2e-4, "initial_lr": 2e-4}])
    w.grad = torch.full((3,), 0.5)
    old.step()
    save_optimizer(old, tmp_path / "opt.pt", 2, 1)
    new = torch.optim.AdamW([{"params": [w], "lr": 5e-5, "initial_lr": 5e-5}])
    assert restore_optimizer(new, tmp_path / "opt.pt", 2, 1)
    assert (new.param_groups[0]["lr"], new.param_groups[0]["initial_lr"]) == (5e-5, 5e-5)
    assert torch.equal(new.state[w]["exp_avg"], old.state[w]["exp_avg"]) and int(new.state[w]["step"]) == 1
    assert not restore_optimizer(new, tmp_path / "opt.pt", 2, 2)       # kept for another point: not restored
