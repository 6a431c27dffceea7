"""mllmdr-site: what a hospital site runs. Everything it reads and writes stays on site."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import WORKSPACE_HELP, console, emit_json, err_console, hold_foreground, progress, run_app, set_threads
from mllm_dr import audit
from mllm_dr.errors import InputError

app = typer.Typer(help="MLlm-DR site tools: data, features, rationales, local training and scoring.\n\n"
                       "Example: mllmdr-site init --workspace /srv/mllmdr --site-id hospital-a",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Check corpora and write synthetic ones.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _audit_log(workspace):
    from mllm_dr.workspace import resolve_workspace

    return resolve_workspace(workspace).audit_path


from cli.audit_cmds import audit_app  # noqa: E402

app.add_typer(audit_app(_audit_log, typer.Option(None, "--workspace", "-w", help=WORKSPACE_HELP,
                                                 envvar="MLLMDR_WORKSPACE"), "mllmdr-site", "--workspace /srv/mllmdr"),
              name="audit")


class Fmt(str, Enum):
    auto = "auto"
    edaic = "edaic"
    daic = "daic"
    cmdc = "cmdc"


class SynthText(str, Enum):
    template = "template"
    free = "free"


class SynthFmt(str, Enum):
    edaic = "edaic"
    daic = "daic"
    cmdc = "cmdc"


class Adapters(str, Enum):
    auto = "auto"
    local = "local"
    federated = "federated"


WorkspaceOpt = typer.Option(None, "--workspace", "-w", help=WORKSPACE_HELP, envvar="MLLMDR_WORKSPACE")


# ----------------------------------------------------------------------------- data
@data_app.command("check")
def data_check(path: Path = typer.Argument(..., help="Corpus folder."),
               format: Fmt = typer.Option(Fmt.auto, "--format", "-f", help="Corpus layout; auto detects."),
               json_out: bool = typer.Option(False, "--json", help="Machine-readable report on stdout.")):
    """Validate a corpus as distributed and report labels, modalities and problems.

    Example: mllmdr-site data check /data/E-DAIC --json
    """
    from mllm_dr.corpus import read_corpus

    corpus = read_corpus(path, format.value)
    report = corpus.to_report()
    if json_out:
        emit_json(report)
        return
    table = Table(title=f"{corpus.format} corpus at {path}")
    for col in ("id", "split", "total", "binary", "text", "audio", "visual", "turns", "unknown items"):
        table.add_column(col)
    for p in report["participants"]:
        m = p["modalities"]
        table.add_row(p["id"], str(p["split"]), str(p["total"]), str(p["binary"]), *(("yes" if m[k] else "-") for k in ("text", "audio", "visual")),
                      str(p["turns"]), str(sum(v is None for v in p["items"].values())))
    console.print(table)
    console.print(f"{len(report['participants'])} participants, {len(report['problems'])} problems")
    for prob in report["problems"]:
        console.print(f"  [yellow]problem[/yellow] {prob['path']}: {prob['message']}", highlight=False)


@data_app.command("synth")
def data_synth(out: Path = typer.Argument(..., help="Folder to write site1 .. siteK into."),
               format: SynthFmt = typer.Option(SynthFmt.edaic, "--format", "-f"),
               participants: int = typer.Option(24, "--participants", "-n", min=1, help="Participants in total."),
               sites: int = typer.Option(3, "--sites", "-k", min=1),
               seed: int = typer.Option(0, "--seed"),
               seconds: float = typer.Option(6.0, "--seconds", min=0.5, help="Audio/video length per participant."),
               text: SynthText = typer.Option(SynthText.template, "--text", help="template: one sentence per item "
                                              "score; free: paraphrases, hedges, small talk, unasked items."),
               json_out: bool = typer.Option(False, "--json")):
    """Write a synthetic multi-site corpus in a real layout (NOT clinical data).

    Example: mllmdr-site data synth /tmp/synth --format edaic --participants 24 --sites 3 --seed 0
    """
    from mllm_dr.synth import SynthConfig, write_synthetic

    if participants < sites:
        raise InputError(f"--participants ({participants}) must be at least --sites ({sites})")
    with progress() as bar:
        task = bar.add_task("writing sites", total=1)
        paths = write_synthetic(SynthConfig(out, format.value, participants, sites, seed, seconds, text=text.value))
        bar.update(task, completed=1)
    if json_out:
        emit_json({"sites": [str(p) for p in paths], "format": format.value, "text": text.value})
    else:
        for p in paths:
            console.print(f"wrote {p}")


# ----------------------------------------------------------------------------- workspace
@app.command()
def init(workspace: Path = typer.Option(..., "--workspace", "-w", help=WORKSPACE_HELP, envvar="MLLMDR_WORKSPACE"),
         site_id: str = typer.Option(..., "--site-id", help="This site's name in the federation."),
         json_out: bool = typer.Option(False, "--json")):
    """Create a site workspace (config, feature store, checkpoints, audit log, keys).

    Example: mllmdr-site init --workspace /srv/mllmdr --site-id hospital-a
    """
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(workspace, site_id)
    audit.append(ws.audit_path, "init", site=site_id)
    if json_out:
        emit_json({"workspace": str(ws.root), "site_id": site_id})
    else:
        console.print(f"workspace for [bold]{site_id}[/bold] created at {ws.root}")


@app.command()
def extract(workspace: Optional[Path] = WorkspaceOpt,
            corpus: Path = typer.Option(..., "--corpus", "-c", help="The site's corpus folder."),
            format: Fmt = typer.Option(Fmt.auto, "--format", "-f"),
            hubert: Optional[Path] = typer.Option(None, "--hubert", help="Local HuBERT checkpoint folder (else openSMILE eGeMAPS)."),
            json_out: bool = typer.Option(False, "--json")):
    """Extract audio and visual features into the workspace's feature store (resumable).

    Example: mllmdr-site extract --workspace /srv/mllmdr --corpus /data/E-DAIC
    """
    from mllm_dr.corpus import read_corpus
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.workspace import resolve_workspace

    set_threads()
    ws = resolve_workspace(workspace)
    c = read_corpus(corpus, format.value)
    ws.config.corpus_path, ws.config.corpus_format = str(Path(corpus).resolve()), c.format
    if hubert:
        ws.config.extraction.hubert_path = str(Path(hubert).resolve())
        ws.config.extraction.audio_source = "hubert"
    ws.save()
    store = FeatureStore(ws.features_dir)
    with progress() as bar:
        task = bar.add_task("extracting features", total=len(c.participants))
        report = extract_corpus(c, store, ws.config.extraction, lambda pid, what: bar.advance(task))
    audit.append(ws.audit_path, "extract", corpus_format=c.format, extracted=len(report.extracted),
                 skipped=len(report.skipped), problems=len(report.problems))
    summary = {"extracted": report.extracted, "skipped": report.skipped, "dims": store.dims(),
               "seconds": round(report.seconds, 2), "real_time_factor": report.real_time_factor,
               "bytes_per_participant": _mean([e["bytes"] for e in store.manifest["participants"].values()]),
               "problems": [p.to_dict() for p in c.problems + report.problems]}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"extracted {len(report.extracted)}, already current {len(report.skipped)}; dims {store.dims()}; "
                      f"{summary['bytes_per_participant']:.0f} bytes/participant")
        if report.real_time_factor:
            console.print(f"acoustic extractor real-time factor {report.real_time_factor:.3f}")
        for prob in summary["problems"]:
            console.print(f"  [yellow]note[/yellow] {prob['path']}: {prob['message']}", highlight=False)


@app.command()
def rationales(workspace: Optional[Path] = WorkspaceOpt,
               teacher_url: Optional[str] = typer.Option(None, "--teacher-url", help="OpenAI-compatible endpoint on the hospital network."),
               teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="Model name at --teacher-url."),
               teacher_path: Optional[Path] = typer.Option(None, "--teacher-path", help="Local Hugging Face model folder."),
               retries: int = typer.Option(2, "--retries", min=0),
               max_new_tokens: int = typer.Option(40, "--max-new-tokens", min=8),
               json_out: bool = typer.Option(False, "--json")):
    """Ask a teacher for rationales of the true item scores (paper section 3.1); resumable.

    Without a teacher option the embedded base model is used with the result pre-filled.
    Test-split participants are never used.

    Example: mllmdr-site rationales --workspace /srv/mllmdr --teacher-url http://llm.hospital.local/v1 --teacher-model llama3
    """
    from mllm_dr.rationales import LocalTeacher, OpenAICompatibleTeacher, build_rationales, rationale_paths, write_jsonl
    from mllm_dr.workspace import read_jsonl, resolve_workspace

    set_threads()
    ws = resolve_workspace(workspace)
    if bool(teacher_url) != bool(teacher_model):
        raise InputError("--teacher-url and --teacher-model go together")
    if teacher_url and teacher_path:
        raise InputError("choose either --teacher-url or --teacher-path")
    corpus, instances = _training_instances(ws)
    ok_path, rej_path = rationale_paths(ws.rationales_dir)
    accepted, rejects = read_jsonl(ok_path), read_jsonl(rej_path)
    done = {(r["participant"], r["item"]) for r in accepted} | {(r["participant"], r["item"]) for r in rejects if r.get("final")}
    todo = [i for i in instances if (i.participant, i.item) not in done]
    if teacher_url:
        teacher = OpenAICompatibleTeacher(teacher_url, teacher_model)
    else:
        from mllm_dr.base_model import load_base

        model, tok, info = load_base(str(teacher_path) if teacher_path else "smollm2")
        teacher = LocalTeacher(model, tok, f"local:{info.name}" + ("" if teacher_path else "+prefilled"),
                               prefill=teacher_path is None, max_new_tokens=max_new_tokens)
    by_participant: dict[str, list] = {}
    for inst in todo:
        by_participant.setdefault(inst.participant, []).append(inst)
    n_ok = n_total = n_first = 0
    with progress() as bar:
        task = bar.add_task("rationales", total=len(todo))
        for pid, insts in by_participant.items():
            res = build_rationales(teacher, insts, retries=retries, batch_size=len(insts))
            failed = {(i.participant, i.item) for i in insts} - {(a["participant"], a["item"]) for a in res.accepted}
            for r in res.rejects:
                r["final"] = (r["participant"], r["item"]) in failed and r["attempt"] == retries + 1
            accepted += res.accepted
            rejects += res.rejects
            write_jsonl(ok_path, accepted)   # after each participant: an interruption loses at most one
            write_jsonl(rej_path, rejects)
            n_ok, n_total, n_first = n_ok + len(res.accepted), n_total + res.total, n_first + res.first_try_accepted
            bar.advance(task, len(insts))
    audit.append(ws.audit_path, "rationales", teacher=teacher.name, instances=n_total, accepted=n_ok)
    summary = {"teacher": teacher.name, "instances": n_total, "accepted": n_ok, "first_try_accepted": n_first,
               "acceptance_rate": (n_ok / n_total) if n_total else None, "already_done": len(done),
               "rationales_file": str(ok_path), "rejects_file": str(rej_path)}
    if json_out:
        emit_json(summary)
    else:
        rate = f"{100 * n_ok / n_total:.0f}%" if n_total else "n/a"
        console.print(f"{n_ok}/{n_total} rationales accepted ({rate}), {n_first} on the first try; "
                      f"{len(done)} were already done. Written to {ok_path}")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class _Bar:
    """Adapter from mllm_dr's (description, advance, total) callbacks to a rich progress bar."""

    def __init__(self, bar):
        self.bar, self.task = bar, None

    def __call__(self, desc: str, advance: int, total: int) -> None:
        if total:
            self.task = self.bar.add_task(desc, total=total)
        elif self.task is not None:
            self.bar.advance(self.task, advance)


