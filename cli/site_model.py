"""`mllmdr-site train | score | evaluate`: the model at a site (local or federated adapters)."""

from __future__ import annotations

import hashlib
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import (WorkspaceOpt, console, emit_json, err_console, progress, progress_callback, safe_text,
                        set_threads)
from mllm_dr import audit
from mllm_dr.config import DEFAULT_SCORING, DEFAULT_TRAIN
from mllm_dr.errors import InputError


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Adapters(str, Enum):
    auto = "auto"
    local = "local"
    federated = "federated"


class Engine(str, Enum):
    torch = "torch"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"


EngineOpt = typer.Option(Engine.torch, "--engine", help="torch | onnx (ONNX Runtime, fp32) | onnx-int8 (int8 "
                         "weights): CPU scoring engines; the export is made once per adapter version.")


def train(workspace: Optional[Path] = WorkspaceOpt,
          local: bool = typer.Option(False, "--local", help="Train on this site's data only (no federation)."),
          base_model: Optional[str] = typer.Option(None, "--base-model",
                                                   help="smollm2 | tiny-random (tests only) | local HF folder. "
                                                        "Default: smollm2; with --resume the interrupted run's base."),
          load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="bitsandbytes nf4 (GPU sites)."),
          device: Device = typer.Option(Device.auto, "--device"),
          stage1_epochs: int = typer.Option(DEFAULT_TRAIN.stage1_epochs, "--stage1-epochs", min=0),
          stage2_epochs: int = typer.Option(DEFAULT_TRAIN.stage2_epochs, "--stage2-epochs", min=0),
          batch_size: int = typer.Option(DEFAULT_TRAIN.batch_size, "--batch-size", min=1),
          no_joint: bool = typer.Option(False, "--no-joint", help="Ablation: L_lm only, no MAA loss."),
          no_lq: bool = typer.Option(False, "--no-lq", help="Ablation / text-only LoRA: no audio or video."),
          no_audio: bool = typer.Option(False, "--no-audio", help="Ablation: no audio LQ-former."),
          no_visual: bool = typer.Option(False, "--no-visual", help="Ablation: no visual LQ-former."),
          zero_shot: bool = typer.Option(False, "--zero-shot", help="Baseline: base model, no training."),
          moving_weight: bool = typer.Option(False, "--moving-weight", help="alpha*L_lm+(1-alpha)*L_mse, alpha "
                                                 "(epoch+1)/(epochs+1) (not in the paper, whose L_joint = L_lm + L_mse)."),
          resume: bool = typer.Option(False, "--resume", help="Continue from the last epoch checkpoint."),
          federated: bool = typer.Option(False, "--federated", help="Join the federation: start this site's SuperNode."),
          detach: bool = typer.Option(False, "--detach", help="With --federated: return once connected "
                                                               "(stop with 'mllmdr-site stop')."),
          lora_rank: Optional[int] = typer.Option(None, "--lora-rank", min=1,
                                                  help="With --federated: train LoRA at this rank (exact-lora runs)."),
          wait: Optional[float] = typer.Option(None, "--wait", min=0, help="With --federated: seconds to wait for the "
                                               "center (unreachable, or key not registered yet); default: keep trying."),
          json_out: bool = typer.Option(False, "--json")):
    """Train LQ-formers (stage 1), then LoRA + MAA (stage 2), alone (--local) or federated (--federated).

    --local trains on this site's data only; --federated starts this site's SuperNode and the center
    drives rounds and stages.

    Example: mllmdr-site train --workspace /srv/mllmdr --local --stage1-epochs 1 --stage2-epochs 2
    Example: mllmdr-site train --workspace /srv/mllmdr --federated --detach
    """
    from mllm_dr.base_model import pick_device
    from mllm_dr.config import ModelConfig, TrainConfig
    from mllm_dr.local_run import train_local
    from mllm_dr.workspace import resolve_workspace

    if local == federated:
        raise InputError("choose one of --local or --federated")
    local_only = {"--load-in-4bit": load_in_4bit, "--stage1-epochs": stage1_epochs != DEFAULT_TRAIN.stage1_epochs,
                  "--stage2-epochs": stage2_epochs != DEFAULT_TRAIN.stage2_epochs,
                  "--batch-size": batch_size != DEFAULT_TRAIN.batch_size, "--no-joint": no_joint, "--no-lq": no_lq,
                  "--no-audio": no_audio, "--no-visual": no_visual, "--zero-shot": zero_shot,
                  "--moving-weight": moving_weight, "--resume": resume}
    if federated and any(local_only.values()):   # the center decides these for a federated run
        raise InputError(f"{', '.join(k for k, v in local_only.items() if v)}: only with --local; in a federated "
                         "run the center's run plan sets epochs, batch size and the model")
    if local and (detach or lora_rank):
        raise InputError("--detach and --lora-rank go with --federated")
    if zero_shot and resume:     # before the workspace is even read (train_local refuses it too)
        raise InputError("--zero-shot and --resume: a zero-shot run trains nothing, so it continues no run "
                         "(it would mark trained adapters as untrained); give one of them")
    if federated:
        from cli.site_federation import train_federated

        return train_federated(workspace, base_model, lora_rank, detach, json_out, wait)
    set_threads()
    ws = resolve_workspace(workspace)
    config = ModelConfig(use_audio=not (no_lq or no_audio), use_visual=not (no_lq or no_visual))
    cfg = TrainConfig(stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs, batch_size=batch_size,
                      joint=not no_joint, moving_weight=moving_weight)
    with ws.lock("train"), progress() as bar:
        result = train_local(ws, base_model, config, cfg, pick_device(device.value), load_in_4bit, resume, zero_shot,
                             progress_callback(bar))
    audit.append(ws.audit_path, "train", mode="local", base_model=result["base_model"],
                 adapter_version=result["adapter_version"], instances=result["train_instances"])
    if json_out:
        emit_json(result)
    else:
        where = ws.checkpoints_dir / "local" / "latest"
        console.print(safe_text(train_summary(result, where)), highlight=False)
    warn_stale_rationales(result["stale_teacher_rationales"], "trained")
    if (src := result.get("rationale_sources")) and not src["teacher"]:
        err_console.print(f"[yellow]warning:[/yellow] no instance trained on a teacher rationale: all {src['extractive']} "
                          "trained on the extractive one (no teacher record: 'mllmdr-site rationales' never ran, or "
                          "the teacher was rejected on each). Run 'mllmdr-site rationales' before training for the "
                          "teacher's.", highlight=False)
    if result.get("optimizer_restored") is False:       # session 44: a resume now keeps the optimizer's moments
        err_console.print("[yellow]warning:[/yellow] the interrupted stage's optimizer state was not kept (a checkpoint "
                          "of an older kit, or the run stopped between two writes): it went on with a fresh optimizer, "
                          "so the adapters differ from an uninterrupted run's", highlight=False)
    if result.get("resume_unchecked"):                  # a state.json of a kit before session 46
        err_console.print(f"[yellow]warning:[/yellow] {safe_text(result['resume_unchecked'])}", highlight=False)


