"""An operator review of session 44 (hospital IT and the coordinating center at the command line).

`simulate`: --set for a DP policy's plan, checked before any temporary folder; a reused --dir refuses other
options, and a folder that is not a rehearsal's; an interrupted preparation is known and redone whole; the
rounds shown as they end. `init` refuses a folder that holds something else, and `data synth` never deletes
a workspace made inside a synthetic site. Center commands pointed at a workspace say so. `status` (site):
tampered audit entries are not read, a stale federated adapter is said, the signer is kept; (center): an
approved node is named before any run. The ledger's delta; who refused a run that could not start;
demo.sh's knobs. Each test failed on the kit before its fix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from mllm_dr import audit
from mllm_dr.errors import InputError

DP_POLICY = ROOT / "policies" / "demo-dp.json"


def _dp_plan(**extra) -> dict:
    from policies.schema import load_policy

    return {"run-name": "rehearsal-x", "base-model": "tiny-random", "policy": load_policy(DP_POLICY).model_dump_json(),
            **extra}


# ----------------------------------------------------------------------------- 1. --set; the plan first
def test_simulate_takes_set_for_a_dp_plan_and_checks_the_plan_before_any_temporary_folder(tmp_path):
    # the command: a refused plan leaves no temporary folder; with --set the plan passes (here the --dir is refused)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = run_cli("mllmdr-center", "simulate", "--sites", "3", "--policy", DP_POLICY, check=False,
                   env={"TMPDIR": str(tmp)})
    assert proc.returncode == 2 and "invalid run plan" in proc.stderr and list(tmp.iterdir()) == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    proc = run_cli("mllmdr-center", "simulate", "--sites", "3", "--policy", DP_POLICY, "--set", "feature-norms=site",
                   "--dir", tmp_path / "other", check=False, env={"TMPDIR": str(tmp)})
    assert proc.returncode == 2 and "not a rehearsal folder" in proc.stderr, proc.stderr
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"] and list(tmp.iterdir()) == []
    # the functions
    from cli.center_simulate import set_keys
    from fl_server.simulation import check_plan

    run_plan, _ = check_plan(tmp_path, 3, _dp_plan(**set_keys(["feature-norms=site"])))
    assert run_plan.feature_norms == "site" and run_plan.dp.enabled
    with pytest.raises(InputError, match="invalid run plan: .*--set feature-norms=site"):
        check_plan(tmp_path, 3, _dp_plan())
    for item, said in (("seed=3", "--set seed: use --seed"), ("policy={}", "use --policy FILE"),
                       ("nonsense", "expected KEY=VALUE")):
        with pytest.raises(InputError, match=said):
            set_keys([item])


# ----------------------------------------------------------------------------- 2. a reused --dir; the share
def test_a_site_policy_share_that_gives_no_site_the_policy_is_refused():
    from mllm_dr.rehearsal import policy_holders

    with pytest.raises(InputError, match=r"--site-policy-share 0.1 of 2 site\(s\) gives the --site-policy to no site"):
        policy_holders(2, 0.1, {"dp": {}})
    with pytest.raises(InputError, match="to no site"):
        policy_holders(2, 0.0, {"dp": {}})
    with pytest.raises(InputError, match="needs --site-policy"):
        policy_holders(2, 0.5, None)
    assert policy_holders(10, 0.1, {"dp": {}}) == ["site01"] and policy_holders(2, 0.0, None) == []


def _prepared_folder(root: Path, complete: bool = True, **options):
    """A rehearsal folder as a preparation leaves it (its record; the workspaces' configs only)."""
    from mllm_dr.rehearsal import Preparation, Rehearsal, site_workspaces

    prep = Preparation(**({"sites": 2, "participants": 4, "seed": 0} | options), complete=complete)
    for ws in site_workspaces(root, prep.sites):
        ws.mkdir(parents=True)
        (ws / "workspace.json").write_text("{}")
    (root / "center").mkdir()
    (root / "corpus").mkdir()
    Rehearsal(workspaces=[str(p) for p in site_workspaces(root, prep.sites)], preparation=prep).write(
        root / "rehearsal.json")
    return prep


def test_a_reused_rehearsal_folder_refuses_other_participants_seed_or_site_policies(tmp_path):
    from mllm_dr.rehearsal import Preparation, read_folder, reusable

    held = {"site1": {"min_participants": 100}}
    _prepared_folder(tmp_path, site_policies=held)
    same = Preparation(sites=2, participants=4, seed=0, site_policies=held)
    assert reusable(tmp_path, read_folder(tmp_path), same) is True
    for other, said in (({"participants": 6}, r"--participants 4 \(asked: 6\)"),
                        ({"seed": 1}, r"--seed 0 \(asked: 1\)"),
                        ({"site_policies": {}}, r"--site-policy held by site1 \(asked: no site"),
                        ({"site_policies": {"site1": {"min_participants": 5}}},
                         "--site-policy held by site1 is another policy"),
                        ({"sites": 3}, r"--sites 2 \(asked: 3\)")):
        with pytest.raises(InputError, match=f"prepared otherwise: {said}.*use a new --dir"):
            reusable(tmp_path, read_folder(tmp_path), same.model_copy(update=other))
    # a record of an older kit names none of them: refused, not guessed
    (tmp_path / "rehearsal.json").write_text(json.dumps({"workspaces": [], "dropouts": {}}))
    with pytest.raises(InputError, match="before session 44.*use a new --dir"):
        reusable(tmp_path, read_folder(tmp_path), same)


# ----------------------------------------------------------------------------- 7. --dir of a center
def test_simulate_dir_refuses_a_folder_that_is_not_a_rehearsals(tmp_path):
    from mllm_dr.center import CenterDir
    from mllm_dr.rehearsal import read_folder

    assert read_folder(tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert read_folder(tmp_path / "empty") is None
    center = CenterDir.init(tmp_path / "center").root
    with pytest.raises(InputError, match="not a rehearsal folder: it holds 'audit', 'center.json', 'keys'"):
        read_folder(center)
    (center / "rehearsal.json").write_text("{}")                # what the old kit left in the reviewer's center
    with pytest.raises(InputError, match="not a rehearsal folder"):
        read_folder(center)
    (tmp_path / "half" / "sites").mkdir(parents=True)           # kit-like folders but no record
    with pytest.raises(InputError, match="no rehearsal.json"):
        read_folder(tmp_path / "half")


# ----------------------------------------------------------------------------- 9. an interrupted preparation
def test_an_interrupted_preparation_is_marked_and_prepared_again_whole(tmp_path, monkeypatch):
    import mllm_dr.rehearsal as rehearsal
    from fl_server.simulation import _prepared
    from mllm_dr.rehearsal import Preparation, Rehearsal

    asked = Preparation(sites=2, participants=4, seed=0)

    def interrupted(root, center, n, *a, **k):
        (Path(root) / "sites" / "site1").mkdir(parents=True)      # one site half made
        raise KeyboardInterrupt

    monkeypatch.setattr(rehearsal, "prepare_sites", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepared(tmp_path, asked, None)
    record = Rehearsal.model_validate_json((tmp_path / "rehearsal.json").read_text())
    assert record.preparation.complete is False and (tmp_path / "center" / "center.json").is_file()
    first_ca = (tmp_path / "center" / "pki" / "ca.crt").read_bytes()

    made = []

    def whole(root, center, n, *a, **k):
        assert not (Path(root) / "sites").exists()               # what the interruption left is gone
        made.append(center.root)
        return [Path(root) / "sites" / f"site{i + 1}" for i in range(n)]

    monkeypatch.setattr(rehearsal, "prepare_sites", whole)
    center, workspaces = _prepared(tmp_path, asked, None)        # the same command again: prepared anew
    assert made == [center.root] and len(workspaces) == 2
    assert (tmp_path / "center" / "pki" / "ca.crt").read_bytes() != first_ca


# ----------------------------------------------------------------------------- 6. progress of the rounds
def test_simulate_shows_the_rounds_done_from_the_runs_history(tmp_path):
    from fl_server.simulation import round_ticker
    from mllm_dr.run_folder import RunFolder

    calls = []
    folder = RunFolder(tmp_path, "r")
    tick = round_ticker(folder, 3, lambda *a: calls.append(a))
    assert calls == [("r: rounds done", 0, 3)]
    tick("running")
    folder.add_round({"round": 1})
    folder.add_round({"round": 2})
    tick("running")
    tick("running")                                    # nothing new: nothing advanced
    assert calls[1:] == [("", 2, 0)]
    assert round_ticker(folder, 3, None) is None


# ----------------------------------------------------------------------------- 3. init; data synth
def test_init_refuses_a_folder_that_holds_something_else(tmp_path):
    from mllm_dr.center import CenterDir
    from mllm_dr.synth import SynthConfig, write_synthetic
    from mllm_dr.workspace import Workspace

    center = CenterDir.init(tmp_path / "center")
    audit.append(center.audit_path, "center_init")
    log = center.audit_path.read_bytes()
    proc = run_cli("mllmdr-site", "init", "-w", center.root, "--site-id", "s", check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "center.json" in proc.stderr, proc.stderr
    assert center.audit_path.read_bytes() == log and not (center.root / "workspace.json").exists()
    corpus = write_synthetic(SynthConfig(tmp_path / "synth", "edaic", participants=4, sites=1, seed=0,
                                         seconds=0.5))[0]
    corpus.chmod(0o755)
    with pytest.raises(InputError, match="not empty .*and not a workspace"):
        Workspace.init(corpus, "s")
    assert corpus.stat().st_mode & 0o777 == 0o755
    (tmp_path / "empty" / "lost+found").mkdir(parents=True)      # an empty volume's root
    Workspace.init(tmp_path / "empty", "s")


@pytest.mark.parametrize("where", [".", "300_P"])
def test_data_synth_never_deletes_a_workspace_made_in_a_synthetic_site(tmp_path, where):
    """The workspace is made as an older kit allowed (init into the corpus folder); synth must keep it."""
    from mllm_dr.synth import SynthConfig, write_synthetic
    from mllm_dr.workspace import Workspace

    cfg = SynthConfig(tmp_path / "synth", "edaic", participants=4, sites=1, seed=0, seconds=0.5)
    site = write_synthetic(cfg)[0]
    ws = Workspace.init(tmp_path / "ws", "s")
    shutil.copytree(ws.audit_path.parent, site / where / "audit")
    shutil.copy(ws.root / "workspace.json", site / where / "workspace.json")
    with pytest.raises(InputError, match="holds 'site1', which is not a synthetic site made by this kit \\(or holds "
                                         "more than it wrote"):
        write_synthetic(cfg)
    assert (site / where / "workspace.json").is_file()
    (tmp_path / "again").mkdir()
    assert write_synthetic(SynthConfig(tmp_path / "again", "edaic", 4, 1, 0, 0.5))       # kit-made: replaced
    assert write_synthetic(SynthConfig(tmp_path / "again", "edaic", 4, 1, 0, 0.5))


# ----------------------------------------------------------------------------- 8. a center command at a workspace
def test_a_center_command_pointed_at_a_site_workspace_says_so(tmp_path):
    from mllm_dr.center import CenterDir
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "s")
    audit.append(ws.audit_path, "init")
    for call in (lambda: CenterDir(ws.root), lambda: CenterDir.init(ws.root)):
        with pytest.raises(InputError, match="is a site workspace .*not a center folder") as err:
            call()
        assert "restore center.json" not in str(err.value)
    proc = run_cli("mllmdr-center", "status", "--dir", ws.root, check=False)
    assert proc.returncode == 2 and "is a site workspace" in proc.stderr


# ----------------------------------------------------------------------------- 4. a tampered audit entry
def test_site_status_skips_tampered_audit_entries_and_says_the_log_does_not_verify(tmp_path):
    from mllm_dr.site_status import last_round, site_status
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "s")
    audit.append(ws.audit_path, "federated_round", run="r1", round=1, stage=1)
    assert site_status(ws)["audit_intact"] is True and site_status(ws)["warnings"] == []
    audit.append(ws.audit_path, "federated_round", run="r1", round=2, stage=1)
    lines = ws.audit_path.read_text().split("\n")
    lines[-2] = lines[-2].replace('"round": 2', '"round": 9')
    assert '"round": 9' in lines[-2]
    ws.audit_path.write_text("\n".join(lines))
    st = site_status(ws)
    assert st["last_round"]["round"] == 1 and last_round(ws)["round"] == 1
    assert st["audit_intact"] is False and "the audit log does not verify" in st["warnings"][0]
    from conftest import run_cli

    shown = run_cli("mllmdr-site", "status", "--workspace", ws.root)     # the operator's screen says it too
    assert "round 9" not in shown.stdout and "warning:" in shown.stderr and "does not verify" in shown.stderr


# ----------------------------------------------------------------------------- 5. the ledger's delta
@pytest.mark.parametrize("delta", ["x", 2, 0, True])
def test_a_ledger_delta_that_is_not_a_number_between_0_and_1_is_unreadable(tmp_path, delta):
    from mllm_dr.privacy import PrivacyLedger, ledger_reports

    for name, recorded in (("older", {}), ("bad", {"delta": delta})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "privacy.json").write_text(json.dumps({"unit": "site", "rounds": [{"noise_multiplier": 1.0}]}
                                                                 | recorded))
    older = ledger_reports(tmp_path / "older", 1e-5, "site")[0]      # an older kit's: read at the policy's delta
    assert older["delta"] == 1e-5 and older["epsilon"] > 0 and "error" not in older
    report = ledger_reports(tmp_path / "bad", 1e-5, "site")[0]
    assert "error" in report and "privacy.json: the privacy ledger is unreadable" in report["error"]
    with pytest.raises(InputError, match=f"delta {delta!r} is not a number between 0 and 1"):
        PrivacyLedger(tmp_path / "bad" / "privacy.json").spent(1e-5)


# ----------------------------------------------------------------------------- 10. who refused
class _RefusingGrid:
    """Two sites online; both refuse the run at the handshake."""

    def get_node_ids(self):
        return [11, 12]

    def send_and_receive(self, msgs, timeout):
        from flwr.app import ConfigRecord, Error, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        out = []
        for node in (11, 12):
            TaskIdentity.node_id = 0
            sent = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="query")
            TaskIdentity.node_id = node
            out.append(Message(Error(code=1, reason=f"site {node} refuses run r: its policy"), reply_to=sent))
        return out


def test_a_run_no_site_joined_records_who_refused(tmp_path, flower_task):
    from flwr.app import Context, RecordDict

    from fl_server.app import main
    from fl_server.plan import RunPlan
    from mllm_dr.center import CenterDir
    from mllm_dr.errors import FederationError

    CenterDir.init(tmp_path)
    cfg = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r", "base-model": "tiny-random",
                                  "node-timeout": 5}).to_run_config()
    with pytest.raises(FederationError, match="0 site\\(s\\) ready, 2 needed"):
        main(_RefusingGrid(), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    hist = json.loads((tmp_path / "runs" / "r" / "history.json").read_text())
    assert hist["status"] == "failed" and len(hist["not_joined"]) == 2
    assert all("refuses run r" in why for why in hist["not_joined"])


# ----------------------------------------------------------------------------- 11. stale; the signer
def test_status_says_the_federated_adapters_are_stale_and_names_their_signer(site_ws, flower_task, tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fl_client.app import Accepted, _accept
    from mllm_dr.base_model import base_info
    from mllm_dr.enrollment import federation_settings
    from mllm_dr.federated import RunSpec, initial_state, site_dims
    from mllm_dr.protocol import EvaluateInstruction
    from mllm_dr.signing import load_private, sign_state
    from mllm_dr.site_status import adapters_in_use, status_warnings

    spec = RunSpec("done", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws))
    state, ctx = initial_state(spec, 0), spec.context(3, 2)
    signature = sign_state(load_private(tmp_path / "center.key"), state, ctx)
    instruction = EvaluateInstruction(context=json.dumps(ctx), signature=signature, max_new_tokens=8)
    msg = Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),
                              "config": ConfigRecord(instruction.to_record())}), dst_node_id=7, message_type="evaluate")
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    assert isinstance(_accept(msg, context, EvaluateInstruction), Accepted)
    fed = adapters_in_use(site_ws)["federated"]
    assert fed["signer"] == federation_settings(site_ws).center_fingerprint and fed["stale"] is None
    site_ws.mark_adapters_stale("the corpus was replaced; train again")
    adapters = adapters_in_use(site_ws)
    assert adapters["in_use"] == "federated" and "train again" in adapters["federated"]["stale"]
    assert status_warnings(([], True, ""), adapters) == ["the federated adapters in use are stale: the corpus was "
                                                         "replaced; train again"]