@app.command()
def train(workspace: Optional[Path] = WorkspaceOpt,
          local: bool = typer.Option(False, "--local", help="Train on this site's data only (no federation)."),
          base_model: str = typer.Option("smollm2", "--base-model", help="smollm2 | tiny-random (tests only) | local HF folder."),
          load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="bitsandbytes nf4 (GPU sites)."),
          device: Device = typer.Option(Device.auto, "--device"),
          stage1_epochs: int = typer.Option(1, "--stage1-epochs", min=0),
          stage2_epochs: int = typer.Option(2, "--stage2-epochs", min=0),
          batch_size: int = typer.Option(4, "--batch-size", min=1),
          no_joint: bool = typer.Option(False, "--no-joint", help="Ablation: L_lm only, no MAA loss."),
          no_lq: bool = typer.Option(False, "--no-lq", help="Ablation / text-only LoRA: no audio or video."),
          no_audio: bool = typer.Option(False, "--no-audio", help="Ablation: no audio LQ-former."),
          no_visual: bool = typer.Option(False, "--no-visual", help="Ablation: no visual LQ-former."),
          zero_shot: bool = typer.Option(False, "--zero-shot", help="Baseline: base model, no training."),
          moving_weight: bool = typer.Option(False, "--moving-weight", help="The authors' alpha*L_lm+(1-alpha)*L_mse."),
          resume: bool = typer.Option(False, "--resume", help="Continue from the last epoch checkpoint."),
          federated: bool = typer.Option(False, "--federated", help="Join the federation: start this site's SuperNode."),
          detach: bool = typer.Option(False, "--detach", help="With --federated: return once connected "
                                                               "(stop with 'mllmdr-site stop')."),
          lora_rank: Optional[int] = typer.Option(None, "--lora-rank", min=1,
                                                  help="With --federated: train LoRA at this rank (exact-lora runs)."),
          json_out: bool = typer.Option(False, "--json")):
    """Train LQ-formers (stage 1), then LoRA + MAA (stage 2), alone (--local) or federated (--federated).

    --local trains on this site's data only; --federated starts this site's SuperNode and the center
    drives rounds and stages.

    Example: mllmdr-site train --workspace /srv/mllmdr --local --stage1-epochs 1 --stage2-epochs 2
    Example: mllmdr-site train --workspace /srv/mllmdr --federated --detach
    """
    from mllm_dr.base_model import pick_device
    from mllm_dr.local_run import train_local
    from mllm_dr.model import ModelOptions
    from mllm_dr.training import TrainConfig
    from mllm_dr.workspace import resolve_workspace

    if local == federated:
        raise InputError("choose one of --local or --federated")
    if federated:
        return _train_federated(workspace, base_model if base_model != "smollm2" else None, lora_rank, detach, json_out)
    set_threads()
    ws = resolve_workspace(workspace)
    opts = ModelOptions(use_audio=not (no_lq or no_audio), use_visual=not (no_lq or no_visual))
    cfg = TrainConfig(stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs, batch_size=batch_size,
                      joint=not no_joint, moving_weight=moving_weight)
    with progress() as bar:
        result = train_local(ws, base_model, opts, cfg, pick_device(device.value), load_in_4bit, resume, zero_shot, _Bar(bar))
    audit.append(ws.audit_path, "train", mode="local", base_model=result["base_model"],
                 adapter_version=result["adapter_version"], instances=result["train_instances"])
    if json_out:
        emit_json(result)
    else:
        console.print(f"trained in {result['seconds']:.0f} s; adapters {result['adapter_version']} "
                      f"({result['adapter_bytes'] / 1e6:.1f} MB) in {ws.checkpoints_dir / 'local' / 'latest'}")