def train_summary(result: dict, where) -> str:
    """The one line `train --local` prints: time, adapters and, when stage 2 trained, how its answers were made
    (``dataset.rationale_sources``: session 46, a site training 100% extractive was never told)."""
    if result.get("zero_shot"):
        return f"zero-shot: the base untrained, adapters {result['adapter_version']} in {where}"
    line = (f"trained in {result['seconds']:.0f} s; adapters {result['adapter_version']} "
            f"({result['adapter_bytes'] / 1e6:.1f} MB) in {where}")
    if src := result.get("rationale_sources"):
        line += (f"; stage-2 answers: {src['teacher']} on a teacher rationale, {src['extractive']} on the extractive "
                 f"one ({src['over_budget_replaced']} over-long answers replaced by it)")
    return line


def metrics_line(metrics: dict) -> str:
    """`evaluate`'s one-line summary: floats to 3 places, "n/a" where a figure is undefined (NaN or None; a
    precision with no predicted positive), as the reports write it (session 46: it printed precision=nan)."""
    import numbers

    from mllm_dr.reports import figure_text

    def text(v):
        if isinstance(v, numbers.Integral):              # a count (numpy's too), a bool
            return str(v)
        if v is None or isinstance(v, numbers.Real):     # numpy's floats too
            return figure_text(None if v is None else float(v), ".3f")
        return str(v)

    return " ".join(f"{k}={text(v)}" for k, v in metrics.items())


def warn_stale_rationales(stale: int, tense: str) -> None:
    """One warning (on stderr, so --json stays parseable) for --local and --federated alike."""
    if stale:
        err_console.print(f"[yellow]warning:[/yellow] {stale} teacher rationales were written for another quote, label or "
                          f"dialogue than the item's today; those items {tense} on the extractive rationale. Run 'mllmdr-site "
                          "rationales' to ask the teacher again.", highlight=False)


