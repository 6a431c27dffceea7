"""What the benchmarks share: argument parsers that end in argparse's one-line error (exit 2), an output
folder that is only ever emptied when a benchmark made it, and a lock against two runs in one folder.

A benchmark review (session 45) found bare tracebacks on bad arguments (``--seeds a``, ``--sites 3,x``,
``--repeats 0``) and ``shutil.rmtree(args.out)`` on whatever folder was given: ``--out bench/results``
would have deleted the committed results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

# written into every folder a benchmark empties and refills; only a folder carrying it is ever emptied
MARKER = ".mllmdr-bench-output"


# ---------------------------------------------------------------- argument parsers (argparse ``type=``)
def _whole_number(text: str, least: int, says: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r}: must be {says}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (``--repeats 0``, ``--participants 0`` and ``--old-layers 0`` ended in a traceback)."""
    return _whole_number(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def number(text: str) -> float:
    """A float, ``inf`` included, never NaN."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def positive_number(text: str) -> float:
    value = number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be above 0")
    return value


def comma_list(item: Callable[[str], object], what: str = "value", allow_empty: bool = False,
               unique: bool = False) -> Callable[[str], list]:
    """A parser of ``A,B,C`` whose parts each go through ``item`` (one of the parsers above, or any
    callable raising ArgumentTypeError/ValueError): argparse turns a bad part into its one-line error."""
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts and not allow_empty:
            raise argparse.ArgumentTypeError(f"{text!r}: give at least one {what} (comma-separated)")
        out = []
        for p in parts:
            try:
                out.append(item(p))
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(str(err) + (f" (in {text!r})" if len(parts) > 1 else "")) from None
            except ValueError:
                raise argparse.ArgumentTypeError(f"{p!r} is not a {what}" + (f" (in {text!r})" if len(parts) > 1
                                                                               else "")) from None
        if unique and len(set(out)) < len(out):
            raise argparse.ArgumentTypeError(f"{text!r}: a {what} is given twice")
        return out

    parse.__name__ = f"comma-separated {what}s"       # argparse names the type in "invalid ... value"
    return parse


def as_text(parse: Callable[[str], object]) -> Callable[[str], str]:
    """``parse`` as a check only: the option keeps its text (as the reports have always stored it)."""
    def check(text: str) -> str:
        parse(text)
        return text

    check.__name__ = getattr(parse, "__name__", "value")
    return check


int_list = comma_list(int, "whole number")
positive_int_list = comma_list(positive_int, "positive whole number")
number_list = comma_list(number, "number")
positive_number_list = comma_list(positive_number, "positive number")


# ---------------------------------------------------------------- output folders
def refuse(message: str, prog: str | None = None) -> None:
    """One line on stderr and exit 2, as argparse's own errors do."""
    print(f"{prog or Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _marker_of(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_fresh_output(folder: Path, benchmark: str, keep: tuple[str, ...] = ()) -> None:
    """Refuse (exit 2, one line) a ``folder`` that ``fresh_output`` would not empty: one that is not a
    folder, a link, or a non-empty folder that ``benchmark`` did not write (no marker of its own). Also
    usable before any work starts, so the refusal comes before minutes of set-up."""
    folder = Path(folder)
    if folder.is_symlink():
        refuse(f"{folder} is a symbolic link: give the folder itself, or another --out")
    if not folder.exists():
        return
    if not folder.is_dir():
        refuse(f"{folder} exists and is not a folder: choose another --out")
    marker = _marker_of(folder)
    if marker is not None and marker.get("benchmark") == benchmark:
        return
    if not any(p.name not in keep for p in folder.iterdir()):
        return
    who = f"it was written by {marker.get('benchmark')}" if marker else f"it has no {MARKER} file"
    refuse(f"{folder} is not empty and not an output folder of {benchmark} ({who}): refusing to delete what is "
           f"in it; choose another --out, or empty it yourself")


def fresh_output(folder: Path, benchmark: str, keep: tuple[str, ...] = ()) -> Path:
    """``folder``, empty but for its marker (and the entries named in ``keep``), ready for ``benchmark``'s
    output. Only a folder this benchmark made before (it carries the marker) is emptied; a missing or
    empty folder is made; anything else is refused (exit 2), never deleted."""
    folder = Path(folder)
    check_fresh_output(folder, benchmark, keep)
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if p.name == MARKER or p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return mark(folder, benchmark)


def mark(folder: Path, benchmark: str) -> Path:
    """Write ``folder``'s marker: ``benchmark`` made it and may empty it when it runs again."""
    (Path(folder) / MARKER).write_text(json.dumps({"benchmark": benchmark, "what": "scratch output of a benchmark: "
                                                   "the benchmark empties this folder when it runs again"}) + "\n")
    return Path(folder)


@contextmanager
def exclusive_lock(folder: Path, name: str = "bench.lock", what: str = "") -> Iterator[Path]:
    """Hold an exclusive lock file ``folder/name`` (flock; released when the process ends, however it
    ends) for the ``with`` block; another holder means another run writes here: refused (exit 2)."""
    from mllm_dr.atomic import Busy, held_or_busy

    path = Path(folder) / name
    try:
        with held_or_busy(path):
            yield path
    except Busy as busy:
        refuse(f"{folder} is in use by another run{f' ({busy.holder})' if busy.holder else ''}{what}: "
               f"give each run its own --out")
