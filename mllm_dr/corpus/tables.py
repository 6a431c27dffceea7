"""Reading the corpora's CSV/TSV files defensively.

Every corpus file is read through :func:`read_table`, which never raises on a bad
row: it returns the good rows and appends a :class:`Problem` naming the file and
line for each bad one. Whole-file failures (missing, not text) raise InputError.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from mllm_dr.errors import InputError


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file, reported instead of raised."""

    path: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class DroppedRow(Problem):
    """A row :func:`read_table` dropped (malformed, or a file cut mid-row): in a feature table, a media
    problem that stops a strict extract (features.extract)."""


def add_folder(found: dict[str, Path], key: str, folder: Path, root: Path, twice: str) -> None:
    """Record ``folder`` as ``key``'s (a participant's or subject's session folder); a second folder of the
    same key is an error naming both (``twice``: "participant 300 has two session folders"): which interview
    is theirs cannot be guessed (session 41: the first one found was taken without a word)."""
    if key in found:
        raise InputError(f"{twice}, {found[key].relative_to(root)} and {folder.relative_to(root)}: keep one", root)
    found[key] = folder


def read_text(path: Path, fallback_encodings: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """Read a text file as UTF-8 (BOM tolerated).

    Returns (text, note). ``note`` is set when a fallback encoding had to be used,
    so callers can report it. Raises InputError when no encoding fits.
    """
    if not path.is_file():
        raise InputError("file is missing", path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as err:
        for enc in fallback_encodings:
            try:
                return raw.decode(enc), f"not UTF-8 (bad byte at offset {err.start}); decoded as {enc}"
            except UnicodeDecodeError:
                continue
        raise InputError(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})", path) from None


def _split_header(first_line: str, delimiter: str) -> list[str]:
    return [h.strip() for h in next(csv.reader([first_line], delimiter=delimiter))]


def sniff_header(first_line: str, delimiter: str) -> tuple[list[str], str]:
    """Header names and the delimiter that splits them (another one when the file was written with it)."""
    names = _split_header(first_line, delimiter)
    if len(names) == 1:
        for other in (",", "\t", ";"):
            if other != delimiter and len(_split_header(first_line, other)) > 1:
                return _split_header(first_line, other), other
    return names, delimiter


def read_header(path: Path, delimiter: str) -> list[str]:
    """Only the header names of a delimited file (cheap: the first line is read)."""
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        first = fh.readline()
    if not first.strip():
        raise InputError("file is empty", path)
    return sniff_header(first, delimiter)[0]


def read_table(
    path: Path,
    delimiter: str,
    required: tuple[str, ...] = (),
    problems: list[Problem] | None = None,
    header: bool = True,
    fallback_encodings: tuple[str, ...] = (),
    quoting: int = csv.QUOTE_MINIMAL,
    last_row_key: str | None = None,
) -> list[dict[str, str]]:
    """Rows of a delimited file as dicts keyed by stripped header names.

    - Header names are stripped (OpenFace writes ``frame, timestamp, ...``).
    - ``required`` columns are matched case-insensitively (DAIC's test split says
      ``participant_ID``) and returned under the spelling given in ``required``.
    - A file written with another delimiter than expected is re-read with the one
      its header uses, and that is reported as a problem.
    - A row with the wrong number of fields (a truncated file) is dropped and reported
      with its line number (a :class:`DroppedRow`).
    - ``quoting``: ``csv.QUOTE_NONE`` for plain tab-separated text, where a ``"`` is a character
      (DAIC transcripts: a turn starting with one would swallow the turns after it).
    - ``last_row_key``: a label file's id column; a last row that ends in an empty field with no newline
      after it is dropped as cut, naming that row's id (``_cut_after_delimiter``).
    """
    problems = problems if problems is not None else []
    text, note = read_text(path, fallback_encodings)
    if note:
        problems.append(Problem(str(path), note))
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise InputError("file is empty", path)
    if not header:
        return [dict(enumerate(r)) for r in csv.reader(io.StringIO(text), delimiter=delimiter)]  # type: ignore[misc]

    names, used = sniff_header(lines[0], delimiter)
    if used != delimiter:
        problems.append(Problem(str(path), f"expected {_delim_name(delimiter)}-separated values, "
                                f"found {_delim_name(used)}-separated; read with {_delim_name(used)}"))
        delimiter = used
    lower = {n.lower(): n for n in names}
    rename: dict[str, str] = {}
    missing = []
    for col in required:
        found = lower.get(col.lower())
        if found is None:
            missing.append(col)
        else:
            rename[found] = col
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)}; header is {names}", path)

    rows: list[dict[str, str]] = []
    # plain text is plain only tab-separated: a comma-separated copy quotes its fields that hold commas
    quoting = quoting if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True, quoting=quoting)
    last_line = 0                     # the line the last kept row ended on
    try:
        next(reader)
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(names):
                problems.append(DroppedRow(str(path), f"line {reader.line_num}: {len(row)} fields, header has "
                                           f"{len(names)} (truncated or malformed row dropped)"))
                continue
            rows.append({rename.get(n, n): v.strip() for n, v in zip(names, row)})
            last_line = reader.line_num
    except csv.Error as err:
        problems.append(DroppedRow(str(path), f"line {reader.line_num}: {err} (rest of file ignored)"))
    if last_row_key and rows and last_line == reader.line_num and \
            _cut_after_delimiter(text, rows[-1], names[-1], rename):
        row = rows.pop()
        problems.append(DroppedRow(str(path), f"line {last_line}: the file ends just after a delimiter (the last row's "
                                              f"final field is empty, no newline follows): the copy looks cut, so "
                                              f"the row of {last_row_key} {row.get(last_row_key)} is dropped"))
    return rows