# ----------------------------------------------------------------------------- 12. center status before a run
def test_center_status_names_an_approved_online_node_before_any_run(tmp_path, monkeypatch, capsys):
    import fl_server.superlink as superlink
    import mllm_dr.processes as processes
    from cli.center_run import status
    from mllm_dr.center import CenterDir
    from mllm_dr.enrollment import make_request
    from mllm_dr.workspace import Workspace

    center = CenterDir.init(tmp_path / "center")
    ws = Workspace.init(tmp_path / "ws", "site1")
    center.approve(make_request(ws, tmp_path / "req.json"))
    center.update_site("site1", node_id="4242")
    # a SuperLink that runs and lists the node (no run yet): what `serve` and Flower would answer
    monkeypatch.setattr(processes, "running_from_pidfile", lambda path: 1)
    monkeypatch.setattr(superlink, "supernodes", lambda c: [{"node-id": 4242, "status": "online"},
                                                            {"node-id": 7, "status": "online"}])
    status(dir=center.root, run_name=None, json_out=True)
    out = json.loads(capsys.readouterr().out)
    assert out["supernodes"] == [{"node_id": 4242, "site": "site1", "status": "online"},
                                 {"node_id": 7, "site": None, "status": "online"}]


# ----------------------------------------------------------------------------- 13. demo.sh's knobs
@pytest.mark.parametrize("knobs", [{"DP": "true"}, {"DP": "Patient"}, {"DP": "yes"}, {"SECAGG": "true"}])
def test_demo_refuses_a_knob_it_does_not_know_before_any_setup(tmp_path, knobs):
    """Run from a copy (its folder holds no kit), so a script that went past its checks fails at once."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "demo.sh", tmp_path / "scripts" / "demo.sh")
    out = tmp_path / "demo-out"
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "demo.sh")], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "OUT": str(out), **knobs}, cwd=tmp_path)
    name, value = next(iter(knobs.items()))
    assert proc.returncode == 2 and f"demo.sh: {name}={value} is not" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not out.exists()