@app.command()
def score(participant: str = typer.Argument(..., help="Participant id as in the corpus (303, HC01)."),
          workspace: Optional[Path] = WorkspaceOpt,
          base_model: Optional[str] = typer.Option(None, "--base-model", help="Defaults to the adapters' base."),
          device: Device = typer.Option(Device.auto, "--device"),
          max_new_tokens: int = typer.Option(80, "--max-new-tokens", min=8),
          user: Optional[str] = typer.Option(None, "--user", help="Clinician id for the audit log (default: $USER)."),
          adapters: Adapters = typer.Option(Adapters.auto, "--adapters", help="auto: federated if this site has "
                                            "taken part in a run, else local."),
          json_out: bool = typer.Option(False, "--json")):
    """Score every PHQ item of one participant with a rationale; total, band, binary call.

    Example: mllmdr-site score 303 --workspace /srv/mllmdr --json
    """
    from mllm_dr.base_model import pick_device
    from mllm_dr.local_run import score_participant
    from mllm_dr.workspace import resolve_workspace

    set_threads()
    ws = resolve_workspace(workspace)
    model, info, meta = _load_model(ws, adapters, base_model, pick_device(device.value))
    result = score_participant(ws, model, info, meta, participant, max_new_tokens)
    audit.append(ws.audit_path, "score", actor=user, participant=participant, adapter_version=meta["version"],
                 base_model=info.name)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"participant {participant}" + (" [TEST MODEL]" if info.is_test_model else ""))
    for col in ("item", "score", "source", "rationale"):
        table.add_column(col, overflow="fold")
    for it in result["items"]:
        table.add_row(it["item"], str(it["score"]), it["source"], escape(it["rationale"]))   # text, not markup
    console.print(table)
    console.print(f"total [bold]{result['total']}[/bold] ({result['band']}); binary call "
                  f"{'depressed (>= 10)' if result['binary'] else 'not depressed (< 10)'}")


