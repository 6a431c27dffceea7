"""`mllmdr-site enroll | train --federated | stop | status`: this site's membership of the federation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import (WorkspaceOpt, console, emit_json, err_console, hold_foreground, safe_text,
                        stop_on_signals, stopping_on_error)
from cli.field_lines import print_fields
from mllm_dr import audit
from mllm_dr.errors import InputError


def enroll(workspace: Optional[Path] = WorkspaceOpt,
           out: Optional[Path] = typer.Option(None, "--out", help="Write an enrollment request (public key only)."),
           accept: Optional[Path] = typer.Option(None, "--accept", help="Install the center's bundle."),
           supernode_port: Optional[int] = typer.Option(None, "--supernode-port", min=1024, max=65535,
                                                        help="Local port of this site's SuperNode (default 9094)."),
           replace_center: bool = typer.Option(False, "--replace-center",
                                               help="With --accept: leave the center this site is enrolled with "
                                                    "for the bundle's (another center key); the old center's "
                                                    "records move to federation/retired/."),
           center_fingerprint: Optional[str] = typer.Option(
               None, "--center-fingerprint", metavar="FP",
               help="With --accept: the center's signing key fingerprint as its operator gave it to you by another "
                    "way than the bundle (phone, in person; 'mllmdr-center fingerprint'). A bundle of another key, "
                    "or an unsigned one, is refused and nothing is installed. Case, ':' and blanks do not matter."),
           allow_unsigned_bundle: bool = typer.Option(
               False, "--allow-unsigned-bundle",
               help="With --accept: install a bundle without the center's signature (a center kit before session "
                    "47): nothing then vouches for its CA certificate, address or audit key. Audited. Never for the "
                    "center this site is enrolled with."),
           json_out: bool = typer.Option(False, "--json")):
    """Join a federation: make a request for the center, then install the center's answer.

    The node key (P-384, OpenSSH) is created once in the workspace's keys/ and never leaves it.
    --supernode-port is checked now (and again when the SuperNode starts): a port in use is named with its process.
    --accept is refused while this site's SuperNode runs ('mllmdr-site stop' first), and for a bundle of another
    center than the one this site is enrolled with unless --replace-center is given. The bundle travels by e-mail
    or USB: check that it is the center's with --center-fingerprint (else compare the fingerprint it prints with
    the center's yourself).

    Example: mllmdr-site enroll --workspace /srv/mllmdr --out site-a.request.json
    Example: mllmdr-site enroll -w /srv/mllmdr --accept site-a.bundle.json --center-fingerprint 3f2a9c0d1e4b5a67
    """
    from mllm_dr.enrollment import accept_bundle, make_request, pinned_fingerprint
    from mllm_dr.workspace import resolve_workspace

    if not isinstance(center_fingerprint, (str, type(None))):    # called as a function without it (typer's default)
        center_fingerprint = None
    ws = resolve_workspace(workspace)
    if (out is None) == (accept is None):
        raise InputError("give exactly one of --out REQUEST or --accept BUNDLE")
    if out is not None:
        if center_fingerprint is not None or replace_center is True:
            raise InputError("--center-fingerprint and --replace-center go with --accept BUNDLE, not --out")
        req = make_request(ws, out)
        audit.append(ws.audit_path, "enroll_request", fingerprint=req.fingerprint)
        result = {"request": str(out), "site_id": req.site_id, "fingerprint": req.fingerprint}
        if json_out:
            emit_json(result)
            return
        print_fields(f"enrollment request for site {req.site_id} written to {out}", [("node key", req.fingerprint)],
                     "Send it to the center ('mllmdr-center approve'); it holds the public key only.")
        return
    if center_fingerprint is not None:
        pinned_fingerprint(center_fingerprint)       # a malformed pin is refused before anything is looked at
    _refuse_while_running(ws)
    _check_supernode_port(ws, supernode_port)
    before = _enrolled_center(ws)
    allow_unsigned = allow_unsigned_bundle is True     # False when called as a function without it
    acc = accept_bundle(ws, accept, supernode_port, replace_center=replace_center,
                        center_fingerprint=center_fingerprint, allow_unsigned=allow_unsigned)
    fed = acc.settings
    replaced = before if before and before != fed.center_fingerprint else None
    retired = str(acc.retired.relative_to(ws.root)) if acc.retired else None
    audit.append(ws.audit_path, "enroll_accept", center=fed.center_fingerprint, superlink=fed.superlink_address,
                 center_pinned=acc.pinned, bundle_signed=acc.signed, ca_sha256=acc.ca_sha256,
                 **({"unsigned_allowed": True} if not acc.signed else {}),
                 **({"replaced_center": replaced} if replaced else {}),
                 **({"retired_center_records": retired} if retired else {}))
    result = {"site_id": ws.config.site_id, "superlink": fed.superlink_address, "center": fed.center_fingerprint,
              "supernode_port": fed.supernode_port, **({"replaced_center": replaced} if replaced else {}),
              "center_pinned": acc.pinned, "bundle_signed": acc.signed, "ca_sha256": acc.ca_sha256,
              **({"retired_center_records": retired} if retired else {})}
    warning = _ca_expiry_warning(Path(fed.ca_certificate_path))
    if warning:
        err_console.print(f"[yellow]warning:[/yellow] {safe_text(warning)}", highlight=False, soft_wrap=True)
    if not acc.signed:          # --allow-unsigned-bundle: the key fingerprint alone vouches for nothing else
        err_console.print(f"[yellow]check:[/yellow] the bundle is not signed: its center key fingerprint "
                          f"{safe_text(fed.center_fingerprint)} does not cover its CA certificate, SuperLink address "
                          f"({safe_text(fed.superlink_address)}) or audit key; compare the CA certificate SHA-256 "
                          f"{safe_text(acc.ca_sha256)} and the address with what the center's operator gives you by "
                          "phone or in person ('mllmdr-center fingerprint')", highlight=False, soft_wrap=True)
    elif not acc.pinned:        # one line, not a refusal: the operator compares it (or pins it next time)
        err_console.print(f"[yellow]check:[/yellow] the bundle's center key fingerprint is "
                          f"{safe_text(fed.center_fingerprint)}; compare it with the one the center's operator gives "
                          "you by phone or in person ('mllmdr-center fingerprint'), or accept again with "
                          "--center-fingerprint FP", highlight=False, soft_wrap=True)
    if json_out:
        emit_json(result)
        return
    print_fields(f"site {result['site_id']} enrolled with the center at {fed.superlink_address}",
                 [("center key", fed.center_fingerprint + (" (matches --center-fingerprint)" if acc.pinned else
                                                           " (not checked: no --center-fingerprint)")),
                  ("bundle signature", "verified" if acc.signed else
                   "none (--allow-unsigned-bundle: a center kit before session 47)"),
                  ("CA certificate SHA-256", acc.ca_sha256), ("SuperNode port", fed.supernode_port),
                  *([("replaced center", replaced)] if replaced else []),
                  *([("old center's records", retired)] if retired else [])])


CA_WARN_DAYS = 30


def _refuse_while_running(ws) -> None:
    """A bundle installed under a running SuperNode switched its center and port from under it (session 46)."""
    from fl_client.supernode import pidfile
    from mllm_dr.processes import running_from_pidfile

    pid = running_from_pidfile(pidfile(ws))
    if pid:
        raise InputError(f"this site's SuperNode is running (pid {pid}); stop it first ('mllmdr-site stop'), then "
                         "install the bundle and start it again")


def _enrolled_center(ws) -> str | None:
    from mllm_dr.enrollment import FEDERATION_FILE, federation_settings

    return federation_settings(ws).center_fingerprint if (ws.root / FEDERATION_FILE).is_file() else None


def _ca_expiry_warning(ca, now=None) -> str | None:
    """A line when the center's CA certificate just installed expires within CA_WARN_DAYS."""
    from datetime import datetime, timezone

    from mllm_dr.pki import cert_expiry

    try:
        expires = cert_expiry(ca)
    except ValueError:
        return None
    left = expires - (now or datetime.now(timezone.utc))
    if left.days < CA_WARN_DAYS:
        return (f"the center's CA certificate expires on {expires:%Y-%m-%d} ({max(left.days, 0)} days); after that "
                "this site cannot connect: ask the center for a renewed bundle")
    return None


