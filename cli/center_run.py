"""`mllmdr-center run | status`: launch a federated run, follow it, summarise runs."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from cli.common import DirOpt, center_dir, console, emit_json, err_console, progress, safe_text
from mllm_dr import audit
from mllm_dr.errors import InputError
from mllm_dr.protocol import UPLINK_ENCODINGS


class Aggregation(str, Enum):
    exact_lora = "exact-lora"
    fedavg = "fedavg"
    ffa_lora = "ffa-lora"


Uplink = Enum("Uplink", {m: m for m in UPLINK_ENCODINGS}, type=str)


def _default(key: str) -> str:
    """--help text: the run plan's default for ``key`` (fl_server/plan.py, the one source of defaults)."""
    from fl_server.plan import RunPlan

    return f"Default: {RunPlan.defaults()[key]} (left out on --resume: the run's own)."


# run-config keys a run takes from their own option only: a --set of them was overridden without a word
# (policy, evaluate), or skipped the CLI's own checks (resume: the checkpoint check before submitting)
OWN_OPTION = {"policy": "--policy FILE", "evaluate": "--evaluate/--no-evaluate", "resume": "--resume"}


def run(dir: Path = DirOpt,
        base_model: Optional[str] = typer.Option(None, "--base-model",
                                                 help="smollm2 (default) | tiny-random | a folder every site has."),
        stage1_rounds: Optional[int] = typer.Option(None, "--stage1-rounds", min=0, help=_default("stage1-rounds")),
        stage2_rounds: Optional[int] = typer.Option(None, "--stage2-rounds", min=0, help=_default("stage2-rounds")),
        local_epochs: Optional[int] = typer.Option(None, "--local-epochs", min=1, help=_default("local-epochs")),
        aggregation: Optional[Aggregation] = typer.Option(None, "--aggregation", help=_default("aggregation")),
        uplink: Optional[Uplink] = typer.Option(None, "--uplink", help="How sites encode their training replies: "
                                                "fp32 (default), fp16 or int8 (the delta to the global, blockwise, "
                                                "with error feedback); not with secure aggregation."),
        lora_rank: Optional[int] = typer.Option(None, "--lora-rank", min=1, help=_default("lora-rank")),
        min_sites: Optional[int] = typer.Option(None, "--min-sites", min=1, help=_default("min-sites")),
        name: Optional[str] = typer.Option(None, "--name", help="Run name (default: run-<timestamp>)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the named (or latest) run from its last "
                                                             "signed checkpoint, with the plan it started with "
                                                             "(options that would change it are refused)."),
        evaluate: Optional[bool] = typer.Option(None, "--evaluate/--no-evaluate", help="Run (or skip) the pooled "
                                                "evaluation at the end; a resumed run keeps its own unless given."),
        round_validation: bool = typer.Option(False, "--round-validation",
                                              help="Sites also send a cheap held-out check of the global they "
                                                   "receive (regression head), from the first stage-2 aggregate "
                                                   "on (stage 1 does not train the head): a learning curve "
                                                   "in the history."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the round-0 adapters."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Any other run-plan key (fl_server/plan.py), "
                                                 "e.g. --set lr-lora=1e-3 --set score-weight=2; validated."),
        eval_max_new_tokens: Optional[int] = typer.Option(None, "--eval-max-new-tokens", min=8, help=_default("eval-max-new-tokens")),
        policy: Optional[Path] = typer.Option(None, "--policy", help="The run's required policy (JSON, see "
                                              "policies/); sites whose own policy is stricter refuse to join."),
        timeout: float = typer.Option(3600, "--timeout", help="Give up (and stop the run) after this many seconds."),
        json_out: bool = typer.Option(False, "--json")):
    """Launch a federated run and follow it round by round; exits non-zero when the run failed.

    Options left out take the run plan's defaults (fl_server/plan.py, from mllm_dr/config.py).

    Example: mllmdr-center run --dir /srv/center --base-model smollm2 --stage1-rounds 1 --stage2-rounds 2
    """
    from fl_server.plan import RunPlan, refusal_path, start_refusal, validated_plan
    from fl_server.superlink import RunTimedOut, run_log, submit_run, superlink_pidfile, wait_run
    from mllm_dr.processes import running_from_pidfile
    from mllm_dr.run_folder import RunFolder, latest_run
    from policies.schema import load_policy

    c = center_dir(dir)
    run_policy = load_policy(policy)     # validated here: a bad file never reaches the sites
    if resume and not name:
        name = latest_run(c.runs_dir)
        if not name:
            raise InputError("nothing to resume: no run in this center folder", c.runs_dir)
    name = name or f"run-{datetime.now():%Y%m%d-%H%M%S}"
    given = {"base-model": base_model, "stage1-rounds": stage1_rounds, "stage2-rounds": stage2_rounds,
             "local-epochs": local_epochs, "aggregation": aggregation.value if aggregation else None,
             "uplink": uplink.value if uplink else None,
             "lora-rank": lora_rank, "min-sites": min_sites, "eval-max-new-tokens": eval_max_new_tokens,
             "round-validation": round_validation or None, "seed": seed,
             "feature-recipe": c.config.feature_recipe or None,
             "policy": run_policy.model_dump_json() if policy or not resume else None,
             "evaluate": evaluate if evaluate is not None else (None if resume else True)}
    extra = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or key not in RunPlan.defaults():
            raise InputError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(RunPlan.defaults())}")
        if key in OWN_OPTION:        # its option's value (or default) would silently win over --set
            raise InputError(f"--set {key}: use {OWN_OPTION[key]}")
        if key == "feature-recipe" and given["feature-recipe"] not in (None, value):
            raise InputError(f"--set feature-recipe={value}: this center's recipe is {given['feature-recipe']} "
                             f"(center.json); a run cannot change it")
        extra[key] = value
    try:                                   # the name first: it names a folder under runs/
        RunPlan.model_validate({"center-dir": str(c.root.resolve()), "run-name": name})
    except ValidationError:
        raise InputError(f"--name {name!r}: letters, digits, '_', '.', '-' only (at most 64)") from None
    folder = RunFolder(c.runs_dir, name)
    recorded = folder.plan() if resume else None     # a resumed run starts from the plan it started with
    if recorded is not None:
        _check_recorded(recorded, folder.plan_path)
    plan = validated_plan({**(recorded or {}), "center-dir": str(c.root.resolve()), "run-name": name,
                           "resume": resume, **extra, **{k: v for k, v in given.items() if v is not None}})
    refused = start_refusal(plan, folder)
    if refused and refused[0] != "completed":
        raise InputError(refused[1], refusal_path(refused[0], folder))
    last = folder.last_checkpoint() if resume else None
    if last is not None:    # a damaged or tampered checkpoint stops here, before any site is asked
        from mllm_dr.signing import load_private, read_checkpoint

        read_checkpoint(folder.checkpoint(last), load_private(c.signing_key).public_key())
    if refused:             # a completed run: after its last checkpoint's check, so tampering is named first
        raise InputError(refused[1], refusal_path(refused[0], folder))
    plan = plan.with_recorded_policy(recorded)     # the text every site pinned, when the meaning is the same
    if not running_from_pidfile(superlink_pidfile(c)):       # after every check of the options
        raise InputError("the SuperLink is not running; start it with 'mllmdr-center serve --dir DIR --detach'", c.root)
    run_id = submit_run(c, plan.to_run_config())
    audit.append(c.audit_path, "run_start", run=name, run_id=run_id, base_model=plan.base_model, resume=resume,
                 rounds=plan.total_rounds)
    try:
        with progress() as bar:
            task = bar.add_task(f"{name} (flower run {run_id})", total=plan.total_rounds)

            def tick(status: str) -> None:
                bar.update(task, completed=len(folder.history().get("rounds", [])), description=f"{name}: {status}")

            status = wait_run(c, run_id, timeout, tick, folder.history_stamp)
    except KeyboardInterrupt:          # wait_run stopped the Flower run; run_app exits 130
        _stopped(c, folder, run_id, "interrupted (Ctrl-C)")
        raise
    except RunTimedOut:                # wait_run stopped the Flower run; one line, exit 2
        _stopped(c, folder, run_id, f"--timeout {timeout:g} s")
        raise
    hist = folder.history()
    audit.append(c.audit_path, "run_end", run=name, run_id=run_id, status=status)
    if status != "finished:completed" or hist.get("status") == "failed":
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.log_path.write_text(run_log(c, run_id))
        reason = hist.get("error") or _last_error(folder.log_path)
        raise InputError(f"run {name} (flower run {run_id}) {status}: {reason}", folder.log_path)
    from mllm_dr.reports import run_curves

    run_curves(hist, folder.root / "curves.png")
    summary = _summary(hist) | {"curves": str(folder.root / "curves.png")}
    if json_out:
        emit_json({"run": name, "run_id": run_id, "flower_status": status, **summary})
    else:
        _print_summary(name, hist)
        console.print(f"learning curves: {folder.root / 'curves.png'}; per-participant rows stay at the sites "
                      f"(reports/federated-{name}-test.md)")


