"""Session 45 (a site-path review; repros in the review's scratch folder): the site runs its installed
ClientApp, never the run's FAB; a refused center audit head binds for the run; a reply's audit head
covers the entry that voids its DP guarantee; the center's base-model name is never read as a path; a
budget that cannot be checked sends a fixed reason; secure-aggregation keys of rounds below 1.
No SuperLink or SuperNode is started here (the shim's end-to-end check is the federation tests')."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm_dr import audit

FAB_ID, FAB_VERSION, FAB_HASH = "mllm-dr/mllm-dr", "0.1.0", "ab" * 32


# 1: the pinned ClientApp ----------------------------------------------------------------------------
def _installed_fab(home: Path, clientapp: str, marker: Path) -> Path:
    """A FAB as Flower installs it under FLWR_HOME: a pyproject naming ``clientapp`` and its own
    ``fl_client/app.py`` (and ``evil/app.py``), each writing ``marker`` when imported."""
    from flwr.common.config import get_project_dir

    project = get_project_dir(FAB_ID, FAB_VERSION, FAB_HASH)
    for package in ("fl_client", "evil"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text("")
        (project / package / "app.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                                  "from flwr.clientapp import ClientApp\napp = ClientApp()\n")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "mllm-dr"\nversion = "0.1.0"\n\n[tool.flwr.app]\npublisher = "mllm-dr"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "fl_server.app:app"\nclientapp = "{clientapp}"\n')
    return project


@pytest.fixture
def flwr_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    return tmp_path / "flwr-home"


def test_the_pinned_loader_returns_the_installed_clientapp_never_the_fabs(flwr_home, tmp_path):
    """Flower's own loader imports the FAB's fl_client.app (the FAB folder first on sys.path), so the FAB's
    egress guard, DP and SecAgg mods replaced the site's; the pinned loader returns the installed app object."""
    import fl_client.app
    from fl_client.pinned_clientapp import pinned_loader

    marker = tmp_path / "fab-code-ran"
    project = _installed_fab(flwr_home, "fl_client.app:app", marker)
    app = pinned_loader("", None, True)(FAB_ID, FAB_VERSION, FAB_HASH)
    assert app is fl_client.app.app
    assert not marker.exists() and str(project) not in sys.path
    assert Path(sys.modules["fl_client.app"].__file__).parent == Path(fl_client.app.__file__).parent


def test_a_fresh_clientapp_process_loads_the_installed_app_where_flowers_loader_took_the_fabs(flwr_home, tmp_path):
    """In a fresh process, as the SuperNode starts one per message: Flower's unpatched loader runs the FAB's
    module (the defect), the patched one returns the installed app and imports nothing of the FAB."""
    marker = tmp_path / "fab-code-ran"
    _installed_fab(flwr_home, "fl_client.app:app", marker)
    script = ("import sys\nfrom flwr.supernode.runtime import run_clientapp as rc\n"
              "if sys.argv[1] == 'pinned':\n    import fl_client.pinned_clientapp as p; p.patch_loader()\n"
              f"app = rc.get_load_client_app_fn('', None, True)({FAB_ID!r}, {FAB_VERSION!r}, {FAB_HASH!r})\n"
              "import fl_client.app\nprint(app is fl_client.app.app, fl_client.app.__file__)\n")

    def run(mode: str) -> str:
        out = subprocess.run([sys.executable, "-P", "-c", script, mode], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "FLWR_HOME": str(flwr_home)}, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    kit = Path(__file__).resolve().parents[1] / "fl_client"
    said = run("flower").split()                      # what ran at every site until now: the FAB's module
    assert marker.exists() and Path(said[1]).resolve().is_relative_to(flwr_home.resolve())
    marker.unlink()
    said = run("pinned").split()
    assert said[0] == "True" and Path(said[1]).resolve().parent == kit and not marker.exists()