@app.command()
def evaluate(workspace: Optional[Path] = WorkspaceOpt,
             split: str = typer.Option("test", "--split"),
             base_model: Optional[str] = typer.Option(None, "--base-model"),
             device: Device = typer.Option(Device.auto, "--device"),
             max_new_tokens: int = typer.Option(80, "--max-new-tokens", min=8),
             adapters: Adapters = typer.Option(Adapters.auto, "--adapters", help="auto: federated if present, else local."),
             report: Optional[Path] = typer.Option(None, "--report", help="Markdown report path (default: workspace/reports/)."),
             json_out: bool = typer.Option(False, "--json")):
    """CCC, RMSE, MAE, P/R/F1 and format-violation rate on participant totals of a split.

    Example: mllmdr-site evaluate --workspace /srv/mllmdr --split test --json
    """
    from mllm_dr.base_model import pick_device
    from mllm_dr.local_run import evaluate as run_eval, write_report
    from mllm_dr.workspace import resolve_workspace

    set_threads()
    ws = resolve_workspace(workspace)
    model, info, meta = _load_model(ws, adapters, base_model, pick_device(device.value))
    with progress() as bar:
        metrics, rows, _ = run_eval(ws, model, info, meta, split, max_new_tokens, _Bar(bar))
    path = write_report(report or ws.root / "reports" / f"evaluate-{split}.md", metrics, rows,
                        f"{ws.config.site_id}: {split} split, base {info.name}")
    audit.append(ws.audit_path, "evaluate", split=split, n=metrics["n"], adapter_version=meta["version"])
    if json_out:
        emit_json(metrics | {"report": str(path)})
    else:
        console.print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        console.print(f"report: {path}")