def _check_supernode_port(ws, chosen: int | None) -> None:
    """The SuperNode's port must be free now (or held by this site's own SuperNode)."""
    from fl_client.supernode import pidfile
    from mllm_dr.enrollment import FEDERATION_FILE, federation_settings
    from mllm_dr.processes import check_port, descendants, running_from_pidfile

    port = chosen or (federation_settings(ws).supernode_port if (ws.root / FEDERATION_FILE).is_file() else 9094)
    own = running_from_pidfile(pidfile(ws))
    check_port(port, "--supernode-port", {own, *descendants(own)} if own else set())


def train_federated(workspace, base_model, lora_rank, detach: bool, json_out: bool, wait: float | None = None) -> None:
    """``train --federated``: start this site's SuperNode; the center drives rounds and stages."""
    from cli.site_model import warn_stale_rationales
    from fl_client.supernode import logfile, pidfile, start_supernode, stop_supernode
    from mllm_dr.processes import ProcessError, running_from_pidfile
    from mllm_dr.site_status import stale_rationales_or_why_not
    from mllm_dr.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    running = running_from_pidfile(pidfile(ws))
    if running:       # never attach to it (session 46: options ignored, a start audited it did not make, and it
        # was stopped on SIGTERM); --detach alone is idempotent: a start asked for while one runs is already done
        if not detach or base_model or lora_rank:
            raise ProcessError(f"a SuperNode is already running (pid {running}); 'mllmdr-site stop' first"
                               + ("" if not detach else " (it keeps the --base-model / --lora-rank it was started "
                                                        "with)"))
        info = {"site_id": ws.config.site_id, "pid": running, "log": str(logfile(ws)), "already_running": True}
        emit_json(info) if json_out else console.print(f"SuperNode already running (pid {running}); log "
                                                      f"{safe_text(info['log'])}; stop with 'mllmdr-site stop'")
        return
    stale, why_not = stale_rationales_or_why_not(ws)       # a warning, never what stops the start
    warn_stale_rationales(stale or 0, "will train")
    if why_not:
        err_console.print(f"[yellow]warning:[/yellow] teacher rationales {safe_text(why_not)}", highlight=False)
    with stop_on_signals():
        with err_console.status(f"connecting site {ws.config.site_id} to the center"):
            proc = start_supernode(ws, base_model, lora_rank, wait=wait,
                                   say=lambda line: err_console.print(safe_text(line), highlight=False, soft_wrap=True))
        pid = proc if isinstance(proc, int) else proc.pid
        with stopping_on_error(lambda: stop_supernode(ws, only=pid)):       # never one this command did not start
            audit.append(ws.audit_path, "supernode_start", pid=pid)
            info = {"site_id": ws.config.site_id, "pid": pid, "log": str(logfile(ws))}
            if detach:
                emit_json(info) if json_out else console.print(f"SuperNode running (pid {pid}); log "
                                                              f"{safe_text(info['log'])}; stop with 'mllmdr-site stop'")
                return
            hold_foreground(pid, "SuperNode connected, waiting for rounds from the center", logfile(ws),
                            lambda: stop_supernode(ws, only=pid))


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