def test_a_fab_naming_another_clientapp_or_none_is_refused(flwr_home, tmp_path):
    from fl_client.pinned_clientapp import ForeignClientApp, pinned_loader

    marker = tmp_path / "fab-code-ran"
    project = _installed_fab(flwr_home, "evil.app:app", marker)
    with pytest.raises(ForeignClientApp, match="names ClientApp 'evil.app:app'"):
        pinned_loader()(FAB_ID, FAB_VERSION, FAB_HASH)
    (project / "pyproject.toml").unlink()
    with pytest.raises(ForeignClientApp, match="names no ClientApp this site can check"):
        pinned_loader()(FAB_ID, FAB_VERSION, FAB_HASH)
    assert not marker.exists() and "evil" not in sys.modules


def test_a_flower_without_the_patched_loader_fails_loudly(monkeypatch):
    from flwr.supernode.runtime import run_clientapp as rc

    from fl_client.pinned_clientapp import patch_loader

    monkeypatch.delattr(rc, "get_load_client_app_fn")
    with pytest.raises(RuntimeError, match="review fl_client/pinned_clientapp.py"):
        patch_loader()


def test_the_supernode_starts_flwr_clientapp_through_the_kits_shim(enrolled_ws, monkeypatch):
    """Flower's superexec starts `flwr-clientapp` by name through PATH: in the SuperNode's environment that
    name is the kit's shim, which runs the pinned module with this interpreter."""
    import fl_client.supernode as sn

    seen = {}

    def spawn(cmd, log, pidfile, env, cwd):
        seen.update(cmd=cmd, env=env)
        raise RuntimeError("not started in this test")

    monkeypatch.setattr(sn, "spawn", spawn)
    with pytest.raises(RuntimeError, match="not started"):
        sn._start_once(enrolled_ws, None, None, 1, 1)
    found = shutil.which("flwr-clientapp", path=seen["env"]["PATH"])
    assert found == str(sn.shim_dir(enrolled_ws) / "flwr-clientapp")
    shim = Path(found).read_text()
    assert f"exec {sys.executable} -P -m fl_client.pinned_clientapp \"$@\"" in shim
    assert oct(Path(found).stat().st_mode & 0o777) == "0o700"
    assert shutil.which("flower-superexec", path=seen["env"]["PATH"])     # the rest is Flower's, found as before
    out = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=120, env=seen["env"])
    assert out.returncode == 0 and out.stdout.startswith("usage: flwr-clientapp"), out.stderr[-2000:]


# 2: a refused center head binds for the run ----------------------------------------------------------
@pytest.fixture
def joinable(enrolled_ws, monkeypatch):
    """The enrolled site passes the policy's participant floor without a corpus (these messages never train)."""
    import mllm_dr.federation_policy as fp

    monkeypatch.setattr(fp, "labelled_training_counts", lambda ws: (10, 80))
    return enrolled_ws


