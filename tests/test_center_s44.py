"""Session 44, a review of the coordinating center's side: a reply of the wrong dtype, resumes of completed,
unknown or older runs, the recorded plan, Ctrl-C and --timeout while a run is followed, the run-config
file, and the feature widths of a resumed run. No processes: the functions are called as the CLI and the
ServerApp call them."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from test_federation_units import _HandshakeGrid, _frames, _replies, _strategy


# ----------------------------------------------------------------------------- helpers
def _center(tmp_path):
    from mllm_dr.center import CenterDir

    return CenterDir.init(tmp_path / "center")


def _record(center, name: str, **keys) -> dict:
    """A run that started here: its plan recorded (``keys`` over the defaults)."""
    from fl_server.plan import RunPlan
    from mllm_dr.run_folder import RunFolder

    cfg = RunPlan.model_validate({"center-dir": str(center.root), "run-name": name, "base-model": "tiny-random",
                                  **keys}).to_run_config()
    RunFolder(center.runs_dir, name).record_plan(cfg)
    return cfg


def _center_cli(monkeypatch, *args) -> int:
    """``mllmdr-center ARGS`` in this process (so its Flower calls can be replaced); its exit code."""
    from cli.center import main

    monkeypatch.setattr(sys, "argv", ["mllmdr-center", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code


def _serverapp(center, cfg: dict, grid=None):
    from flwr.app import Context, RecordDict

    from fl_server.app import main

    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))


# ----------------------------------------------------------------------------- 1. a reply of another dtype
@pytest.mark.parametrize("dtype", [torch.bool, torch.float8_e4m3fn, torch.int64])
def test_a_reply_tensor_that_is_not_floating_point_leaves_that_site_out_and_the_round_goes_on(tmp_path, flower_task,
                                                                                               dtype):
    """A bool or float8 tensor of the right name and shape in an fp32-uplink reply made the norm screen raise
    and failed the whole run; the site is rejected, named with the tensor, and the others are averaged."""
    strat = _strategy(tmp_path)
    strat.sites = {11: "site-a", 12: "site-b", 13: "site-c"}
    strat._sent = [11, 12, 13]
    arrays, _ = strat.aggregate_train(1, _replies({11: {"lq.audio.w": torch.full((6,), 0.1)},
                                                   12: {"lq.audio.w": torch.full((6,), 0.3)},
                                                   13: {"lq.audio.w": torch.ones(6).to(dtype)}}))
    assert torch.allclose(arrays.to_torch_state_dict()["lq.audio.w"], torch.full((6,), 0.2))
    rejected = json.loads((tmp_path / "runs" / "r" / "history.json").read_text())["rounds"][0]["rejected"]
    assert list(rejected) == ["site-c"]
    assert f"tensor lq.audio.w is {str(dtype).removeprefix('torch.')}" in rejected["site-c"]


# ----------------------------------------------------------------------------- 2. resume of a completed run
class _OneSiteGrid:
    def get_node_ids(self):
        return [11]


def test_a_completed_run_is_not_resumed_and_its_record_stays_completed(tmp_path, monkeypatch, capsys):
    """`run --resume` of a run whose final step was done re-asked the sites, rewrote its sites, and (too few
    online) marked the completed run failed; refused before anything, its history untouched."""
    from fl_server.plan import RunPlan, start_refusal
    from mllm_dr.errors import FederationError
    from mllm_dr.run_folder import RunFolder

    center = _center(tmp_path)
    cfg = _record(center, "done")
    folder = RunFolder(center.runs_dir, "done")
    folder.update(status="completed", final_round=2, sites=["a", "b", "c"],
                  evaluation={"round": 2, "sites": {"a": {}}, "pooled": {"ccc": 0.9}})
    before = folder.history_path.read_text()
    with pytest.raises(FederationError, match=r"run done completed; nothing to resume \(.*history.json\)"):
        _serverapp(center, {**cfg, "resume": True, "node-timeout": 1.0}, _OneSiteGrid())
    assert folder.history_path.read_text() == before
    code = _center_cli(monkeypatch, "run", "--dir", center.root, "--resume", "--name", "done")     # the CLI: the same
    err = capsys.readouterr().err
    assert code == 2 and f"{folder.history_path}: run done completed; nothing to resume" in err, err
    assert folder.history_path.read_text() == before
    assert start_refusal(RunPlan.model_validate({**cfg, "resume": True}), folder)[0] == "completed"
    # completed, but the final global reached no site: a resume runs that step again (strategy.run_rest)
    folder.update(evaluation={"round": 2, "sites": {}, "pooled": {}, "failed": {"a": "no reply"}})
    assert start_refusal(RunPlan.model_validate({**cfg, "resume": True}), folder) is None


# ----------------------------------------------------------------------------- 3. resume of no run
def test_a_resume_of_a_run_that_never_started_is_refused_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """`--resume --name TYPO` started a new run with the defaults under the typo."""
    _center(tmp_path)
    code = _center_cli(monkeypatch, "run", "--dir", tmp_path / "center", "--resume", "--name", "typo")
    err = capsys.readouterr().err
    assert code == 2 and "no run typo to resume" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "center" / "runs" / "typo").exists()
    # the ServerApp (a run submitted by other means) refuses it too, writing no record
    from mllm_dr.errors import FederationError

    cfg = {"center-dir": str(tmp_path / "center"), "run-name": "typo", "base-model": "tiny-random", "resume": True}
    from fl_server.plan import RunPlan

    with pytest.raises(FederationError, match="no run typo to resume"):
        _serverapp(None, RunPlan.model_validate(cfg).to_run_config())
    assert not (tmp_path / "center" / "runs" / "typo").exists()


# ----------------------------------------------------------------------------- 4. an unknown feature recipe
def test_an_unknown_feature_recipe_is_not_a_valid_run_plan(tmp_path, monkeypatch, capsys):
    from pydantic import ValidationError

    from fl_server.plan import RunPlan

    keys = {"center-dir": "/c", "run-name": "r"}
    with pytest.raises(ValidationError, match=r"unknown feature recipe 'egemaps-opnface' \(known: site, "):
        RunPlan.model_validate({**keys, "feature-recipe": "egemaps-opnface"})
    assert RunPlan.model_validate({**keys, "feature-recipe": "egemaps-openface"}).feature_recipe == "egemaps-openface"
    assert RunPlan.model_validate(keys).feature_recipe == ""
    _center(tmp_path)
    code = _center_cli(monkeypatch, "run", "--dir", tmp_path / "center", "--name", "x",
                       "--set", "feature-recipe=egemaps-opnface")
    err = capsys.readouterr().err
    assert code == 2 and "unknown feature recipe 'egemaps-opnface'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "center" / "runs" / "x").exists()             # the name is not burned


# ----------------------------------------------------------------------------- 5. a bad recorded plan
def test_a_bad_recorded_plan_is_named_as_the_file_not_as_an_option(tmp_path, monkeypatch, capsys):
    from mllm_dr.run_folder import RunFolder

    center = _center(tmp_path)
    folder = RunFolder(center.runs_dir, "newer")
    folder.record_plan({**_record(center, "newer"), "future-key": 1})        # written by another kit
    code = _center_cli(monkeypatch, "run", "--dir", center.root, "--resume", "--name", "newer")
    err = capsys.readouterr().err
    assert code == 2 and str(folder.plan_path) in err and "future-key" in err and "invalid run plan" not in err, err


# ----------------------------------------------------------------------------- 6. Ctrl-C and --timeout
def _following(monkeypatch, center, poll):
    """The CLI's Flower calls replaced: a SuperLink that runs, a submitted run whose ServerApp wrote
    'running', status polls answered by ``poll``; returns the runs stop_run was called for."""
    import fl_server.superlink as sl
    import mllm_dr.processes as processes
    from mllm_dr.run_folder import RunFolder

    stopped = []

    def submit(_center, overrides):
        RunFolder(center.runs_dir, overrides["run-name"]).start(sites=["a", "b"])
        return 42

    monkeypatch.setattr(processes, "running_from_pidfile", lambda _p: 1)
    monkeypatch.setattr(sl, "running_from_pidfile", lambda _p: 1)
    monkeypatch.setattr(sl, "submit_run", submit)
    monkeypatch.setattr(sl, "run_status", poll)
    monkeypatch.setattr(sl, "stop_run", lambda _c, run_id: stopped.append(run_id))
    return stopped


def test_ctrl_c_while_following_a_run_stops_the_flower_run_and_says_so(tmp_path, monkeypatch, capsys):
    """Ctrl-C left the Flower run going while the CLI said the completed work was kept and the next run
    resumes; the run is stopped, its history says why, exit 130."""
    from mllm_dr import audit
    from mllm_dr.run_folder import RunFolder

    center = _center(tmp_path)

    def interrupted(_center, _run_id):
        raise KeyboardInterrupt

    stopped = _following(monkeypatch, center, interrupted)
    code = _center_cli(monkeypatch, "run", "--dir", center.root, "--name", "r", "--base-model", "tiny-random")
    err = capsys.readouterr().err
    assert code == 130 and stopped == [42]
    assert "flower run 42 stopped (interrupted (Ctrl-C)); run r: history status failed" in err, err
    hist = RunFolder(center.runs_dir, "r").history()
    assert hist["status"] == "failed" and "interrupted (Ctrl-C)" in hist["error"]
    assert audit.read(center.audit_path)[-1]["status"] == "stopped: interrupted (Ctrl-C)"


def test_a_run_past_its_timeout_is_stopped_and_its_history_no_longer_says_running(tmp_path, monkeypatch, capsys):
    from mllm_dr.run_folder import RunFolder

    center = _center(tmp_path)
    stopped = _following(monkeypatch, center, lambda _c, _r: "running")
    code = _center_cli(monkeypatch, "run", "--dir", center.root, "--name", "r", "--base-model", "tiny-random",
                       "--timeout", "0")
    err = capsys.readouterr().err
    assert code == 2 and stopped == [42] and "did not finish within 0 s" in err, err
    hist = RunFolder(center.runs_dir, "r").history()
    assert hist["status"] == "failed" and "--timeout 0 s" in hist["error"]


# ----------------------------------------------------------------------------- 7. keys an older record lacks
def test_a_key_the_recorded_plan_lacks_binds_at_its_default(tmp_path):
    """A run recorded by an older kit has no max-update-norm: the key was never compared, so a resume could
    set it (a non-resumable key) to anything."""
    from fl_server.plan import RunPlan, start_refusal
    from mllm_dr.run_folder import RunFolder

    center = _center(tmp_path)
    folder = RunFolder(center.runs_dir, "old")
    older = _record(center, "old")
    del older["max-update-norm"]
    folder.record_plan(older)
    loose = RunPlan.model_validate({**older, "resume": True, "max-update-norm": 5.0})
    assert loose.changes_from(older) == ["max-update-norm"]
    assert start_refusal(loose, folder) == ("changed", "cannot resume old: max-update-norm 0.0 -> 5.0. A resumed "
                                            "run keeps the plan it started with (its policy, aggregation, "
                                            "schedule, model); leave these options out")
    assert RunPlan.model_validate({**older, "resume": True}).changes_from(older) == []   # the default: no change


# ----------------------------------------------------------------------------- 8. the run-config file
def test_each_submitted_run_has_its_own_run_config_file_removed_after(tmp_path, monkeypatch):
    """One fixed state/run-config.toml: two `run` commands started together could submit each other's plan."""
    import tomllib

    import fl_server.superlink as sl

    seen = []

    def flwr(_center, args, timeout=60):
        path = sl.Path(args[args.index("--run-config") + 1])
        seen.append((path, tomllib.loads(path.read_text())))
        return {"run-id": len(seen)}

    monkeypatch.setattr(sl, "flwr", flwr)
    center = SimpleNamespace(state_dir=tmp_path / "state")
    center.state_dir.mkdir()
    assert sl.submit_run(center, {"run-name": "a"}) == 1 and sl.submit_run(center, {"run-name": "b"}) == 2
    (a, cfg_a), (b, cfg_b) = seen
    assert a != b and a.parent == b.parent == tmp_path / "state"
    assert cfg_a == {"run-name": "a"} and cfg_b == {"run-name": "b"}
    assert list((tmp_path / "state").iterdir()) == []                       # removed after the submission


