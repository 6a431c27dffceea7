"""`audit verify | show | export`, shared by mllmdr-site (workspace log) and mllmdr-center."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer
from rich.table import Table

from cli.common import console, emit_json
from mllm_dr import audit
from mllm_dr.errors import MllmDrError


class AuditBroken(MllmDrError):
    pass


def audit_app(locate: Callable[[Optional[Path]], Path], location_opt, tool: str, where: str) -> typer.Typer:
    """A Typer group over the audit log that ``locate(location)`` returns."""
    app = typer.Typer(help="Verify, show and export the signed, hash-chained audit log.", no_args_is_help=True)

    @app.command()
    def verify(location: Optional[Path] = location_opt,
               expect_key: Optional[str] = typer.Option(None, "--expect-key",
                                                        help="Audit key fingerprint known from elsewhere."),
               json_out: bool = typer.Option(False, "--json")):
        """Exit 0 when every entry is intact; exit 2 naming the first bad entry (edited, deleted,
        reordered, or signed by another key)."""
        path = locate(location)
        ok, msg = audit.verify(path, expect_key)
        if json_out:
            emit_json({"intact": ok, "message": msg, "log": str(path)})
            if not ok:
                raise SystemExit(2)
            return
        if not ok:
            raise AuditBroken(f"{path}: {msg}")
        console.print(f"{path}: {msg}")

    @app.command()
    def show(location: Optional[Path] = location_opt,
             event: Optional[str] = typer.Option(None, "--event", help="Only this event (e.g. score, federated_round)."),
             actor: Optional[str] = typer.Option(None, "--actor"),
             since: Optional[str] = typer.Option(None, "--since", help="ISO date/time, e.g. 2026-11-01."),
             last: int = typer.Option(50, "--last", min=1),
             json_out: bool = typer.Option(False, "--json")):
        """The log as a table, filtered."""
        entries = [e for e in audit.read(locate(location)) if (not event or e["event"] == event)
                   and (not actor or e.get("actor") == actor) and (not since or e["time"] >= since)][-last:]
        if json_out:
            emit_json(entries)
            return
        t = Table(title=str(locate(location)))
        for c in ("seq", "time", "event", "actor", "details"):
            t.add_column(c, overflow="fold")
        for e in entries:
            details = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("seq", "time", "event", "actor", "prev",
                                                                                "sig", "key"))
            t.add_row(str(e["seq"]), e["time"], e["event"], str(e.get("actor")), details)
        console.print(t)

    @app.command()
    def export(location: Optional[Path] = location_opt,
               out: Path = typer.Option(..., "--out", help="CSV or JSONL (by extension)."),
               ):
        """Write the log (verified first) to CSV or JSONL for the hospital's records."""
        path = locate(location)
        ok, msg = audit.verify(path)
        if not ok:
            raise AuditBroken(f"{path}: {msg}; not exporting a broken log")
        entries = audit.read(path)
        from mllm_dr.atomic import atomic_write_text

        if out.suffix == ".csv":
            atomic_write_text(out, audit.export_csv(entries))
        else:
            import json

            atomic_write_text(out, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
        console.print(f"{len(entries)} entries -> {out}")

    for cmd in app.registered_commands:
        name = cmd.callback.__name__
        cmd.callback.__doc__ += f"\n\n    Example: {tool} audit {name} {where}" + (" --out audit.csv" if name == "export" else "")
    return app
