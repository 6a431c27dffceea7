"""What every command shares: clean errors, progress bars, JSON output, thread settings."""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mllm_dr.errors import MllmDrError, operator_os_error

err_console = Console(stderr=True)
console = Console()

WORKSPACE_HELP = "Site workspace folder (or set MLLMDR_WORKSPACE)."
WorkspaceOpt = typer.Option(None, "--workspace", "-w", help=WORKSPACE_HELP, envvar="MLLMDR_WORKSPACE")
DirOpt = typer.Option(..., "--dir", "-d", help="Center folder (PKI, keys, runs).", envvar="MLLMDR_CENTER")


def center_dir(path: Path):
    from mllm_dr.center import CenterDir

    return CenterDir(path)


def quiet_libraries() -> None:
    """Hide library progress bars and warnings that mean nothing to a site operator."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("BNB_BACKEND", "CPU")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)       # library deprecation notices
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def set_threads() -> None:
    """Use the machine's cores for torch, not more (oversubscription is slow on small machines)."""
    import torch

    n = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(max(n, 1))


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False)


def progress_callback(bar: Progress):
    """The library's ``progress(description, advance, total)`` convention on a rich progress bar."""
    task = None

    def update(description: str, advance: int, total: int) -> None:
        nonlocal task
        if total:
            task = bar.add_task(description, total=total)
        elif task is not None:
            bar.advance(task, advance)

    return update


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def hold_foreground(pid: int, what: str, log: Path, stop: Callable[[], object]) -> None:
    """Keep a background service in the foreground until it dies or Ctrl-C; always stop it."""
    import time

    from mllm_dr.errors import InputError
    from mllm_dr.processes import alive

    console.print(f"{what} (pid {pid}). Ctrl-C stops it.")
    try:
        while alive(pid):
            time.sleep(1)
        raise InputError(f"{what.split(' ')[0]} exited; see its log", log)
    finally:
        stop()


def run_app(app: typer.Typer) -> Callable[[], None]:
    """Entry point wrapper: known errors become one line; unknown ones a line plus a saved traceback."""

    def main() -> None:
        quiet_libraries()
        try:
            _call(app)
        except MllmDrError as err:
            err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise SystemExit(2) from None
        except (KeyboardInterrupt, SystemExit) as exc:   # Typer turns Ctrl-C into a silent exit 130
            if not _interrupted(exc):
                raise
            err_console.print("[yellow]interrupted[/yellow]; completed work is kept and the next run resumes")
            raise SystemExit(130) from None
        except Exception as err:  # a bug: say so in one line and keep the details in a file
            log = Path(os.environ.get("TMPDIR", "/tmp")) / f"mllmdr-error-{datetime.now():%Y%m%d-%H%M%S}.log"
            log.write_text(traceback.format_exc())
            err_console.print(f"[red]internal error:[/red] {type(err).__name__}: {err} (traceback saved to {log})",
                              highlight=False, soft_wrap=True)
            raise SystemExit(3) from None

    return main


def _call(app: typer.Typer) -> None:
    """Run the app; an OSError the operator can act on (permissions, full or read-only disk, a missing
    path) becomes a one-line error naming the path (exit 2); any other stays a bug report."""
    try:
        app()
    except OSError as err:
        known = operator_os_error(err)
        if known is None:
            raise
        raise known from None


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, directly or as the cause of the exit Typer/Click make of it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def version_option():
    """``--version`` on a CLI's root: prints the kit version and exits."""

    def show(value: bool) -> None:
        if value:
            from mllm_dr import __version__

            console.print(__version__)
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True, help="Print the kit version and exit.")