def _train_msg(key_path: Path, run: str, head: dict | None = None, base_model: str = "tiny-random"):
    """A signed training message of ``run`` (a stub global) carrying the center's audit ``head``."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fl_server.wire import packed_record
    from mllm_dr.audit_heads import wire_head
    from mllm_dr.config import ModelConfig
    from mllm_dr.protocol import TrainInstruction
    from mllm_dr.signing import load_private, sign_state
    from policies.schema import load_policy

    state = {"maa.v": torch.randn(4)}
    ctx = {"round": 0, "stage": 0, "base_model": base_model, "base_sha256": "ab" * 32, "run": run,
           "model": ModelConfig().to_dict(), "dims": {"audio": 25}}
    t = TrainInstruction(context=json.dumps(ctx), signature=sign_state(load_private(key_path), state, ctx),
                         policy=load_policy().model_dump_json(), round=1, stage=1, local_epochs=0, batch_size=2,
                         lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3, audit_head=wire_head(head) if head else {})
    return Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(t.to_record())}), dst_node_id=7,
                   message_type="train")


def _context(ws, **node_config):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root), **node_config}, state=RecordDict(),
                   run_config={})


def test_a_refused_center_audit_head_binds_for_the_whole_run(joinable, flower_task, tmp_path):
    """The center's log is cut back (its head goes backwards: refused), then it sends the uncut log's larger
    head again: that message of the same run was accepted, as if the cut had never been seen (repro head_fork)."""
    from fl_client.app import app
    from mllm_dr import audit_heads
    from mllm_dr.protocol import HEAD_REFUSED, REFUSED

    log = tmp_path / "center" / "audit" / "audit.jsonl"
    log.parent.mkdir(parents=True)
    for i in range(5):
        audit.append(log, "center_round", round=i)
    audit_heads.record_center_head(joinable, audit.head(log), run="cut", round=0)   # an earlier message's head
    whole = log.read_text()
    log.write_text("".join(whole.splitlines(keepends=True)[:3]))
    cut = app(_train_msg(tmp_path / "center.key", "cut", audit.head(log)), _context(joinable))
    assert cut.has_error() and cut.error.code == HEAD_REFUSED and "goes backwards" in cut.error.reason
    log.write_text(whole)
    audit.append(log, "center_round", round=5)
    audit.append(log, "center_round", round=6)
    later = app(_train_msg(tmp_path / "center.key", "cut", audit.head(log)), _context(joinable))
    assert later.has_error() and later.error.code == REFUSED and "binds for the whole run" in later.error.reason
    refusal = [e for e in audit.read(joinable.audit_path) if e["event"] == "federation_refused"]
    assert {e["run"] for e in refusal} == {"cut"} and "audit head was refused" in refusal[0]["reasons"][0]


def test_a_head_older_than_another_runs_refuses_its_message_only(joinable, flower_task, tmp_path):
    """Two runs at one center interleave: run A's message carries a head of fewer entries than run B's message the
    site handled first. That is no cut of A's log: refused for that message (as before session 45), never binding
    (a second read, session 45: the site quit run A for good)."""
    from fl_client.app import app
    from mllm_dr import audit_heads
    from mllm_dr.protocol import HEAD_REFUSED

    log = tmp_path / "center" / "audit" / "audit.jsonl"
    log.parent.mkdir(parents=True)
    for i in range(3):
        audit.append(log, "center_round", round=i)
    audit_heads.record_center_head(joinable, audit.head(log), run="A", round=0)     # A's earlier head: 3 entries
    older = audit.head(log)
    for i in range(3, 6):
        audit.append(log, "center_round", round=i)
    audit_heads.record_center_head(joinable, audit.head(log), run="B", round=0)     # B's head: 6 entries
    reply = app(_train_msg(tmp_path / "center.key", "A", older), _context(joinable))   # A's message signed earlier
    assert reply.has_error() and reply.error.code == HEAD_REFUSED and "goes backwards" in reply.error.reason
    assert "binds" not in reply.error.reason
    assert not [e for e in audit.read(joinable.audit_path) if e["event"] == "federation_refused"]


# 3: the reply's head covers the entries the egress guard writes --------------------------------------
def _stub_train(ws, mods, handler_calls: list):
    """A training message of a run without DP through ``mods`` to a stub trainer."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.client.mod.utils import make_ffn

    from mllm_dr.protocol import TrainInstruction, TrainReply

    t = TrainInstruction(context=json.dumps({"run": "r2", "round": 0, "dims": {"audio": 4}}), signature="x", round=1,
                         stage=1, local_epochs=1, batch_size=4, lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3)
    msg = Message(RecordDict({"config": ConfigRecord(t.to_record()),
                              "arrays": ArrayRecord.from_torch_state_dict({"lq.w": torch.zeros(3)})}),
                  dst_node_id=7, message_type="train")

    def handler(m, c):
        handler_calls.append(m)
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict({"lq.w": torch.ones(3)}),
                                   "metrics": MetricRecord(TrainReply(num_examples=5, lora_scaling=1.0).to_record()),
                                   "config": ConfigRecord({"site-id": "site1"})}), reply_to=m)

    return make_ffn(handler, mods)(msg, _context(ws))


def _train_mods():
    from fl_client.app import TRAIN_MODS
    from fl_client.wire_mod import wire_mod

    return [m for m in TRAIN_MODS if m is not wire_mod]      # the tensors here are not packed


