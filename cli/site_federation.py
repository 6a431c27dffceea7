"""`mllmdr-site enroll | train --federated | stop`: this site's membership of the federation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import WorkspaceOpt, console, emit_json, err_console, hold_foreground
from mllm_dr import audit
from mllm_dr.errors import InputError


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


def train_federated(workspace, base_model, lora_rank, detach: bool, json_out: bool) -> None:
    """``train --federated``: start this site's SuperNode; the center drives rounds and stages."""
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
