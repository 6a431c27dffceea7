"""A site's SuperNode: TLS to the center, node authentication with the site key, the
workspace passed as node config (never through the run config)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fl_server.superlink import flower_bin, flower_env
from mllm_dr.enrollment import federation_settings
from mllm_dr.processes import ProcessError, log_contains, running_from_pidfile, spawn, stop_pidfile, wait_until
from mllm_dr.workspace import Workspace


def pidfile(ws: Workspace) -> Path:
    return ws.root / "federation" / "supernode.pid"


def logfile(ws: Workspace) -> Path:
    return ws.root / "federation" / "supernode.log"


def supernode_command(ws: Workspace, base_model: str | None = None, lora_rank: int | None = None) -> list[str]:
    fed = federation_settings(ws)
    node_config = f'workspace="{ws.root.resolve()}"'
    if base_model:
        node_config += f' base-model="{base_model}"'
    if lora_rank:
        node_config += f" lora-rank={lora_rank}"
    return [flower_bin("flower-supernode"), "--superlink", fed.superlink_address,
            "--root-certificates", fed.ca_certificate_path,
            "--auth-supernode-private-key", fed.node_key_path,
            "--node-config", node_config, "--port", str(fed.supernode_port),
            "--max-retries", "3", "--max-wait-time", "30"]


def connected_marker(ws: Workspace) -> Path:
    return ws.root / "federation" / "last-connected"


# The SuperLink keeps a node "online" for 2 heartbeat intervals (2 x 30 s) after its last sign of
# life, and refuses to activate it again meanwhile (after a crash of either side). A site that was
# connected recently therefore retries activation for this long; a first start fails at once.
REACTIVATION_WINDOW = 600
REACTIVATION_WAIT = 100


def start_supernode(ws: Workspace, base_model: str | None = None, lora_rank: int | None = None,
                    timeout: float = 90, threads: int | None = None):
    """Start in the background; ready when the SuperLink has accepted the node."""
    pid = running_from_pidfile(pidfile(ws))
    if pid:
        return pid
    marker = connected_marker(ws)
    recent = marker.is_file() and time.time() - marker.stat().st_mtime < REACTIVATION_WINDOW
    deadline = time.monotonic() + (REACTIVATION_WAIT if recent else 0)
    while True:
        try:
            proc = _start_once(ws, base_model, lora_rank, timeout, threads)
            marker.touch()
            return proc
        except ProcessError:
            if "Failed to activate" not in logfile(ws).read_text(errors="replace") or time.monotonic() > deadline:
                raise
            time.sleep(10)


def _start_once(ws: Workspace, base_model, lora_rank, timeout: float, threads):
    log = logfile(ws)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    proc = spawn(supernode_command(ws, base_model, lora_rank), log, pidfile(ws),
                 env=flower_env(ws.root / "federation" / "flwr-home",
                                threads=threads or int(os.environ.get("OMP_NUM_THREADS", 1))),
                 cwd=ws.root)
    try:
        wait_until(log_contains(log, "SuperNode ID"), timeout, f"SuperNode of site {ws.config.site_id}", proc, log,
                   tail_lines=12)
    except BaseException:
        stop_pidfile(pidfile(ws))
        raise
    return proc


def stop_supernode(ws: Workspace) -> bool:
    return stop_pidfile(pidfile(ws))
