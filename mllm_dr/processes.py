"""Long-running helper processes (SuperLink, SuperNodes): start, wait until ready, stop.

Every process is started in its own session with its log in a file and its PID in a
pid file, so a later command (or a test's cleanup) can stop it and everything it
spawned: children that start their own session are found through /proc, not by
process group, and each one is waited for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from mllm_dr.errors import MllmDrError


class ProcessError(MllmDrError):
    pass


def spawn(cmd: list[str], log: Path, pidfile: Path | None = None, env: dict | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = _private_log(log)
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=cwd, start_new_session=True)
    fh.close()
    if pidfile:
        record_pid(pidfile, proc.pid)
    return proc


def _private_log(log: Path):
    """``log`` opened for appending, mode 0600 (also when an older kit left it 0644): a SuperNode's or the
    SuperLink's log names sites, paths and addresses, and was 0644 under the usual umask (session 44)."""
    from mllm_dr.private import FILE_MODE

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "ab")


def process_identity(pid: int) -> str | None:
    """Which process ``pid`` is, beyond its number: this boot's id and the process's start time in clock
    ticks since boot (immune to wall-clock steps); None when there is no such process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        with open(f"/proc/{pid}/stat") as fh:
            return f"{boot}:{fh.read().split(') ', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _identity_file(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.name + ".start")


def record_pid(pidfile: Path, pid: int) -> None:
    """The pid file (the pid alone, as every tool reads it) and beside it the process's identity."""
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(str(pid))
    _identity_file(pidfile).write_text(process_identity(pid) or "")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (children first found by their parent field in /proc)."""
    parent_of: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parent_of[int(d)] = int(fh.read().split(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        out += kids
        frontier += kids
    return out


def with_environment(name: str, value: str) -> list[int]:
    """Processes whose environment sets ``name=value``: all a process started, however they detached
    (Ray's workers re-parent and rename themselves, but keep the environment they were given)."""
    mark, out = f"{name}={value}".encode(), []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/environ", "rb") as fh:
                if mark in fh.read().split(b"\0"):
                    out.append(int(d))
        except OSError:
            continue
    return out


def stop(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process and all its descendants, SIGKILL whatever is left after ``grace``."""
    targets = [pid, *descendants(pid)]
    for p in targets:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        for p in targets:
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.2)
    for p in targets:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(p, 0)
        except ChildProcessError:
            pass


T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)       # what systemd, docker stop, kill and a closed terminal send


def unsignalled(step: Callable[[], T], signals: tuple[int, ...] = STOP_SIGNALS,
                afterwards: dict[int, object] | None = None) -> T:
    """``step()`` (stopping processes) with ``signals`` ignored while it runs, so that a second signal does not
    cut the stopping short. Afterwards, also when ``step`` raises, each signal gets back the handler it had
    before, or the one ``afterwards`` names for it. Off the main thread, where no handler can be changed,
    ``step()`` runs as it is. The one owner of this for the rehearsal (``fl_server.simulation``: SIGTERM and
    SIGHUP, restored) and the foreground services (``cli.common.hold_foreground``: Ctrl-C too)."""
    if threading.current_thread() is not threading.main_thread():
        return step()
    old = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        return step()
    finally:
        for s, h in old.items():
            signal.signal(s, (afterwards or {}).get(s, h))


def stop_pidfile(pidfile: Path, grace: float = 10.0) -> bool:
    """Stop the process a pid file names (and its children) if it is still the one the file was written
    for; the file is removed either way. True when a process was stopped."""
    if not pidfile.is_file():
        return False
    pid = running_from_pidfile(pidfile)
    if pid is not None:
        stop(pid, grace)
    pidfile.unlink(missing_ok=True)
    _identity_file(pidfile).unlink(missing_ok=True)
    return pid is not None


def running_from_pidfile(pidfile: Path) -> int | None:
    """The pid a pid file names when that process is alive and is the one the file was written for: after a
    reboot, or long after a crash, the number can belong to another process, which is then neither reported
    as ours nor ever signalled (its boot id or start time differs from the identity ``record_pid`` kept).
    A pid file without an identity (written by an older kit) is taken at its word."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if not alive(pid):
        return None
    try:
        recorded = _identity_file(pidfile).read_text().strip()
    except OSError:
        return pid
    return pid if not recorded or recorded == process_identity(pid) else None


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.5, tail_lines: int = 6) -> None:
    """Poll ``check`` until true; fail fast when ``proc`` exits, with the log's tail in the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise ProcessError(f"{what}: process exited with code {proc.returncode}" + _tail(log, tail_lines))
        time.sleep(interval)
    raise ProcessError(f"{what}: not ready after {timeout:.0f} s" + _tail(log, tail_lines))


def _tail(log: Path | None, lines: int = 6) -> str:
    if not log or not log.is_file():
        return ""
    text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    return f" (see {log}):\n  " + "\n  ".join(text)


def log_contains(log: Path, needle: str) -> Callable[[], bool]:
    return lambda: log.is_file() and needle in log.read_text(errors="replace")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Can a server bind ``host:port`` now (SO_REUSEADDR, as uvicorn and gRPC do)?"""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> tuple[int | None, str] | None:
    """Who listens on TCP ``port``: (pid, 'pid N: command line') from /proc; None when it is free.

    The pid is None when the socket belongs to a process this account may not inspect.
    """
    if port_free(port):
        return None
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:   # 0A = LISTEN
                inodes.add(f"socket:[{f[9]}]")
    for d in (d for d in os.listdir("/proc") if d.isdigit()):
        try:
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{d}/fd/{fd}") in inodes:
                    return int(d), f"pid {d}: {command_line(int(d))}"
            except OSError:
                continue
    return None, "a process this account cannot inspect (another user's, or in another container)"


def command_line(pid: int, limit: int = 160) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(command line not readable)"
    return cmd if len(cmd) <= limit else cmd[:limit - 3] + "..."


def check_port(port: int, what: str, own: set[int] = frozenset()) -> None:
    """Raise ProcessError naming the process that holds ``port`` (unless it is one of ``own``)."""
    held = port_holder(port)
    if held and held[0] not in own:
        raise ProcessError(f"port {port} ({what}) is in use by {held[1]}; choose another port or stop that process")
