"""What every command shares: clean errors, progress bars, JSON output, thread settings."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mllm_dr.errors import MllmDrError, operator_os_error

err_console = Console(stderr=True, emoji=False)   # no ":ab:" -> emoji in a fingerprint
console = Console(emoji=False)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")    # C0 (but tab and newline), DEL, C1


def safe_text(value) -> str:
    """Text from outside the kit (a path, a message, a transcript, a rationale, a logged string) as rich prints
    it literally: markup escaped, and terminal control characters (ESC sequences, CR, bell, C1) shown as
    ``\\x1b``, never acted on by the terminal."""
    return escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))


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


class LogProgress(Progress):
    """rich's bars on a terminal; written to a log or a pipe (no terminal: rich would show only the
    final state), one plain line when a task starts, changes its description, passes another tenth,
    or every LOG_EVERY_S seconds, so `nohup ... > log` shows how a long step is going."""

    LOG_EVERY_S = 60.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logged: dict = {}

    def _log(self, task_id) -> None:
        if self.console.is_terminal or task_id not in self._tasks:
            return
        task = self._tasks[task_id]
        tenth = int(10 * task.completed / task.total) if task.total else int(task.completed)
        key, (last_key, last_t) = (task.description, tenth), self._logged.get(task_id, (None, 0.0))
        now = time.monotonic()
        if key != last_key or now - last_t >= self.LOG_EVERY_S:
            self._logged[task_id] = (key, now)
            total = f"/{task.total:g}" if task.total else ""
            self.console.print(f"{task.description}: {task.completed:g}{total} ({task.elapsed or 0:.0f} s)",
                               markup=False, highlight=False, soft_wrap=True)

    def add_task(self, *args, **kwargs):
        task_id = super().add_task(*args, **kwargs)
        self._log(task_id)
        return task_id

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)


def progress() -> Progress:
    return LogProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
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
    """``--json`` output: strict JSON (NaN and infinities as null: mllm_dr/atomic.py::json_text)."""
    from mllm_dr.atomic import json_text

    sys.stdout.write(json_text(obj, indent=1, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class Stopped(BaseException):
    """SIGTERM or SIGHUP reached a service command (like Ctrl-C, it must not be swallowed)."""


@contextmanager
def stop_on_signals():
    """Turn SIGTERM/SIGHUP (systemd, docker stop, kill, a closed terminal) into ``Stopped``,
    so the ``finally`` blocks that stop the child process run."""
    def handler(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def stopping_on_error(stop: Callable[[], object]):
    """Right after a service started: an error or a signal before it is handed over stops it again."""
    try:
        yield
    except BaseException:
        stop()
        raise


def hold_foreground(pid: int, what: str, log: Path, stop: Callable[[], object]) -> None:
    """Keep a background service in the foreground until it dies, Ctrl-C, SIGTERM or SIGHUP;
    always stop it (a second signal does not cut the stopping short)."""
    import time

    from mllm_dr.errors import InputError
    from mllm_dr.processes import STOP_SIGNALS, alive, unsignalled

    try:
        console.print(f"{safe_text(what)} (pid {pid}). Ctrl-C (or SIGTERM) stops it.")
        while alive(pid):
            time.sleep(1)
        raise InputError(f"{what.split(' ')[0]} exited; see its log", log)
    finally:   # Ctrl-C ignored too; afterwards it interrupts again, while SIGTERM and SIGHUP stay ignored until
        # ``stop_on_signals`` puts its handlers back (so ``stopping_on_error``'s stop is not cut short either)
        left_ignored = dict.fromkeys(STOP_SIGNALS, signal.SIG_IGN)
        unsignalled(stop, (signal.SIGINT, *STOP_SIGNALS), afterwards={signal.SIGINT: signal.default_int_handler,
                                                                      **left_ignored})


def error_log_dir(argv: list[str] | None = None) -> Path:
    """Where an internal error's traceback goes: the workspace's or center folder's ``logs/``
    when the command names one, else ``~/.cache/mllm-dr/logs`` (never a shared /tmp)."""
    argv = sys.argv[1:] if argv is None else argv
    for flags, env, marker in ((("--workspace", "-w"), "MLLMDR_WORKSPACE", "workspace.json"),
                               (("--dir", "-d"), "MLLMDR_CENTER", "center.json")):
        value = os.environ.get(env)
        for i, arg in enumerate(argv):
            if arg in flags and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flags[0] + "="):
                value = arg.split("=", 1)[1]
        if value and (Path(value) / marker).is_file():
            return Path(value) / "logs"
    return user_log_dir()


def user_log_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mllm-dr" / "logs"


def save_traceback() -> Path:
    """The current exception's traceback in a 0600 file; falls back to the user's cache."""
    from mllm_dr.private import private_dir, write_private

    name = f"mllmdr-error-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    for folder in dict.fromkeys([error_log_dir(), user_log_dir()]):
        try:
            return write_private(private_dir(folder) / name, traceback.format_exc())
        except OSError:
            continue
    raise OSError("no folder to save the traceback in")


def run_app(app: typer.Typer) -> Callable[[], None]:
    """Entry point wrapper: known errors become one line; unknown ones a line plus a saved traceback."""

    def main() -> None:
        quiet_libraries()
        try:
            _call(app)
        except MllmDrError as err:
            err_console.print(f"[red]error:[/red] {safe_text(err)}", highlight=False, soft_wrap=True)
            raise SystemExit(2) from None
        except (KeyboardInterrupt, SystemExit) as exc:   # Typer turns Ctrl-C into a silent exit 130
            if not _interrupted(exc):
                raise
            err_console.print("[yellow]interrupted[/yellow]; completed work is kept and the next run resumes")
            raise SystemExit(130) from None
        except Stopped as sig:
            err_console.print(f"stopped on {safe_text(sig)}", highlight=False)
            raise SystemExit(0) from None
        except Exception as err:  # a bug: say so in one line and keep the details in a file
            try:
                where = f"traceback saved to {save_traceback()}"
            except OSError:
                where = "the traceback could not be saved"
            err_console.print(f"[red]internal error:[/red] {type(err).__name__}: {safe_text(err)} "
                              f"({safe_text(where)})", highlight=False, soft_wrap=True)
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


def add_version_command(app: typer.Typer, tool: str) -> None:
    """``TOOL version [--json]``: the kit version (both CLIs; ``--version`` on the root prints the same)."""

    def version(json_out: bool = typer.Option(False, "--json")):
        from mllm_dr import __version__

        emit_json({"version": __version__}) if json_out else console.print(__version__)

    version.__doc__ = f"Print the kit version.\n\n    Example: {tool} version --json\n    "
    app.command()(version)


def make_app(help_text: str) -> typer.Typer:
    """A top-level CLI (``mllmdr-site``, ``mllmdr-center``): help when called bare, ``--version``,
    no shell-completion installer, and never Typer's pretty tracebacks (``run_app`` owns errors)."""
    app = typer.Typer(help=help_text, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root(version: bool = version_option()):
        pass

    return app
