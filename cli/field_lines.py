"""A command's result for a person: a title line, then one aligned "name  value" line per field.

`init`, `approve`, `revoke`, `renew-cert` and `enroll` printed Python-style ``key=value`` pairs on one line
(session 47); their ``--json`` output is unchanged. Values are printed literally (``safe_text``) and never
wrapped, so a fingerprint copied from the terminal stays whole.
"""

from __future__ import annotations

from typing import Iterable

from cli.common import console, safe_text


def shown(value) -> str:
    """A value as an operator reads it: none as '-', a list comma-separated, a yes/no for a flag."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def field_lines(title: str, rows: Iterable[tuple[str, object]]) -> list[str]:
    rows = list(rows)
    width = max((len(name) for name, _ in rows), default=0)
    return [title] + [f"  {name.ljust(width)}  {shown(value)}" for name, value in rows]


def print_fields(title: str, rows: Iterable[tuple[str, object]], *notes: str) -> None:
    """Print ``title``, the aligned ``rows`` and then each note on its own line."""
    for line in [*field_lines(title, rows), *notes]:
        console.print(safe_text(line), highlight=False, soft_wrap=True)
