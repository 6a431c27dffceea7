"""`mllmdr-site data check | synth`: corpora as distributed, and synthetic ones."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from cli.common import console, emit_json, progress, safe_text
from mllm_dr.errors import InputError

data_app = typer.Typer(help="Check corpora and write synthetic ones.\n\nExample: mllmdr-site data check "
                            "/data/daic-woz --json", no_args_is_help=True)


class Fmt(str, Enum):
    auto = "auto"
    edaic = "edaic"
    daic = "daic"
    cmdc = "cmdc"


class SynthText(str, Enum):
    template = "template"
    free = "free"


class SynthFmt(str, Enum):
    edaic = "edaic"
    daic = "daic"
    cmdc = "cmdc"


@data_app.command("check")
def data_check(path: Path = typer.Argument(..., help="Corpus folder."),
               format: Fmt = typer.Option(Fmt.auto, "--format", "-f", help="Corpus layout; auto detects."),
               json_out: bool = typer.Option(False, "--json", help="Machine-readable report on stdout.")):
    """Validate a corpus as distributed: labels, modalities, readable media, one feature schema.

    Exit status, as linters do: 0 no problems; 1 problems found (all listed, also in --json);
    2 PATH is not a corpus (missing, a file, a folder holding several corpora) or unreadable.

    Example: mllmdr-site data check /data/E-DAIC --json
    """
    from mllm_dr.features.schema import checked_corpus

    corpus, _ = checked_corpus(path, format.value)
    report = corpus.to_report()
    if json_out:
        emit_json(report)
    else:
        _print_report(report, f"{corpus.format} corpus at {safe_text(path)}")
    if report["problems"]:
        raise typer.Exit(1)


def _print_report(report: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("id", "split", "total", "binary", "text", "audio", "visual", "turns", "unknown items"):
        table.add_column(col)
    for p in report["participants"]:
        m = p["modalities"]
        table.add_row(*(("-" if p[k] is None else safe_text(p[k])) for k in ("id", "split", "total", "binary")),
                      *(("yes" if m[k] else "-") for k in ("text", "audio", "visual")),
                      str(p["turns"]), str(sum(v is None for v in p["items"].values())))
    console.print(table)
    n = len(report["problems"])
    console.print(f"{len(report['participants'])} participants, {n} problem{'s' if n != 1 else ''}")
    for prob in report["problems"]:
        console.print(f"  [yellow]problem[/yellow] {safe_text(prob['path'])}: {safe_text(prob['message'])}",
                      highlight=False, soft_wrap=True)


@data_app.command("synth")
def data_synth(out: Path = typer.Argument(..., help="Folder to write site1 .. siteK into."),
               format: SynthFmt = typer.Option(SynthFmt.edaic, "--format", "-f"),
               participants: int = typer.Option(24, "--participants", "-n", min=1, help="Participants in total."),
               sites: int = typer.Option(3, "--sites", "-k", min=1),
               seed: int = typer.Option(0, "--seed"),
               seconds: float = typer.Option(6.0, "--seconds", min=0.5, help="Audio/video length per participant."),
               text: SynthText = typer.Option(SynthText.template, "--text", help="template: one sentence per item "
                                              "score; free: paraphrases, hedges, small talk, unasked items."),
               json_out: bool = typer.Option(False, "--json")):
    """Write a synthetic multi-site corpus in a real layout (NOT clinical data).

    OUT must be new, empty, or hold only sites this command wrote (siteN/SYNTHETIC.json); those are replaced, and surplus ones (siteN beyond --sites) removed.

    Example: mllmdr-site data synth /tmp/synth --format edaic --participants 24 --sites 3 --seed 0
    """
    from mllm_dr.synth import SynthConfig, _refuse_foreign_content, write_synthetic

    if participants < sites:
        raise InputError(f"--participants ({participants}) must be at least --sites ({sites})")
    # the refusals first, then the bar (session 46: a refused synth drew the bar, then its error); write_synthetic
    # makes the same check again (it is its own guard)
    _refuse_foreign_content(out)
    with progress() as bar:
        task = bar.add_task("writing sites", total=sites)
        paths = write_synthetic(SynthConfig(out, format.value, participants, sites, seed, seconds, text=text.value))
        bar.update(task, completed=len(paths))
    if json_out:
        emit_json({"sites": [str(p) for p in paths], "format": format.value, "text": text.value})
    else:
        for p in paths:
            console.print(f"wrote {safe_text(p)}")