def _check_recorded(recorded: dict, plan_path: Path) -> None:
    """The plan a resumed run started with, checked on its own first: merged with the options, a bad
    record (a key another kit wrote, a value out of range) read as a bad option and never named the file
    (a review, session 44)."""
    from fl_server.plan import validated_plan

    validated_plan({**recorded, "resume": True}, "the recorded run plan is not valid for this kit", plan_path)


def _stopped(center, folder, run_id: int, reason: str) -> None:
    """The command stopped following the run, and ``wait_run`` stopped the Flower run: the audit log and
    the run's history say so (a history left "running" showed a stopped run as going, session 44); a
    history the ServerApp already ended (failed, completed) is left as it is."""
    audit.append(center.audit_path, "run_end", run=folder.run, run_id=run_id, status=f"stopped: {reason}")
    if folder.history().get("status") == "running":
        folder.fail(f"stopped by 'mllmdr-center run': {reason}")
    status = folder.history().get("status")
    err_console.print(f"flower run {run_id} stopped ({safe_text(reason)}); run {safe_text(folder.run)}: "
                      f"{'history status ' + safe_text(status) if status else 'no history yet'}; 'mllmdr-center "
                      f"run --resume --name {safe_text(folder.run)}' continues it from its last checkpoint",
                      highlight=False, soft_wrap=True)


