"""A site's SuperNode: TLS to the center, node authentication with the site key, the
workspace passed as node config (never through the run config). It waits for the center
(back-off, one line a minute) and names what it waits for; a port clash names its holder. It runs
the ClientApp installed here, never the run's FAB (``supernode_env``, ``fl_client/pinned_clientapp.py``)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from fl_server.superlink import flower_bin, flower_env
from mllm_dr.enrollment import federation_settings
from mllm_dr.errors import InputError
from mllm_dr.private import private_dir, write_private
from mllm_dr.processes import (ProcessError, check_port, log_contains, running_from_pidfile, spawn, stop_pidfile,
                               wait_until)
from mllm_dr.workspace import Workspace


def pidfile(ws: Workspace) -> Path:
    return ws.root / "federation" / "supernode.pid"


def logfile(ws: Workspace) -> Path:
    return ws.root / "federation" / "supernode.log"


def toml_string(value) -> str:
    """``value`` as a TOML basic string that Flower's ``--node-config`` parser (``parse_config_args``) reads back
    exactly: its pattern ends a quoted value at the next '"' even after a backslash, so '"' is written as
    \\u0022 (as are control characters); '\\' is doubled. A workspace /srv/a"b reached the ClientApp as /srv/a
    (a review, session 46)."""
    out = []
    for ch in str(value):
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def supernode_command(ws: Workspace, base_model: str | None = None, lora_rank: int | None = None) -> list[str]:
    fed = federation_settings(ws)
    node_config = f"workspace={toml_string(ws.root.resolve())}"
    if base_model:
        node_config += f" base-model={toml_string(base_model)}"
    if lora_rank:
        node_config += f" lora-rank={lora_rank}"
    return [flower_bin("flower-supernode"), "--superlink", fed.superlink_address,
            "--root-certificates", fed.ca_certificate_path,
            "--auth-supernode-private-key", fed.node_key_path,
            "--node-config", node_config, "--port", str(fed.supernode_port),
            "--max-wait-time", str(RIDE_OUT_SECONDS)]


def shim_dir(ws: Workspace) -> Path:
    return ws.root / "federation" / "bin"


def clientapp_shim(ws: Workspace) -> Path:
    """Write the ``flwr-clientapp`` the SuperNode starts for every message: this interpreter running
    ``fl_client.pinned_clientapp`` (the installed ClientApp, never the code of the run's FAB). Flower's
    ``flower-superexec`` starts ``flwr-clientapp`` by name through PATH (``supernode_env`` puts this folder
    first). Written again whenever it differs, so it follows the kit's interpreter. ``-P``: the SuperNode's working
    folder is never put on ``sys.path``."""
    shim = private_dir(shim_dir(ws)) / "flwr-clientapp"
    text = ("#!/bin/sh\n# written by fl_client/supernode.py: this site runs its installed ClientApp only\n"
            f"exec {shlex.quote(sys.executable)} -P -m fl_client.pinned_clientapp \"$@\"\n")
    if not (shim.is_file() and shim.read_text() == text and os.access(shim, os.X_OK)):
        write_private(shim, text)
        os.chmod(shim, 0o700)
    return shim


def supernode_env(ws: Workspace, threads: int | None = None) -> dict:
    """The SuperNode's environment: Flower's (``flower_env``) with the ``flwr-clientapp`` shim first on PATH,
    refused (InputError, one line) unless that name finds the shim there (``check_shim_found``)."""
    refuse_pathsep_root(ws)
    env = flower_env(ws.root / "federation" / "flwr-home", threads=threads)
    shim = clientapp_shim(ws)
    env["PATH"] = os.pathsep.join([str(shim.parent), env.get("PATH", "")])
    check_shim_found(shim, env["PATH"])
    return env


def refuse_pathsep_root(ws: Workspace) -> None:
    """A workspace whose path holds os.pathsep (':') cannot put its shim folder on PATH: the entry splits."""
    for root in (str(ws.root), str(ws.root.resolve())):
        if os.pathsep in root:
            raise InputError(f"a workspace path must not contain {os.pathsep!r} (the SuperNode finds this site's "
                             "ClientApp through PATH, which that character splits); move the workspace", root)


def check_shim_found(shim: Path, path: str) -> None:
    """The name ``flwr-clientapp`` must find the kit's shim on ``path``: on a noexec mount, or under a path PATH
    splits, exec skipped the shim and Flower's own ``flwr-clientapp`` (next on PATH, in the venv) ran the
    run's FAB code (a review, session 46). Refused in one line, nothing started."""
    noexec = getattr(os, "ST_NOEXEC", 0)
    try:
        flags = os.statvfs(shim.parent).f_flag
    except OSError:
        flags = 0
    if noexec and flags & noexec:
        raise InputError("the workspace is on a file system mounted noexec: the SuperNode could not run this "
                         "site's ClientApp shim (it would run Flower's own, with the run's code); move the "
                         "workspace to a mount without noexec", shim.parent)
    found = shutil.which("flwr-clientapp", path=path)
    if found != str(shim):
        raise InputError(f"'flwr-clientapp' on the SuperNode's PATH is {found or 'nothing'}, not this site's shim "
                         "(is the shim executable?); the SuperNode is not started", shim)


def connected_marker(ws: Workspace) -> Path:
    """Touched when a start is accepted by the SuperLink (not later: `status` shows it as "connected at start")."""
    return ws.root / "federation" / "last-connected"


NOT_REGISTERED = "this node's key is not registered at the center yet"
MAX_BACKOFF = 30          # seconds between tries, at most
RIDE_OUT_SECONDS = 3600   # a running SuperNode keeps reconnecting through a center outage this long
                          # (a restart, maintenance), then exits with the reason in its log
SAY_EVERY = 60            # one line a minute while waiting


def start_supernode(ws: Workspace, base_model: str | None = None, lora_rank: int | None = None,
                    timeout: float = 90, threads: int | None = None, wait: float | None = None,
                    say: Callable[[str], None] = lambda line: None):
    """Start in the background; ready when the SuperLink has accepted the node.

    While the center cannot be reached, or does not (yet) accept this node's key, retry
    with back-off for ``wait`` seconds (None: until it works), calling ``say`` once a
    minute with what it waits for; then fail with that one line. Other failures (port in
    use, TLS, a bad key) fail at once.
    """
    pid = running_from_pidfile(pidfile(ws))
    if pid:       # attaching ignored this start's options, audited a start it did not make, and stopped it on
        raise ProcessError(f"a SuperNode is already running (pid {pid}); 'mllmdr-site stop' first")  # SIGTERM (s46)
    fed = federation_settings(ws)
    supernode_env(ws)                 # a PATH that does not find the shim is refused before any wait
    rotate = True                     # the last SuperNode's log (why it exited) kept once, not per retry
    deadline = None if wait is None else time.monotonic() + wait
    delay, said = 2.0, -float("inf")
    while True:
        check_port(fed.supernode_port, f"this site's SuperNode, --supernode-port of {ws.config.site_id}")
        problem = None if reachable(fed.superlink_address) else f"center unreachable at {fed.superlink_address}"
        if problem is None:
            try:
                proc = _start_once(ws, base_model, lora_rank, timeout, threads, rotate=rotate)
                connected_marker(ws).touch()
                return proc
            except ProcessError as err:
                rotate = False
                problem = _waitable(logfile(ws), fed, err)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:   # the whole wait, as said (one last try at the deadline)
            raise ProcessError(f"site {ws.config.site_id}: {problem}" + (f" (waited {wait:.0f} s)" if wait else ""))
        if time.monotonic() - said >= SAY_EVERY:
            say(f"waiting for the center: {problem}; retrying with back-off "
                f"({'until it answers' if wait is None else f'for up to {wait:.0f} s'})")
            said = time.monotonic()
        time.sleep(delay if left is None else min(delay, left))
        delay = min(delay * 2, MAX_BACKOFF)


def reachable(address: str, timeout: float = 3.0) -> bool:
    """Does anything accept TCP connections at ``host:port`` (the SuperLink's one port)?"""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _waitable(log: Path, fed, err: ProcessError) -> str:
    """What a failed start waits for (one line), or re-raise when waiting cannot help.

    Flower exits with code 305 for both: "[code: 2004] Failed to activate SuperNode" means
    the SuperLink answered but does not accept this key (not registered yet, revoked, or
    still counting the node online after an unclean stop); a refused or dropped connection
    means the center is not reachable.
    """
    text = log.read_text(errors="replace") if log.is_file() else ""
    if "Failed to activate SuperNode" in text or "code: 2004" in text:
        return (f"{NOT_REGISTERED} (or was revoked; right after an unclean stop the center also "
                "refuses it for about a minute)")
    if "HTTP API failed to start" in text or "address already in use" in text.lower():
        check_port(fed.supernode_port, "this site's SuperNode")
        raise ProcessError(f"the SuperNode could not open its port {fed.supernode_port} (in use); see {log}") from None
    if "certificate" in text.lower() and "verify failed" in text.lower():
        raise ProcessError(f"TLS: the center at {fed.superlink_address} presents a certificate this site's CA "
                           f"does not accept; re-install the center's bundle (see {log})") from None
    if "Exit Code: 305" in text or "Connection attempt failed" in text:
        return f"center unreachable at {fed.superlink_address}"
    raise err


def rotate_log(log: Path) -> Path | None:
    """A non-empty log moved to ``<log>.1`` (0600, over the one before): it holds why the last SuperNode exited,
    which every start wiped (a review, session 46)."""
    if not (log.is_file() and log.stat().st_size):
        return None
    kept = log.with_name(log.name + ".1")
    os.replace(log, kept)
    os.chmod(kept, 0o600)
    return kept


def _start_once(ws: Workspace, base_model, lora_rank, timeout: float, threads, rotate: bool = False):
    log = logfile(ws)
    private_dir(log.parent)           # a workspace of an older kit: federation/ was 0755 (session 44)
    env = supernode_env(ws, threads=threads or int(os.environ.get("OMP_NUM_THREADS", 1)))
    if rotate:
        rotate_log(log)
    write_private(log, "")            # the log names the site, its paths and its center: 0600
    proc = spawn(supernode_command(ws, base_model, lora_rank), log, pidfile(ws), env=env, cwd=ws.root)
    try:
        wait_until(log_contains(log, "SuperNode ID"), timeout, f"SuperNode of site {ws.config.site_id}", proc, log,
                   tail_lines=12)
    except BaseException:
        stop_pidfile(pidfile(ws))
        raise
    return proc


def stop_supernode(ws: Workspace, only: int | None = None) -> bool:
    """Stop this workspace's SuperNode; with ``only``, just when it is that process (the one a command started:
    a command never stops a SuperNode it did not start, session 46)."""
    running = running_from_pidfile(pidfile(ws))
    if only is not None and running is not None and running != only:
        return False                  # another command's SuperNode: not this one's to stop (a dead one's file goes)
    return stop_pidfile(pidfile(ws))
