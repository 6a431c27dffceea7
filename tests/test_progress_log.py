"""Progress in a log: rich draws bars only on a terminal and, written to a file or a pipe, showed
nothing until the step ended (a 12-minute `mllmdr-center run` under nohup printed no line)."""

from __future__ import annotations

import io

from rich.console import Console

from cli.common import LogProgress, progress


def test_progress_written_to_a_log_prints_a_line_per_tenth_and_description():
    out = io.StringIO()
    bar = LogProgress(console=Console(file=out, force_terminal=False, width=200), transient=False)
    with bar:
        task = bar.add_task("training", total=20)
        for _ in range(20):
            bar.advance(task)
        bar.update(task, description="round 2: running")
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith(("training:", "round 2"))]
    assert lines[0].startswith("training: 0/20") and "training: 20/20" in out.getvalue()
    assert len([ln for ln in lines if ln.startswith("training:")]) == 11          # start + each tenth, not each step
    assert any(ln.startswith("round 2: running: 20/20") for ln in lines)
    assert isinstance(progress(), LogProgress)
