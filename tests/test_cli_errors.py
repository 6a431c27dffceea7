"""What the CLI prints from outside the kit (paths, messages, corpus problems) is text: never rich markup,
never a terminal control sequence, and never a crash of the error handler itself."""

from __future__ import annotations

import json
import shutil

from conftest import FIXTURES, run_cli


def test_safe_text_escapes_markup_and_shows_control_characters():
    from rich.console import Console

    from cli.common import safe_text

    con = Console(record=True, width=200, force_terminal=False)
    raw = "a [/] [red]b[/red] \x1b[2J\x1b]0;t\x07 \r\x9b\x7f\nline"
    con.print(safe_text(raw), highlight=False)
    out = con.export_text()
    assert out == "a [/] [red]b[/red] \\x1b[2J\\x1b]0;t\\x07 \\x0d\\x9b\\x7f\nline\n", repr(out)
    con.print(safe_text("C:\\[x]"), highlight=False)            # a backslash before markup stays too
    assert con.export_text() == "C:\\[x]\n" and safe_text("tab\t") == "tab\t"


def test_an_error_naming_a_path_with_brackets_keeps_them_and_never_crashes(tmp_path):
    """`/data/DAIC [copy]/` lost `[copy]` in the one-line error (read as markup), and a path holding `[/]` raised
    MarkupError inside the error handler: a bare traceback and exit 1 instead of exit 2."""
    for name in ("DAIC [copy]", "a[/]b", "x\x1b[2Jy"):
        proc = run_cli("mllmdr-site", "data", "check", tmp_path / name, check=False)
        assert proc.returncode == 2, proc.stderr
        shown = name.replace("\x1b", "\\x1b")
        assert f"{tmp_path / shown}" in proc.stderr and "\x1b" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_data_check_problems_print_their_paths_as_text(tmp_path):
    """A problem in a corpus under `/data/E-DAIC [copy]/` was printed without `[copy]`; `[/]` crashed the report."""
    for name in ("E-DAIC [copy]", "E-DAIC [/]"):
        root = tmp_path / name
        shutil.copytree(FIXTURES / "edaic", root)
        (root / "dev_split.csv").unlink()
        proc = run_cli("mllmdr-site", "data", "check", root, check=False, env={"COLUMNS": "300"})
        assert proc.returncode == 1, proc.stderr
        assert f"problem {root / 'dev_split.csv'}: split file is missing" in proc.stdout, proc.stdout


def test_site_status_prints_paths_and_messages_as_text(tmp_path):
    """`status` printed a damaged ledger's message (which names the workspace) as markup: `[copy]` vanished and a
    workspace under `[/]` crashed the command."""
    from mllm_dr.workspace import Workspace

    for name in ("ws [copy]", "ws [/]"):
        ws = Workspace.init(tmp_path / name, "s1").root
        (ws / "privacy.json").write_text('{"rounds": [')
        proc = run_cli("mllmdr-site", "status", "-w", ws, check=False, env={"COLUMNS": "300"})
        assert proc.returncode == 0, proc.stderr
        assert (f"privacy: epsilon spent so far for the site's whole contribution: {ws / 'privacy.json'}: the privacy "
                "ledger is unreadable") in proc.stdout, proc.stdout
        assert json.loads(run_cli("mllmdr-site", "status", "-w", ws, "--json").stdout)["privacy"]["error"]