def test_a_replys_audit_head_covers_the_entry_that_voids_its_dp_guarantee(enrolled_ws, flower_task):
    """A released round without DP at a site with DP charges: the egress guard writes dp_unprotected_round as it
    releases the reply, after head_mod had signed the head the reply carries (repro head_after_settle)."""
    from mllm_dr.privacy import PrivacyLedger

    PrivacyLedger.of(enrolled_ws.root, "site").record("earlier-run", 1, 1.0, 1.0, 1e-5)
    reply = _stub_train(enrolled_ws, _train_mods(), [])
    assert not reply.has_error(), reply.error.reason
    entries = audit.read(enrolled_ws.audit_path)
    assert entries[-1]["event"] == "dp_unprotected_round"
    config = reply.content["config"]
    assert config["audit-head-entries"] == len(entries)
    assert audit.verify(enrolled_ws.audit_path, None, {"entries": len(entries),
                                                      "last_hash": config["audit-head-last-hash"]})[0]


def test_a_policy_that_blocks_the_audit_head_refuses_before_anything_trains(enrolled_ws, flower_task):
    """head_mod now sits outside the egress guard, so it applies the guard's allow-list to the head's keys: a
    policy without 'audit-head-*' blocks before the handler runs (it used to train, then block the reply)."""
    from mllm_dr.protocol import BLOCKED
    from policies.schema import load_policy

    policy = load_policy().model_dump()
    policy["egress"]["metric_names"] = [k for k in policy["egress"]["metric_names"] if k != "audit-head-*"]
    (enrolled_ws.root / "policy.json").write_text(json.dumps(policy))
    calls = []
    reply = _stub_train(enrolled_ws, _train_mods(), calls)
    assert reply.has_error() and reply.error.code == BLOCKED and not calls
    blocked = [e for e in audit.read(enrolled_ws.audit_path) if e["event"] == "egress_blocked"]
    assert len(blocked) == 1 and "audit-head-entries" in blocked[0]["problems"][0]


