"""The one progress convention of the library: ``progress(description, advance, total)``.

A call with ``total > 0`` starts a new task of that size; later calls with ``total == 0``
advance it. The CLI turns this into rich progress bars; benchmarks and tests pass None.
"""

from __future__ import annotations

from typing import Callable, Optional

Progress = Optional[Callable[[str, int, int], None]]


def start(progress: Progress, description: str, total: int) -> None:
    if progress and total:
        progress(description, 0, total)


def advance(progress: Progress, n: int = 1) -> None:
    if progress:
        progress("", n, 0)