def _cut_after_delimiter(text: str, last: dict[str, str], last_name: str, rename: dict[str, str]) -> bool:
    """Whether a label file looks cut just after a delimiter (session 44): its text does not end in a newline
    and its last row's final field is empty. Cut there, the row has every field and read as complete, its
    last value lost without a word (a DAIC row's PHQ8_Moving, say)."""
    return not text.endswith(("\n", "\r")) and last.get(rename.get(last_name, last_name)) == ""


def read_label_table(path: Path, delimiter: str, required: tuple[str, ...], problems: list[Problem],
                     missing: str | None) -> list[dict[str, str]] | None:
    """The rows of a split or label file, or None with a listed problem when the file is missing (``missing``
    says what that means; None: an optional file), empty, not text, or lacks a needed column: ``data check``
    lists it and completes (exit 1), as for a missing file, never exit 2 without a report. ``required[0]`` is
    the id column: a file cut just after a delimiter drops its last row, naming that id (session 44)."""
    if not path.is_file():
        if missing is not None:
            problems.append(Problem(str(path), missing))
        return None
    try:
        return read_table(path, delimiter, required, problems, last_row_key=required[0])
    except InputError as err:
        problems.append(Problem(str(path), f"{err.message}; the file is not used"))
        return None


@dataclass(frozen=True)
class TableScan:
    """What one pass over a feature table found (``scan_table``)."""

    rows: int                 # non-blank lines, the header not counted
    damage: str | None        # why the table cannot be read whole; None when it can


def scan_table(path: Path, delimiter: str, header: bool = True) -> TableScan:
    """Read a feature table once, line by line, for the media check (``data check``, ``extract``): its row
    count (the files of one segment must agree, features.schema) and what strict extraction would refuse in
    it. Since session 44 the whole file is read (a NUL byte mid-file was passed when only the first line and
    the last 64 KiB were)."""
    first = last = None
    lines, nul = 0, None
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if nul is None and b"\0" in line:
                nul = number
            if line.strip():
                lines += 1
                first = line if first is None else first
                last = line
    rows = lines - 1 if header and lines else lines
    return TableScan(rows, _damage(first, last, rows, nul, delimiter.encode(), header))


def _damage(first: bytes | None, last: bytes | None, rows: int, nul: int | None, delimiter: bytes,
            header: bool) -> str | None:
    """Why a table scanned by ``scan_table`` cannot be used whole (a copy or export that stopped or was
    damaged), or None."""
    if nul is not None:
        return f"a NUL byte on line {nul} (a damaged copy: the rows from there on cannot be read)"
    if first is None or last is None:
        return "the file is empty"
    if header and rows == 0:
        return "the file has a header but no rows"
    want, got = first.strip().split(delimiter), last.strip().split(delimiter)
    if len(got) < len(want):
        return (f"the file is truncated (cut mid-row): its last row has {len(got)} fields, its "
                f"{'header' if header else 'first row'} {len(want)}")
    if not got[-1].strip() and want[-1].strip():
        return "the file is truncated (cut after a delimiter): its last row ends in an empty field"
    return None


def parse_int(value: str | None, path: Path, what: str, problems: list[Problem],
              lo: int | None = None, hi: int | None = None) -> int | None:
    """An integer cell; empty -> None; garbage or out of range -> None plus a problem."""
    if value is None or value.strip() == "" or value.strip().lower() in {"nan", "na"}:
        return None
    try:
        number = float(value)
    except ValueError:
        problems.append(Problem(str(path), f"{what}: {value!r} is not a number"))
        return None
    if not math.isfinite(number):          # 'inf', '1e999': int() would raise OverflowError
        problems.append(Problem(str(path), f"{what}: {value!r} is not a finite number"))
        return None
    if number != int(number) or (lo is not None and number < lo) or (hi is not None and number > hi):
        problems.append(Problem(str(path), f"{what}: {value!r} is outside {lo}..{hi} or not an integer"))
        return None
    return int(number)


def _delim_name(d: str) -> str:
    return {",": "comma", "\t": "tab", ";": "semicolon"}.get(d, repr(d))