def _last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs or lines or ["no log"])[-1].strip()[-300:]


def _summary(hist: dict) -> dict:
    # .get throughout: a history written by an older kit lacks fields (status answered with an internal error)
    rounds = [r for r in hist.get("rounds", []) if isinstance(r, dict)]
    sites = lambda r: r.get("sites") if isinstance(r.get("sites"), dict) else {}        # noqa: E731
    return {"rounds": [{"round": r.get("round"), "stage": r.get("stage"), "sites": len(sites(r)),
                        "bytes_up_per_site": max((s.get("bytes_up", 0) for s in sites(r).values()), default=0),
                        "ratio_to_base": max((r.get("bytes_up_ratio_to_base") or {}).values(), default=0.0),
                        "train_loss": r.get("train_loss"), "rejected": r.get("rejected") or {},
                        "epsilon_total": {s: v["epsilon_total"] for s, v in sites(r).items() if "epsilon_total" in v}}
                       for r in rounds],
            "evaluation": (hist.get("evaluation") or {}).get("pooled"), "base_bytes": hist.get("base_bytes"),
            "site_evaluation": (hist.get("evaluation") or {}).get("sites", {}),
            "bytes_up_per_stage": {f"stage{st}": max((s.get("bytes_up", 0) for r in rounds if r.get("stage") == st
                                                      for s in sites(r).values()), default=0) for st in (1, 2)},
            "sites": hist.get("sites", []), "status": hist.get("status")}


