"""`mllmdr-site init | extract | rationales`: a workspace, its features and teacher rationales."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import (WORKSPACE_HELP, WorkspaceOpt, console, emit_json, err_console, progress, progress_callback,
                        safe_text, set_threads)
from cli.site_data import Fmt
from mllm_dr import audit


def init(workspace: Path = typer.Option(..., "--workspace", "-w", help=WORKSPACE_HELP, envvar="MLLMDR_WORKSPACE"),
         site_id: str = typer.Option(..., "--site-id", help="This site's name in the federation."),
         max_context_tokens: Optional[int] = typer.Option(
             None, "--max-context-tokens", help="Dialogue tokens kept per PHQ item before the prompt (default "
             "384): fewer train and score faster and keep less of the interview (the demo uses 256)."),
         json_out: bool = typer.Option(False, "--json")):
    """Create a site workspace (config, feature store, checkpoints, audit log, keys).

    Example: mllmdr-site init --workspace /srv/mllmdr --site-id hospital-a
    """
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(workspace, site_id, max_context_tokens)
    audit.append(ws.audit_path, "init", site=site_id)
    if json_out:
        emit_json({"workspace": str(ws.root), "site_id": site_id,
                   "max_context_tokens": ws.config.max_context_tokens})
    else:
        console.print(f"workspace for [bold]{site_id}[/bold] created at {ws.root}")


def extract(workspace: Optional[Path] = WorkspaceOpt,
            corpus: Path = typer.Option(..., "--corpus", "-c", help="The site's corpus folder."),
            format: Fmt = typer.Option(Fmt.auto, "--format", "-f"),
            hubert: Optional[Path] = typer.Option(None, "--hubert",
                                                  help="Local HuBERT checkpoint folder (else openSMILE eGeMAPS)."),
            strict: bool = typer.Option(True, "--strict/--no-strict",
                                        help="Stop at an unreadable or empty media file or a feature table lacking a "
                                             "column (default). --no-strict records that modality as missing."),
            replace_corpus: bool = typer.Option(False, "--replace-corpus",
                                                help="Switch this workspace to another corpus: features re-extracted, "
                                                     "rationales set aside, trained adapters marked stale (audited)."),
            recipe: Optional[str] = typer.Option(None, "--recipe", help="Feature recipe: 'site' (what the corpus "
                                                 "ships) or 'egemaps-openface' (eGeMAPS from the wav + the OpenFace/"
                                                 "CLNF columns both toolkits share). Default: the enrolled "
                                                 "federation's, else the workspace's."),
            json_out: bool = typer.Option(False, "--json")):
    """Extract audio and visual features into the workspace's feature store (resumable).

    A participant is extracted again when one of its source files changed. One writing command
    at a time per workspace (a lock; a second one is refused, naming the first).

    Example: mllmdr-site extract --workspace /srv/mllmdr --corpus /data/E-DAIC
    Example: mllmdr-site extract --workspace /srv/mllmdr --corpus /data/DAIC-WOZ --recipe egemaps-openface
    """
    from mllm_dr.features.extract import extract_workspace
    from mllm_dr.workspace import resolve_workspace

    set_threads()
    ws = resolve_workspace(workspace)
    with progress() as bar:
        summary = extract_workspace(ws, corpus, format.value, hubert, progress_callback(bar), replace_corpus, strict,
                                    recipe)
    if json_out:
        emit_json(summary)
        return
    console.print(f"extracted {len(summary['extracted'])}, already current {len(summary['skipped'])}"
                  + (f", removed {len(summary['removed'])} no longer in the corpus" if summary["removed"] else "")
                  + f"; dims {summary['dims']}; {summary['bytes_per_participant']:.0f} bytes/participant")
    if summary["real_time_factor"]:
        console.print(f"acoustic extractor real-time factor {summary['real_time_factor']:.3f}")
    for prob in summary["problems"]:
        console.print(f"  [yellow]note[/yellow] {safe_text(prob['path'])}: {safe_text(prob['message'])}", highlight=False)
    for warning in summary["warnings"]:
        err_console.print(f"[yellow]warning:[/yellow] {safe_text(warning)}", highlight=False)


def rationales(workspace: Optional[Path] = WorkspaceOpt,
               teacher_url: Optional[str] = typer.Option(None, "--teacher-url",
                                                         help="OpenAI-compatible endpoint on the hospital network."),
               teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="Model name at --teacher-url."),
               teacher_path: Optional[Path] = typer.Option(None, "--teacher-path", help="Local Hugging Face model folder."),
               teacher_api_key_env: Optional[str] = typer.Option(
                   None, "--teacher-api-key-env", metavar="VAR",
                   help="Name of the environment variable holding the --teacher-url endpoint's API key (sent as "
                        "'Authorization: Bearer'; the key itself is never given on the command line nor written "
                        "anywhere)."),
               retries: int = typer.Option(2, "--retries", min=0),
               max_new_tokens: Optional[int] = typer.Option(
                   None, "--max-new-tokens", min=8, help="The teacher's token limit per answer (default 40 for the "
                   "embedded teacher, 96 for --teacher-path, 200 for --teacher-url: its max_tokens). An answer cut by "
                   "it is rejected."),
               redo: bool = typer.Option(False, "--redo", help="Ask the teacher again for every instance, done or "
                                         "not (a new accepted rationale replaces the earlier one)."),
               json_out: bool = typer.Option(False, "--json")):
    """Ask a teacher for rationales of the true item scores (paper section 3.1); resumable.

    Without a teacher option the embedded base model is used with the result pre-filled.
    Test-split participants are never used. Instances already answered are skipped, except final
    rejects of another teacher (asked again) and everything with --redo.

    Example: mllmdr-site rationales --workspace /srv/mllmdr --teacher-url http://llm.hospital.local/v1 --teacher-model llama3
    Example: mllmdr-site rationales --workspace /srv/mllmdr --teacher-url https://llm.hospital.local/v1 --teacher-model llama3 --teacher-api-key-env LLM_API_KEY
    """
    from mllm_dr.rationales import make_teacher, run_rationales
    from mllm_dr.workspace import resolve_workspace

    set_threads()
    ws = resolve_workspace(workspace)
    teacher = make_teacher(teacher_url, teacher_model, teacher_path, max_new_tokens, teacher_api_key_env)
    with ws.lock("rationales"), progress() as bar:
        summary = run_rationales(ws, teacher, retries, progress_callback(bar), redo=redo)
    audit.append(ws.audit_path, "rationales", teacher=summary["teacher"], instances=summary["instances"],
                 accepted=summary["accepted"], redo=redo)
    if json_out:
        emit_json(summary)
        return
    n_ok, n_total = summary["accepted"], summary["instances"]
    rate = f"{100 * n_ok / n_total:.0f}%" if n_total else "n/a"
    console.print(f"{n_ok}/{n_total} rationales accepted ({rate}), {summary['first_try_accepted']} on the first try; "
                  f"{summary['already_done']} were already done. Written to {summary['rationales_file']}")