def score(participant: str = typer.Argument(..., help="Participant id as in the corpus (303, HC01)."),
          workspace: Optional[Path] = WorkspaceOpt,
          base_model: Optional[str] = typer.Option(None, "--base-model", help="Defaults to the adapters' base."),
          device: Device = typer.Option(Device.auto, "--device"),
          max_new_tokens: int = typer.Option(DEFAULT_SCORING.max_new_tokens, "--max-new-tokens", min=8),
          user: Optional[str] = typer.Option(None, "--user", help="Clinician id for the audit log (default: your "
                                                                 "login name)."),
          adapters: Adapters = typer.Option(Adapters.auto, "--adapters", help="auto: federated if this site has "
                                            "taken part in a run, else local."),
          html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML report for the "
                                              "clinician (items, rationales, the excerpts they rest on)."),
          engine: Engine = EngineOpt,
          json_out: bool = typer.Option(False, "--json")):
    """Score every PHQ item of one participant with a rationale; total, band, binary call.

    Decision support, not a diagnosis. Says when the participant was in the model's training data.
    What is shown is kept on site (scores/PARTICIPANT.json, owner-only): 'review' rates exactly that, named
    by the id printed here and shown on the HTML page (review PARTICIPANT --score ID).

    Example: mllmdr-site score 303 --workspace /srv/mllmdr --html /tmp/303.html
    Example: mllmdr-site score 303 --workspace /srv/mllmdr --engine onnx-int8
    """
    from mllm_dr import clinician
    from mllm_dr.atomic import atomic_write_text
    from mllm_dr.base_model import pick_device
    from mllm_dr.dataset import load_corpus
    from mllm_dr.evaluation import corpus_participant, participant_instances, score_participant
    from mllm_dr.onnx_engine import check_engine, make_engine
    from mllm_dr.progress import advance, start
    from mllm_dr.workspace import resolve_workspace, stale_note

    load_on = pick_device(check_engine(engine.value, device.value))     # the ONNX engines load on cpu
    set_threads()
    ws = resolve_workspace(workspace)
    if html is not None:              # never over the workspace's own records, nor over a file that is not a page
        check_writable(html, "--html", workspace=ws, suffixes=(".html", ".htm"))
    corpus = load_corpus(ws)                          # read once: the checks, the instances, the examples
    corpus_participant(ws, participant, corpus)       # an unknown id, or one no kept score can be filed
    clinician.kept_score_path(ws, participant)        # under: said before minutes of model loading
    kind, folder = adapter_choice(ws, adapters)
    with progress() as bar:
        step = progress_callback(bar)
        insts = participant_instances(ws, participant, corpus)   # scored, and its excerpts shown, from these
        start(step, "loading model", 1)
        sm = load_model(ws, kind, base_model, load_on)   # verified first; the adapters chosen
        eng = make_engine(engine.value, sm, ws.checkpoints_dir / "onnx", progress=step)
        advance(step)
        start(step, f"scoring {len(corpus.item_names)} items", len(corpus.item_names))
        result = score_participant(ws, sm, participant, max_new_tokens, eng, corpus=corpus, instances=insts)
        advance(step, len(corpus.item_names))
    training = clinician.training_data_note(corpus.get(participant), kind, sm.meta)
    view = clinician.annotate(result, training, stale_note(folder), engine.value)
    excerpts = clinician.participant_excerpts(insts)
    # what the clinician is shown is kept on site: `review` rates exactly this (it used to score again)
    kept, kept_sha = clinician.kept_score_record(view, excerpts, engine.value, kind, user or audit.login_name())
    page = clinician.render_participant_html(view, excerpts, {"site": ws.config.site_id, "adapters_kind": kind,
                                                              "kept_score_sha256": kept_sha}) if html else None
    # audited first: neither the kept score nor a patient's page ever exists without its audit entry
    audit.append(ws.audit_path, "score", actor=user, participant=participant, adapter_version=sm.version,
                 base_model=sm.info.name, engine=engine.value, kept_score_sha256=kept_sha,
                 html_sha256=hashlib.sha256(page.encode("utf-8")).hexdigest() if page else None)
    clinician.keep_score(ws, participant, kept)     # then kept: no page shows a score 'review' cannot rate
    view["kept_score_sha256"] = kept_sha
    if page:
        atomic_write_text(html, page)
        view["html"] = str(html)
    if json_out:
        emit_json(view)
        return
    _print_score(view)


#: the workspace's own records (mllm_dr/workspace.py): no --html or --report is written among them
WORKSPACE_RECORDS = ("scores", "reviews", "audit", "keys", "checkpoints", "federation", "rationales", "features",
                     "cache", "workspace.json", "workspace.lock", "cmdc_question_map.json")