# ----------------------------------------------------------------------------- 9. the widths of a resumed run
def _widths(width: int):
    return {"audio": width}, _frames(60, width)


def test_a_resume_keeps_the_runs_signed_widths_and_leaves_out_the_sites_that_differ(flower_task):
    """On resume the handshake took the widths most sites answering now share: the run's own sites (width 5)
    were a minority beside two new ones (width 7), were left out, and the resume was refused as 'the sites'
    feature widths changed'. With the run's widths, the others are the ones left out, named."""
    from fl_server.app import handshake
    from fl_server.plan import RunPlan

    answers = {11: _widths(5), 13: _widths(7), 14: _widths(7)}
    plan = RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "min-sites": 1, "resume": True})
    grid = _HandshakeGrid((11, 13, 14), answers)
    joined = handshake(grid, [11, 13, 14], plan, "ab" * 32, widths={"audio": 5})
    assert joined.dims == {"audio": 5} and joined.sites == {11: "site-11"}
    assert len(joined.not_joined) == 2 and all("differ from {'audio': 5}, the run's" in p for p in joined.not_joined)
    assert handshake(grid, [11, 13, 14], plan, "ab" * 32).dims == {"audio": 7}      # a fresh run: the majority's


def test_the_serverapp_resumes_with_the_widths_its_last_checkpoint_is_signed_for(tmp_path, monkeypatch):
    import fl_server.app as app
    from fl_server.plan import RunPlan
    from mllm_dr.base_model import base_info
    from mllm_dr.federated import RunSpec
    from mllm_dr.run_folder import RunFolder
    from mllm_dr.signing import load_private, write_checkpoint

    center = _center(tmp_path)
    cfg = _record(center, "r", **{"min-sites": 1})
    plan = RunPlan.model_validate({**cfg, "resume": True})
    folder = RunFolder(center.runs_dir, "r")
    spec = RunSpec("r", "tiny-random", base_info("tiny-random").sha256, {"audio": 5, "visual": 3}, plan.architecture())
    write_checkpoint(folder.checkpoint(1), load_private(center.signing_key), {"maa.v": torch.ones(2)},
                     spec.context(1, 1))
    asked = []

    def handshake(grid, nodes, plan, base_sha256, center=None, widths=None):
        asked.append(widths)
        raise RuntimeError("stop after the handshake")

    monkeypatch.setattr(app, "handshake", handshake)
    with pytest.raises(RuntimeError, match="stop after the handshake"):
        app.run(_OneSiteGrid(), plan)
    assert asked == [{"audio": 5, "visual": 3}]


