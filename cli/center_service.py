"""`mllmdr-center serve | stop`: the SuperLink process."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import (DirOpt, center_dir, console, emit_json, err_console,
                        hold_foreground, safe_text, stop_on_signals, stopping_on_error)
from mllm_dr import audit


def serve(dir: Path = DirOpt,
          detach: bool = typer.Option(False, "--detach", help="Return once ready (stop with 'mllmdr-center stop')."),
          json_out: bool = typer.Option(False, "--json")):
    """Start the SuperLink: TLS, SuperNode authentication (approved sites only), file database.

    In the foreground, Ctrl-C, SIGTERM and SIGHUP stop it (and everything it started). An expired TLS
    certificate is refused (warned of 30 days before): 'mllmdr-center renew-cert' issues a new one.

    Example: mllmdr-center serve --dir /srv/center --detach
    """
    from fl_server.superlink import start_superlink, stop_superlink, superlink_log

    c = center_dir(dir)
    warning = c.server_cert_warning()          # InputError when expired: no site could connect
    if warning:
        err_console.print(f"[yellow]warning:[/yellow] {safe_text(warning)}", highlight=False, soft_wrap=True)
    with stop_on_signals():
        with err_console.status(f"starting the SuperLink on {c.config.address}"):
            proc = start_superlink(c)
        with stopping_on_error(lambda: stop_superlink(c)):
            pid = proc if isinstance(proc, int) else proc.pid
            audit.append(c.audit_path, "serve", pid=pid, address=c.config.address)
            info = {"address": c.config.address, "pid": pid, "log": str(superlink_log(c)),
                    "sites_approved": [s["site_id"] for s in c.approved_sites()]}
            if detach:
                emit_json(info) if json_out else console.print(f"SuperLink on {c.config.address} (pid {pid}); "
                                                              f"log {info['log']}")
                return
            hold_foreground(pid, f"SuperLink on {c.config.address}", superlink_log(c), lambda: stop_superlink(c))


def stop(dir: Path = DirOpt, json_out: bool = typer.Option(False, "--json")):
    """Stop the SuperLink and everything it started.

    Example: mllmdr-center stop --dir /srv/center
    """
    from fl_server.superlink import stop_superlink

    c = center_dir(dir)
    was = stop_superlink(c)
    audit.append(c.audit_path, "stop", was_running=was)
    emit_json({"stopped": was}) if json_out else console.print("stopped" if was else "no SuperLink was running")