def check_writable(path: Path, option: str, creates_folder: bool = False, workspace=None,
                   suffixes: tuple[str, ...] | None = None, beside: tuple[str, ...] = ()) -> None:
    """A file ``option`` names, to be written after minutes of work: a folder, a folder that is missing and
    one this user cannot write in are refused now, in one line (``atomic_write_text`` writes beside it).
    ``creates_folder``: the writer makes missing folders (``reports.write_report``), so the nearest folder
    that exists must take them. ``workspace``: a path that resolves (links followed) into its own records
    (``WORKSPACE_RECORDS``: kept scores, reviews, the signed audit log, keys, adapters) is refused, as
    ``--html WS/scores/303.json`` replaced the kept score with a page (session 46). ``suffixes``: an existing
    file is replaced only if its name ends in one of them (--html: .html, .htm). ``beside``: the suffixes of
    the files written beside it (--report: its rows .json and plot .png), checked against the records too."""
    import tempfile

    if path.is_dir():
        raise InputError(f"{option} is a folder; give the report's file name", path)
    if workspace is not None:
        root = Path(workspace.root).resolve()
        for target in (Path(path), *(Path(path).with_suffix(s) for s in beside)):
            resolved = target.resolve()
            for name in WORKSPACE_RECORDS:
                if resolved == root / name or resolved.is_relative_to(root / name):
                    what = option if target == Path(path) else f"{option} writes {target.name} beside it, which"
                    where = (f"is the workspace's own {name}" if "." in name else
                             f"is inside the workspace's {name}/ (its own records)")
                    raise InputError(f"{what} {where}: write it elsewhere, e.g. in the workspace's reports/ folder",
                                     path)
    if suffixes and (path.exists() or path.is_symlink()) and path.suffix.lower() not in suffixes:
        raise InputError(f"{option} names an existing file that is not a {'/'.join(suffixes)} page: it is kept; give "
                         "another name", path)
    folder = path.parent
    while creates_folder and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{option}: the folder {folder} {'is not a folder' if folder.exists() else 'does not exist'}",
                         path)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mllmdr-", suffix=".probe"):
            pass
    except OSError as err:
        raise InputError(f"{option}: cannot write in the folder {folder} ({err.strerror or err})", path) from None


def _print_score(view: dict) -> None:
    """The scores on the terminal; model output, wording and paths as text (never markup or terminal controls)."""
    from mllm_dr.onnx_engine import engine_label
    from mllm_dr.scoring import regression_text

    if view.get("safety_alert"):        # before anything else (session 46): a PHQ-9 item 9 score above 0
        console.print(f"[bold red]SAFETY ALERT: {safe_text(view['safety_alert'])}[/bold red]", highlight=False)
    console.print(f"[bold]{safe_text(view['disclaimer'])}[/bold]")
    table = Table(title=safe_text(f"participant {view['participant']} ({view['questionnaire']})"
                                  + (" [TEST MODEL]" if "warning" in view else "")))
    for col in ("item", "score", "source", "rationale"):
        table.add_column(col, overflow="fold")
    for it in view["items"]:
        source = (it["source"] if it["source"] == "generated" else
                  f"regression head ({regression_text(it['regression_score'])})")    # the figure its score rounds
        table.add_row(f"[bold]{safe_text(it['item'])}[/bold]\n{safe_text(it['wording'])}",
                      safe_text(f"{it['score']}\n{it['response']}"), safe_text(source), safe_text(it["rationale"]))
    console.print(table)
    console.print(f"total [bold]{view['total']}[/bold] of {view['max_total']} ({safe_text(view['band'])}). "
                  f"{safe_text(view['binary_explanation'])}", highlight=False)
    console.print(safe_text(f"scored with engine {engine_label(view['engine'])}; base {view['base_model']}, "
                            f"adapters {view['adapters']}"), highlight=False, soft_wrap=True)
    for w in view["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {safe_text(w)}", highlight=False)
    if not view["training_data"]["in_training_data"]:
        console.print(safe_text(view["training_data"]["note"]), highlight=False)
    if "html" in view:
        console.print(f"HTML report: {safe_text(view['html'])}", highlight=False)
    if "kept_score_sha256" in view:
        console.print(safe_text(f"kept for review: score {view['kept_score_sha256'][:12]} ('mllmdr-site review "
                                f"{view['participant']} --score {view['kept_score_sha256'][:12]}' rates exactly this)"),
                      highlight=False)