# 4: the center's base-model name is never a path at the site -----------------------------------------
def test_the_centers_base_model_name_is_never_read_as_a_path_at_the_site(joinable, flower_task, tmp_path,
                                                                         monkeypatch):
    """With no base model in the site's node config, the handshake's unsigned base-model string was hashed and
    loaded as a folder of the site's disk. Only the kit's named bases come from the center; a folder is the
    site's own (node config). Refused before anything reads the name; for that message only (the handshake is
    unsigned, and a site restarted with --base-model must be able to join the same run)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    import mllm_dr.base_model as bm
    from fl_client.app import app
    from mllm_dr.protocol import REFUSED

    folder = tmp_path / "other_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    read = []

    def base_info(spec):
        read.append(spec)
        raise bm.InputError("stop here")

    monkeypatch.setattr(bm, "base_info", base_info)
    query = Message(RecordDict({"config": ConfigRecord({"run": "pathy", "base-model": str(folder),
                                                        "base-sha256": "ab" * 32})}), dst_node_id=7,
                    message_type="query")
    reply = app(query, _context(joinable))
    assert reply.has_error() and reply.error.code == REFUSED and "none of the kit's named bases" in reply.error.reason
    assert not read
    signed = app(_train_msg(tmp_path / "center.key", "pathy2", base_model=str(folder)), _context(joinable))
    assert signed.has_error() and signed.error.code == REFUSED and "named bases" in signed.error.reason
    events = audit.read(joinable.audit_path)     # for the message only: the cure is the site's own --base-model
    assert not [e for e in events if e["event"] == "federation_refused"]        # (a second read, session 45)
    assert {e["run"] for e in events if e["event"] == "federation_base_refused"} == {"pathy", "pathy2"}
    app(query, _context(joinable, **{"base-model": str(folder)}))       # the site's own folder: read, as before
    assert read == [str(folder)]


# 5: a budget that cannot be checked ------------------------------------------------------------------
def test_a_budget_that_cannot_be_checked_sends_the_center_a_fixed_reason(tmp_path):
    """At the key exchange a site under patient-level DP reads its corpus; the InputError's message (a participant
    id and their folders) went to the center as the BUDGET_SPENT reason (repro budget_leak)."""
    import policies
    from fl_client.privacy_mod import budget_refusal
    from mllm_dr.workspace import Workspace

    corpus = tmp_path / "corpus"
    (corpus / "backup" / "303_P").mkdir(parents=True)
    (corpus / "303_P").mkdir()
    (corpus / "train_split.csv").write_text("Participant_ID,PHQ_Binary,PHQ_Score\n303,1,17\n")
    ws = Workspace.init(tmp_path / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(corpus), "edaic"
    ws.save()
    policy = json.loads(policies.default_policy_path().read_text())
    policy["dp"] = {"enabled": True, "unit": "patient", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5,
                    "epsilon_budget": 10.0, "sample_rate": 0.25}
    (ws.root / "policy.json").write_text(json.dumps(policy))
    reason = budget_refusal(ws, "")
    assert reason and "303" not in reason and "audit log" in reason
    kept = [e for e in audit.read(ws.audit_path) if e["event"] == "privacy_budget_unchecked"]
    assert len(kept) == 1 and "303" in kept[0]["error"]


# 6: secure-aggregation keys of rounds below 1 --------------------------------------------------------
def test_key_exchanges_start_at_round_1_and_a_runs_end_drops_every_key_file_of_it(tmp_path):
    """A key exchange for round -1 made 'r-round-001.x25519', which drop (matching 'round\\d{4,}') never deleted."""
    from pydantic import ValidationError

    from mllm_dr.protocol import SecAggKeysQuery
    from mllm_dr.secagg import KeyStore, SecAggError

    with pytest.raises(ValidationError, match="secagg-round"):
        SecAggKeysQuery.from_record({"run": "r", "secagg-round": -1, "base-sha256": "ab"})
    store = KeyStore(tmp_path / "secagg")
    with pytest.raises(SecAggError, match="rounds count from 1"):
        store.new("r", 0)
    store.new("r", 2)
    other = store.new("r-round1", 2)
    for stale in ("r-round-001.x25519", "r-round0000.x25519"):      # as an earlier kit wrote them
        (store.folder / stale).write_bytes(bytes(32))
    store.drop("r")
    assert sorted(p.name for p in store.folder.iterdir()) == ["r-round1-round0002.x25519"]
    assert store.take("r-round1", 2) and other


def test_the_final_evaluation_scores_the_runs_model_not_the_nodes_own_rank(joinable, flower_task, tmp_path,
                                                                           monkeypatch):
    """A node training at its own LoRA rank evaluated the final global truncated to that rank, a model nobody
    deploys (scoring loads the full-rank global): the evaluation's session is built at the run's rank (an
    aggregation review, session 45)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    import mllm_dr.federated as federated
    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr.config import ModelConfig
    from mllm_dr.protocol import EvaluateInstruction
    from mllm_dr.signing import load_private, sign_state
    from policies.schema import load_policy

    ranks = []

    class Stop(Exception):
        pass

    class Session:
        def __init__(self, ws, spec, base, rank):
            ranks.append(rank)
            raise Stop

    monkeypatch.setattr(federated, "SiteSession", Session)
    import mllm_dr.federation_policy as fp
    monkeypatch.setattr(fp, "check_run", lambda *a, **k: None)      # this workspace has no corpus: the policy's part
    monkeypatch.setattr(federated, "final_site_files", lambda ws, spec: {})     # and the files kept beside the global
    state = {"maa.v": torch.randn(4)}
    ctx = {"round": 3, "stage": 2, "base_model": "tiny-random", "base_sha256": "ab" * 32, "run": "ranks",
           "model": ModelConfig().to_dict(), "dims": {"audio": 25}}
    e = EvaluateInstruction.model_validate({"context": json.dumps(ctx), "policy": load_policy().model_dump_json(),
                                            "signature": sign_state(load_private(tmp_path / "center.key"), state, ctx),
                                            "max-new-tokens": 8})
    msg = Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(e.to_record())}), dst_node_id=7,
                  message_type="evaluate")
    app(msg, _context(joinable, **{"lora-rank": 4}))
    assert ranks == [None], [e.get('error') for e in audit.read(joinable.audit_path)]   # not 4