def _print_summary(name: str, hist: dict) -> None:
    t = Table(title=f"run {name}: {hist.get('base_model')} ({hist.get('aggregation')})")
    for col in ("round", "stage", "sites", "bytes up / site", "vs base", "train loss", "DP epsilon", "rejected"):
        t.add_column(col)
    for r in _summary(hist)["rounds"]:
        eps = max(r["epsilon_total"].values()) if r["epsilon_total"] else None
        t.add_row(str(r["round"]), str(r["stage"]), str(r["sites"]), f"{r['bytes_up_per_site'] / 1e6:.2f} MB",
                  f"{r['ratio_to_base']:.4f}", "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}",
                  "off" if eps is None else f"{eps:.2f}",
                  ", ".join(r["rejected"]) or "-")
    console.print(t)
    ev = hist.get("evaluation") or {}
    if ev.get("pooled"):
        e = Table(title="held-out evaluation (sufficient statistics; pooled = all sites' test participants)")
        for col in ("", "n", "CCC", "RMSE", "MAE", "F1", "item MAE", "MAA head CCC", "format violations"):
            e.add_column(col)
        for who, m in [("pooled", ev["pooled"])] + sorted(ev.get("sites", {}).items()):
            e.add_row(who, str(m.get("n")), *(f"{m[k]:.2f}" if isinstance(m.get(k), float) else "-"
                                          for k in ("ccc", "rmse", "mae", "f1", "item_mae", "maa_ccc")),
                      f"{m['format_violation_rate']:.1%}" if isinstance(m.get("format_violation_rate"), float) else "-")
        console.print(e)


def node_sites(center, hist: dict) -> dict[str, str]:
    """Flower node id -> site id: the approved sites' registered nodes (``mllmdr-center serve`` records them),
    over the last run's handshake (a site registered by a kit that kept no node id). Since session 44: taken
    from the last run only, an approved site online before any run showed as ``"site": null``."""
    recorded = hist.get("site_nodes")
    names = {str(k): v for k, v in recorded.items()} if isinstance(recorded, dict) else {}
    return names | {str(rec["node_id"]): rec["site_id"] for rec in center.approved_sites()
                    if rec.get("node_id") is not None}


def status(dir: Path = DirOpt,
           run_name: Optional[str] = typer.Option(None, "--run", help="Run name (default: the latest)."),
           json_out: bool = typer.Option(False, "--json")):
    """Sites online, rounds done, last metrics, bytes per round.

    Example: mllmdr-center status --dir /srv/center --json
    """
    from fl_server.superlink import superlink_pidfile, supernodes
    from mllm_dr.processes import running_from_pidfile
    from mllm_dr.run_folder import RunFolder, latest_run

    c = center_dir(dir)
    if run_name is not None:
        from mllm_dr.protocol import run_name as checked_run_name

        try:
            checked_run_name(run_name)          # it names a folder under runs/: never a path
        except ValueError as err:
            raise InputError(f"--run: {err}") from None
    asked = RunFolder(c.runs_dir, run_name) if run_name is not None else None
    if asked is not None and not (asked.started() or asked.history_path.is_file()):
        runs = sorted(d.name for d in c.runs_dir.iterdir() if d.is_dir()) if c.runs_dir.is_dir() else []
        raise InputError(f"--run {run_name!r}: no such run here (runs: {', '.join(runs) or 'none'})", c.runs_dir)
    run_name = run_name or latest_run(c.runs_dir)
    hist = RunFolder(c.runs_dir, run_name).history() if run_name else {}
    names = node_sites(c, hist)
    online = None
    if running_from_pidfile(superlink_pidfile(c)):
        online = [{"node_id": n.get("node-id"), "site": names.get(str(n.get("node-id"))), "status": n.get("status")}
                  for n in supernodes(c)]
    out = {"superlink": "running" if online is not None else "stopped", "supernodes": online,
           "approved_sites": [s["site_id"] for s in c.approved_sites()],
           "run": hist.get("run"), **(_summary(hist) if hist else {})}
    if json_out:
        emit_json(out)
        return
    console.print(f"SuperLink {out['superlink']}; approved sites: {', '.join(out['approved_sites']) or '-'}")
    if online:
        console.print("SuperNodes: " + ", ".join(f"{n['site'] or n['node_id']} ({n['status']})" for n in online))
    if hist:
        _print_summary(hist["run"], hist)
