"""`audit verify | head | show | export`, shared by mllmdr-site (workspace log) and mllmdr-center."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.table import Table

from cli.common import console, emit_json, err_console, safe_text
from mllm_dr import audit
from mllm_dr.errors import InputError, MllmDrError


class AuditBroken(MllmDrError):
    pass


EXAMPLES = {"verify": " --expect-head 42:3f9a...e1", "head": " --json", "show": " --event score --since 2026-11-01",
            "export": " --out audit.csv"}


def audit_app(locate: Callable[[Optional[Path]], Path], location_opt, tool: str, where: str) -> typer.Typer:
    """A Typer group over the audit log that ``locate(location)`` returns."""
    app = typer.Typer(help="Verify, show and export the signed, hash-chained audit log; print its signed head.\n\n"
                           f"Example: {tool} audit verify {where}", no_args_is_help=True)

    expect_key_opt = typer.Option(None, "--expect-key", help="Audit key fingerprint known from elsewhere (the "
                                  "enrollment request, a printout); default: the folder's own key, which whoever "
                                  "re-signed a log could have replaced.")
    against_opt = typer.Option(None, "--against", help="The heads of this log the other side recorded (the center's "
                               "sites/SITE.heads.jsonl, a site's federation/center-heads.jsonl, or one 'audit head "
                               "--json').")

    def checked(path: Path, expect_key: Optional[str], head, against: Optional[Path]) -> tuple[bool, str]:
        """The one verification of ``verify`` and ``export``: the chain and signatures, then the heads."""
        from mllm_dr.audit_heads import check_log

        ok, msg = audit.verify(path, expect_key, head)
        if ok and against is not None:
            ok, msg = check_log(path, against, expect_key)
        return ok, msg

    @app.command()
    def verify(location: Optional[Path] = location_opt,
               expect_key: Optional[str] = expect_key_opt,
               expect_head: Optional[str] = typer.Option(None, "--expect-head", help="ENTRIES:SHA256 of a head "
                                                         "recorded elsewhere (from 'audit head'): catches truncation "
                                                         "and rollback."),
               against: Optional[Path] = against_opt,
               json_out: bool = typer.Option(False, "--json")):
        """Exit 0 when every entry is intact; exit 2 naming the first bad entry (edited, deleted,
        reordered, signed by another key) or the head the log falls short of (truncated, rolled back)."""
        path = locate(location)
        ok, msg = checked(path, expect_key, audit.parse_head_spec(expect_head) if expect_head else None, against)
        if json_out:
            emit_json({"intact": ok, "message": msg, "log": str(path)})
            if not ok:
                raise SystemExit(2)
            return
        if not ok:
            raise AuditBroken(f"{path}: {msg}")
        console.print(f"{safe_text(path)}: {safe_text(msg)}", highlight=False)

    @app.command()
    def head(location: Optional[Path] = location_opt, json_out: bool = typer.Option(False, "--json")):
        """The log's signed head (entry count, hash of the last entry, time, key, signature).

        Keep it elsewhere (it travels to the other side of the federation by itself): a later
        'audit verify --expect-head ENTRIES:SHA256' proves the log was not cut or rolled back.
        A log that does not verify (as 'audit verify') gets no head: exit 2 naming the first bad line.
        """
        path = locate(location)
        h = audit.head(path)
        # a signed head vouches for the log: never for one 'audit verify' rejects (session 46: an edited entry or a
        # garbage line got a head, exit 0). Verified against the head itself, so an entry appended in between
        # is no matter and the head covers exactly the lines that were verified. The head attached to every reply
        # stays cheap: only this command verifies.
        ok, msg = audit.verify(path, None, {"entries": h["entries"], "last_hash": h["last_hash"]})
        if not ok:
            raise AuditBroken(f"{path}: {msg}; not signing a head over a broken log")
        if json_out:
            emit_json(h)
        else:
            console.print(f"{h['entries']}:{h['last_hash']}  ({h['time']}, key {h['key']}, signature {h['sig'][:16]}...)")

    @app.command()
    def show(location: Optional[Path] = location_opt,
             event: Optional[str] = typer.Option(None, "--event", help="Only this event (e.g. score, federated_round)."),
             actor: Optional[str] = typer.Option(None, "--actor"),
             since: Optional[str] = typer.Option(None, "--since", help="ISO date/time, e.g. 2026-11-01 (UTC unless "
                                                                     "it names a zone)."),
             last: int = typer.Option(50, "--last", min=1),
             json_out: bool = typer.Option(False, "--json")):
        """The log as a table, filtered; entries from the first tampered one on are marked."""
        start = _parse_since(since) if since else None
        path = locate(location)
        entries, ok, msg = audit.read_checked(path)
        if not ok:
            err_console.print(f"[red]warning:[/red] {safe_text(path)} does not verify: {safe_text(msg)}; entries from "
                              "there on are marked TAMPERED", highlight=False, soft_wrap=True)
        entries = [e for e in entries if (not event or e.get("event") == event) and (not actor or e.get("actor") == actor)
                   and (not start or _after(e, start))][-last:]
        if json_out:
            emit_json(entries)
            return
        t = Table(title=safe_text(path))
        for c in ("seq", "time", "event", "actor", "details"):
            t.add_column(c, overflow="fold")
        for e in entries:
            details = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("seq", "time", "event", "actor", "prev",
                                                                                "sig", "key", "tampered"))
            mark = "[red]TAMPERED[/red] " if e.get("tampered") else ""
            t.add_row(*map(safe_text, (e.get("seq"), e.get("time"))), mark + safe_text(e.get("event")),
                      safe_text(e.get("actor")), safe_text(details))   # logged strings: text, never markup or controls
        console.print(t)

    @app.command()
    def export(location: Optional[Path] = location_opt,
               out: Path = typer.Option(..., "--out", help="A .csv or .jsonl file (by extension)."),
               expect_key: Optional[str] = expect_key_opt,
               against: Optional[Path] = against_opt,
               json_out: bool = typer.Option(False, "--json")):
        """Write the log (verified first, as 'audit verify' with the same anchors) to CSV or JSONL for the
        hospital's records; only the entries that were verified."""
        if out.suffix not in (".csv", ".jsonl"):
            raise InputError("--out must end in .csv or .jsonl", out)
        path = locate(location)
        try:
            entries, spec = audit.snapshot(path)    # one read; verified up to its last entry, exported as read
        except InputError:
            ok, msg = audit.verify(path, expect_key)   # names the line that is not JSON
            raise AuditBroken(f"{path}: {msg}; not exporting a broken log") from None
        ok, msg = checked(path, expect_key, spec, against)
        if not ok:
            raise AuditBroken(f"{path}: {msg}; not exporting a broken log")
        from mllm_dr.atomic import atomic_write_text        # whole or nothing, mode 0600

        if out.suffix == ".csv":
            atomic_write_text(out, audit.export_csv(entries))
        else:
            import json

            atomic_write_text(out, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
        if json_out:
            emit_json({"log": str(path), "verified": True, "entries": len(entries), "out": str(out)})
        else:
            console.print(f"{len(entries)} entries -> {safe_text(out)}")

    for cmd in app.registered_commands:
        name = cmd.callback.__name__
        cmd.callback.__doc__ += f"\n\n    Example: {tool} audit {name} {where}{EXAMPLES[name]}"
    return app


def _parse_since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"--since {text!r} is not an ISO date or date-time (e.g. 2026-11-01 or "
                         "2026-11-01T08:00)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _after(entry: dict, start: datetime) -> bool:
    try:
        return datetime.fromisoformat(str(entry.get("time"))) >= start
    except (ValueError, TypeError):
        return True               # an unreadable time is shown, never hidden