def test_a_stage_one_round_of_a_run_without_audio_or_visual_features_keeps_the_global(tmp_path, flower_task):
    """A run without audio/visual features has no LQ-former: its sites' stage-1 round trains nothing and
    replies with an empty update (training.stage_trains, session 44: it raised); the center's record of the
    round took max() over no tensors and failed the run. Now the round keeps the global and is recorded."""
    from fl_server.plan import RunPlan
    from fl_server.strategy import AdapterFedAvg
    from mllm_dr.federated import RunSpec
    from mllm_dr.run_folder import RunFolder
    from mllm_dr.signing import load_private, new_signing_key

    new_signing_key(tmp_path / "signing.key")
    plan = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r", "min-sites": 2,
                                   "stage1-rounds": 1, "stage2-rounds": 1})
    state = {"maa.v": torch.ones(2), "lora.l.q_proj.lora_A.weight": torch.ones(2, 3),
             "lora.l.q_proj.lora_B.weight": torch.zeros(3, 2)}
    strat = AdapterFedAvg(plan, RunSpec("r", "tiny-random", "ab" * 32, {}, plan.architecture()),
                          load_private(tmp_path / "signing.key"), RunFolder(tmp_path / "runs", "r"),
                          dict(state), 0, {11: "site-a", 12: "site-b"}, 1000)
    strat._sent = [11, 12]
    arrays, _ = strat.aggregate_train(1, _replies({11: {}, 12: {}}))
    kept = arrays.to_torch_state_dict()
    assert kept.keys() == state.keys() and all(torch.equal(kept[n], state[n]) for n in state)
    round1 = json.loads((tmp_path / "runs" / "r" / "history.json").read_text())["rounds"][0]
    assert round1["stage"] == 1 and round1["rejected"] == {} and round1["max_abs_change"] == 0.0