def _load_model(ws, adapters: "Adapters", base_model, device):
    """Federated adapters (verified against the center's key) or this site's local ones."""
    from mllm_dr.federated import federated_dir, load_federated
    from mllm_dr.local_run import load_trained

    use_fed = adapters == Adapters.federated or (adapters == Adapters.auto and (federated_dir(ws) / "latest").is_dir())
    if use_fed:
        return load_federated(ws, base_model, device)
    return load_trained(ws, base_model, device)


# ----------------------------------------------------------------------------- clinician review
@app.command()
def review(participant: str = typer.Argument(..., help="Participant id to review, or 'stats' for the summary."),
           workspace: Optional[Path] = WorkspaceOpt,
           reviewer: Optional[str] = typer.Option(None, "--reviewer", help="Clinician id (default: $USER)."),
           ratings: Optional[str] = typer.Option(None, "--ratings", help="Non-interactive: one of 3/2/1 per item, "
                                                 "comma separated, in the order shown."),
           corrections: Optional[str] = typer.Option(None, "--corrections", help="Non-interactive: ITEM=score,..."),
           adapters: Adapters = typer.Option(Adapters.auto, "--adapters"),
           max_new_tokens: int = typer.Option(80, "--max-new-tokens", min=8),
           json_out: bool = typer.Option(False, "--json")):
    """Review a participant's item scores and rationales beside the interview excerpt each rests on;
    rate each rationale 3 (fully agree) / 2 (reasonable) / 1 (disagree), optionally correct the score.
    'review stats' prints the paper's Table 7 figures over all reviews.

    Example: mllmdr-site review 303 --workspace /srv/mllmdr
    Example: mllmdr-site review stats --workspace /srv/mllmdr --json
    """
    import os

    from rich.panel import Panel
    from rich.columns import Columns

    from mllm_dr.base_model import pick_device
    from mllm_dr.dataset import instances_by_split
    from mllm_dr.local_run import score_participant
    from mllm_dr.review import (RATINGS, ItemReview, Review, load_reviews, parse_corrections, parse_ratings,
                                review_stats, save_review)
    from mllm_dr.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    if participant == "stats":
        stats = review_stats(load_reviews(ws.root))
        if json_out:
            emit_json(stats)
            return
        table = Table(title=f"clinician reviews at {ws.config.site_id} (paper Table 7)")
        table.add_column("figure")
        table.add_column("value")
        for k, v in stats.items():
            table.add_row(k, json.dumps(v) if isinstance(v, dict) else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        console.print(table)
        return
    set_threads()
    model, info, meta = _load_model(ws, adapters, None, pick_device("auto"))
    result = score_participant(ws, model, info, meta, participant, max_new_tokens)
    excerpts = {i.item: i for i in instances_by_split(ws, ("train", "dev", "test")) if i.participant == participant}
    items = [it["item"] for it in result["items"]]
    given = parse_ratings(ratings, items) if ratings else None
    fixes = parse_corrections(corrections, items)
    reviewed = []
    for k, it in enumerate(result["items"]):
        inst = excerpts.get(it["item"])
        quote = (inst.evidence or "") if inst else ""
        dialogue = inst.dialogue[-600:] if inst else ""
        if not json_out:
            console.print(Columns([
                Panel(f"[bold]score {it['score']}[/bold] ({it['source']})\n\n{escape(it['rationale'])}",
                      title=it["item"], width=60),
                Panel((f'[yellow]"{escape(quote)}"[/yellow]\n\n' if quote else "") + f"[dim]...{escape(dialogue)}[/dim]",
                      title="interview excerpt", width=70)]))
        if given is not None:
            rating = given[k]
        elif os.isatty(0):
            rating = typer.prompt("rating: 3 fully agree / 2 reasonable / 1 disagree", type=click_choice(("3", "2", "1")))
            rating = int(rating)
            fix = typer.prompt("corrected score (Enter keeps the model's)", default="", show_default=False)
            if fix.strip():
                fixes[it["item"]] = int(fix) if fix.strip() in ("0", "1", "2", "3") else fixes.get(it["item"])
        else:
            raise InputError("not a terminal: pass --ratings (and optionally --corrections)")
        reviewed.append(ItemReview(item=it["item"], model_score=it["score"], source=it["source"], rating=rating,
                                   corrected_score=fixes.get(it["item"])))
    rev = Review(participant=participant, reviewer=reviewer or os.environ.get("USER", "unknown"),
                 adapters=result["adapters"], items=reviewed)
    save_review(ws.root, rev)
    audit.append(ws.audit_path, "review", actor=rev.reviewer, participant=participant, adapter_version=rev.adapters,
                 items=len(reviewed), corrected=sum(i.corrected_score is not None for i in reviewed))
    summary = {"participant": participant, "reviewer": rev.reviewer, "items": len(reviewed),
               "ratings": {RATINGS[k]: sum(i.rating == k for i in reviewed) for k in (3, 2, 1)},
               "model_total": sum(i.model_score for i in reviewed),
               "clinician_total": sum(i.clinician_score for i in reviewed)}
    emit_json(summary) if json_out else console.print(" ".join(f"{k}={v}" for k, v in summary.items()))


def click_choice(values):
    import click

    return click.Choice(values)


# ----------------------------------------------------------------------------- policy
policy_app = typer.Typer(help="The site's policy (egress allow-list, DP, secure aggregation, limits).",
                         no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("show")
def policy_show(workspace: Optional[Path] = WorkspaceOpt, json_out: bool = typer.Option(False, "--json")):
    """Print the policy in force (workspace policy.json, else the default) and where it comes from.

    Example: mllmdr-site policy show --workspace /srv/mllmdr --json
    """
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.workspace import resolve_workspace
    from policies.schema import default_policy_path
    from policies.site import site_policy, site_policy_path

    ws = resolve_workspace(workspace)
    pol = site_policy(ws)
    src = site_policy_path(ws) or default_policy_path()
    spent = PrivacyLedger(ws.root / "privacy.json").spent(pol.dp.delta)
    if json_out:
        emit_json({"source": str(src), "policy": pol.model_dump(), "epsilon_spent": spent})
        return
    console.print(f"policy from {src}")
    console.print_json(pol.model_dump_json())
    console.print(f"epsilon spent so far: {spent:.3f} (delta {pol.dp.delta:g}, budget {pol.dp.epsilon_budget:g})")


@policy_app.command("check")
def policy_check(workspace: Optional[Path] = WorkspaceOpt,
                 against: Optional[Path] = typer.Option(None, "--against", help="A run's policy file: would this "
                                                        "site join a run with it?"),
                 json_out: bool = typer.Option(False, "--json")):
    """Validate the site's policy file (exit 2 naming the field when invalid); with --against, say
    whether a run with that policy would be joined or refused, and why.

    Example: mllmdr-site policy check --workspace /srv/mllmdr --against center-policy.json
    """
    from mllm_dr.workspace import resolve_workspace
    from policies.schema import load_policy
    from policies.site import site_policy

    ws = resolve_workspace(workspace)
    mine = site_policy(ws)
    reasons = load_policy(against).weaker_than(mine) if against else []
    res = {"valid": True, "joins": not reasons, "reasons": reasons}
    if json_out:
        emit_json(res)
    else:
        console.print("policy valid" + ("" if not against else ("; would join" if not reasons else
                                                                 "; would REFUSE: " + "; ".join(reasons))))
    if reasons:
        raise SystemExit(1)


# ----------------------------------------------------------------------------- federation
@app.command()
def enroll(workspace: Optional[Path] = WorkspaceOpt,
           out: Optional[Path] = typer.Option(None, "--out", help="Write an enrollment request (public key only)."),
           accept: Optional[Path] = typer.Option(None, "--accept", help="Install the center's bundle."),
           supernode_port: Optional[int] = typer.Option(None, "--supernode-port", min=1024, max=65535,
                                                        help="Local port of this site's SuperNode (default 9094)."),
           json_out: bool = typer.Option(False, "--json")):
    """Join a federation: make a request for the center, then install the center's answer.

    The node key (P-384, OpenSSH) is created once in the workspace's keys/ and never leaves it.

    Example: mllmdr-site enroll --workspace /srv/mllmdr --out site-a.request.json
    Example: mllmdr-site enroll --workspace /srv/mllmdr --accept site-a.bundle.json
    """
    from mllm_dr.enrollment import install_bundle, make_request
    from mllm_dr.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    if (out is None) == (accept is None):
        raise InputError("give exactly one of --out REQUEST or --accept BUNDLE")
    if out is not None:
        req = make_request(ws, out)
        audit.append(ws.audit_path, "enroll_request", fingerprint=req.fingerprint)
        result = {"request": str(out), "site_id": req.site_id, "fingerprint": req.fingerprint}
    else:
        fed = install_bundle(ws, accept, supernode_port)
        audit.append(ws.audit_path, "enroll_accept", center=fed.center_fingerprint, superlink=fed.superlink_address)
        result = {"site_id": ws.config.site_id, "superlink": fed.superlink_address, "center": fed.center_fingerprint,
                  "supernode_port": fed.supernode_port}
    if json_out:
        emit_json(result)
    else:
        console.print(" ".join(f"{k}={v}" for k, v in result.items()))


def _train_federated(workspace, base_model, lora_rank, detach: bool, json_out: bool):
    from fl_client.supernode import logfile, start_supernode, stop_supernode
    from mllm_dr.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    with err_console.status(f"connecting site {ws.config.site_id} to the center"):
        proc = start_supernode(ws, base_model, lora_rank)
    pid = proc if isinstance(proc, int) else proc.pid
    audit.append(ws.audit_path, "supernode_start", pid=pid)
    info = {"site_id": ws.config.site_id, "pid": pid, "log": str(logfile(ws))}
    if detach:
        emit_json(info) if json_out else console.print(f"SuperNode running (pid {pid}); log {info['log']}; "
                                                      "stop with 'mllmdr-site stop'")
        return
    hold_foreground(pid, "SuperNode connected, waiting for rounds from the center", logfile(ws),
                    lambda: stop_supernode(ws))


@app.command()
def stop(workspace: Optional[Path] = WorkspaceOpt, json_out: bool = typer.Option(False, "--json")):
    """Stop this site's SuperNode (and every process it started).

    Example: mllmdr-site stop --workspace /srv/mllmdr
    """
    from fl_client.supernode import stop_supernode
    from mllm_dr.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    was = stop_supernode(ws)
    audit.append(ws.audit_path, "supernode_stop", was_running=was)
    emit_json({"stopped": was}) if json_out else console.print("stopped" if was else "no SuperNode was running")


def _training_instances(ws):
    """Aspect instances of every labelled, non-test participant (the same split the trainer uses)."""
    from mllm_dr.dataset import instances_by_split, load_corpus

    return load_corpus(ws), [i for i in instances_by_split(ws, ("train", "dev")) if i.label is not None]


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


main = run_app(app)

if __name__ == "__main__":
    main()