def status(workspace: Optional[Path] = WorkspaceOpt, json_out: bool = typer.Option(False, "--json")):
    """This site in the federation: its center, its SuperNode, the last round it took part in,
    the epsilon it has spent, the adapters scoring uses, and how many teacher rationales are stale
    (written for another quote, label or dialogue than the item's today; counting runs the quote selector).

    Example: mllmdr-site status --workspace /srv/mllmdr --json
    """
    from fl_client.supernode import connected_marker, logfile, pidfile
    from mllm_dr.processes import running_from_pidfile
    from cli.site_policy import ledger_line
    from mllm_dr.site_status import site_status
    from mllm_dr.workspace import resolve_workspace
    from policies.site import site_policy

    ws = resolve_workspace(workspace)
    out = site_status(ws)
    pid = running_from_pidfile(pidfile(ws))
    marker = connected_marker(ws)
    out["supernode"] = {"running": pid is not None, "pid": pid, "log": str(logfile(ws)),
                        "port": (out["center"] or {}).get("supernode_port"),
                        "started_connected": _mtime(marker) if marker.is_file() else None}
    out["supernode"]["last_connected"] = out["supernode"]["started_connected"]     # the old name, kept for scripts
    if json_out:
        emit_json(out)
        return
    c, sn, lr, p, a = out["center"], out["supernode"], out["last_round"], out["privacy"], out["adapters"]
    fed, loc = a["federated"], a["local"]
    budget = site_policy(ws).dp.epsilon_budget
    lines = [f"site {out['site_id']}: " + (f"enrolled to {c['address']} (center key {c['fingerprint']})"
                                           if c else "not enrolled ('mllmdr-site enroll --out REQUEST')"),
             f"SuperNode: {'running, pid ' + str(sn['pid']) if sn['running'] else 'not running'}"
             + (f"; connected at start {sn['started_connected']}" if sn["started_connected"] else ""),
             "last round: " + (f"run {lr['run']} round {lr['round']} (stage {lr['stage']}) at {lr['time']}"
                               if lr else "none yet"),
             *([f"privacy: {ledger_line(led, budget)}" for led in p["ledgers"]] if p else
               ["privacy: no DP round yet (epsilon 0)"]),
             f"adapters in use: {a['in_use'] or 'none'}; federated latest: "
             f"{(fed['version'] or fed.get('error')) if fed else '-'}; local latest: "
             f"{(loc['version'] or loc.get('error')) if loc else '-'}"]
    if out["stale_teacher_rationales"] or out["stale_teacher_rationales_not_checked"]:
        lines.append("teacher rationales: " + (out["stale_teacher_rationales_not_checked"] or
                     f"{out['stale_teacher_rationales']} stale (written for another quote, label or dialogue; "
                     "'mllmdr-site rationales' asks again)"))
    for line in lines:         # the values name files and carry messages: text, never markup
        console.print(safe_text(line), highlight=False)
    for warning in out.get("warnings", []):     # a tampered audit log, stale adapters (session 44)
        err_console.print(f"[yellow]warning:[/yellow] {safe_text(warning)}", highlight=False, soft_wrap=True)


def _mtime(path: Path) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