def test_a_resume_can_turn_the_final_evaluation_back_on(tmp_path):
    """README lists the final evaluation among what a resume may set anew, but only --no-evaluate existed: a run
    started with it could never evaluate again (a review, session 44). `--evaluate` now reaches the plan's checks
    (here: the run was never started, refused as such), where it was an unknown option."""
    from conftest import run_cli
    from mllm_dr.center import CenterDir

    CenterDir.init(tmp_path / "center")
    proc = run_cli("mllmdr-center", "run", "--dir", tmp_path / "center", "--resume", "--name", "x", "--evaluate",
                   check=False)
    assert proc.returncode == 2 and "No such option" not in proc.stderr, proc.stderr
    assert "no run x to resume" in proc.stderr, proc.stderr


def test_a_run_completed_without_evaluation_resumes_with_evaluate_to_evaluate(tmp_path):
    """A second read of this session's change: the new "completed" refusal (and run_rest's own test) took a run
    whose final global went out under --no-evaluate as done, so `--resume --evaluate` answered "nothing to
    resume". The final step counts as done for a plan asking for evaluation only once it evaluated."""
    from fl_server.plan import RunPlan, start_refusal
    from mllm_dr.run_folder import RunFolder

    plan0 = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r", "evaluate": False})
    folder = RunFolder(tmp_path / "runs", "r")
    folder.record_plan(plan0.to_run_config())
    folder.checkpoint(plan0.total_rounds).mkdir(parents=True)
    (folder.checkpoint(plan0.total_rounds) / "checkpoint.json").write_text("{}")
    folder.update(status="running", rounds=[])         # what a run completed with --no-evaluate leaves
    folder.update(final_global_delivered=["site1", "site2"], final_global_delivered_round=plan0.total_rounds)
    folder.update(status="completed", final_round=plan0.total_rounds)

    def resume(**keys):
        return start_refusal(RunPlan.model_validate({**folder.plan(), "resume": True, **keys}), folder)

    assert resume(evaluate=True) is None
    assert resume()[0] == "completed"                  # the plan it started with: nothing left to do
    folder.update(evaluation={"round": plan0.total_rounds, "sites": ["site1", "site2"]})
    assert resume(evaluate=True)[0] == "completed"     # evaluated since: done either way