def evaluate(workspace: Optional[Path] = WorkspaceOpt,
             split: str = typer.Option("test", "--split"),
             base_model: Optional[str] = typer.Option(None, "--base-model"),
             device: Device = typer.Option(Device.auto, "--device"),
             max_new_tokens: int = typer.Option(DEFAULT_SCORING.max_new_tokens, "--max-new-tokens", min=8),
             adapters: Adapters = typer.Option(Adapters.auto, "--adapters", help="auto: federated if present, else local."),
             report: Optional[Path] = typer.Option(None, "--report", help="Markdown report path (default: workspace/reports/)."),
             engine: Engine = EngineOpt,
             json_out: bool = typer.Option(False, "--json")):
    """CCC, RMSE, MAE, P/R/F1 and format-violation rate on participant totals of a split.

    Example: mllmdr-site evaluate --workspace /srv/mllmdr --split test --json
    """
    from mllm_dr import phq
    from mllm_dr.base_model import pick_device
    from mllm_dr.dataset import load_corpus
    from mllm_dr.evaluation import evaluate_split, save_evaluation
    from mllm_dr.onnx_engine import check_engine, engine_label, make_engine
    from mllm_dr.reports import check_report_path, report_warnings
    from mllm_dr.workspace import resolve_workspace, stale_note

    from mllm_dr.dataset import TRAINING_SPLITS

    load_on = pick_device(check_engine(engine.value, device.value))     # the ONNX engines load on cpu
    if split not in (*TRAINING_SPLITS, "test"):              # it also names the report file
        raise InputError(f"--split {split!r}: one of {', '.join((*TRAINING_SPLITS, 'test'))}")
    set_threads()
    ws = resolve_workspace(workspace)
    if report is not None:            # the rows go to <report>.json and the plot to <report>.png beside it
        check_report_path(report)
        check_writable(report, "--report", creates_folder=True, workspace=ws, beside=(".json", ".png"))
    kind, folder = adapter_choice(ws, adapters)
    stale = [f"stale adapters: {note}"] if (note := stale_note(folder)) else []
    if split in TRAINING_SPLITS:
        stale.append(f"the {split} split is training data (every trainer learns from {' and '.join(TRAINING_SPLITS)}): "
                     f"these figures are not held out; --split test is")
    sm = load_model(ws, kind, base_model, load_on)      # the adapters chosen above
    with progress() as bar:
        eng = make_engine(engine.value, sm, ws.checkpoints_dir / "onnx", progress=progress_callback(bar))
        result = evaluate_split(ws, sm, split, max_new_tokens, progress_callback(bar), eng)
    if not result.rows:
        raise InputError(f"no participants with a known total in split {split!r}", ws.config.corpus_path)
    metrics = result.metrics()
    path, rows_path = save_evaluation(          # audited first (session 44)
        ws.audit_path, "evaluate", report or ws.root / "reports" / f"evaluate-{split}.md", result,
        f"{ws.config.site_id}: {split} split", {"split": split, "adapters": sm.version, "engine": engine.value},
        dict(max_total=phq.max_total(len(load_corpus(ws).item_names)), model=sm.info.name, adapters=sm.version,
             test_model=sm.info.is_test_model, warnings=stale, engine=engine.value),
        split=split, n=result.stats.n, adapter_version=sm.version, engine=engine.value)
    warnings = report_warnings(metrics["n"], sm.info.is_test_model) + stale
    if json_out:
        emit_json(metrics | {"engine": engine.value, "report": str(path), "rows": str(rows_path), "warnings": warnings})
    else:
        console.print(safe_text(metrics_line(metrics)), highlight=False)
        for w in warnings:
            console.print(f"[yellow]warning:[/yellow] {safe_text(w)}", highlight=False)
        console.print(safe_text(f"engine {engine_label(engine.value)}; report: {path}; per-participant rows: "
                                f"{rows_path}"))


def adapter_choice(ws, adapters: Adapters) -> tuple[str, Path]:
    """Which adapters a command uses: ("federated" | "local", their folder); ``auto`` by the rule `status`
    reports (``site_status.auto_adapters``)."""
    from mllm_dr.site_status import adapter_folders, auto_adapters

    if adapters == Adapters.auto:
        return auto_adapters(ws)
    fed, local = adapter_folders(ws)            # a swap cut short: the version set aside, not "none"
    return ("federated", fed) if adapters == Adapters.federated else ("local", local)


def load_model(ws, adapters: Adapters | str, base_model, device):
    """Federated adapters (verified against the center's key) or this site's local ones -> SiteModel.

    ``adapters``: the kind ``adapter_choice`` returned (pass it, so what is loaded is what was chosen and
    described, even when a federated round lands in between), or ``auto``, chosen here."""
    from mllm_dr.federated import load_federated
    from mllm_dr.local_run import load_trained

    kind = adapter_choice(ws, adapters)[0] if adapters == Adapters.auto else Adapters(adapters).value
    if kind == "federated":
        return load_federated(ws, base_model, device)
    return load_trained(ws, base_model, device)
