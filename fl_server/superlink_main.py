"""``python -m fl_server.superlink_main``: Flower's own ``flower-superlink``, with a longer SQLite
busy timeout.

Flower 1.42 opens its file database with ``busy_timeout = 5000`` ms. On a loaded machine (a
center shared with other work, several sites pushing multi-MB updates at the same moment) a
write can wait longer; the SuperLink then answers the site's push with HTTP 500 ("database is
locked") and the SuperNode does not retry, so the round waits for that site until its timeout.
Measured on the 2-core machine at load ~15. Everything else is Flower's code, unchanged.
"""

from __future__ import annotations

import sys

BUSY_TIMEOUT_MS = "60000"


def patch_busy_timeout() -> None:
    """Every SQLite connection the SuperLink opens from now on waits up to BUSY_TIMEOUT_MS for a lock."""
    from flwr.supercore import sql_mixin

    if not any(k == "busy_timeout" for k, _ in sql_mixin.SQLITE_PRAGMAS):
        raise RuntimeError("this Flower version sets no SQLite busy_timeout pragma; review fl_server/superlink_main.py")
    sql_mixin.SQLITE_PRAGMAS = tuple((k, BUSY_TIMEOUT_MS if k == "busy_timeout" else v)
                                     for k, v in sql_mixin.SQLITE_PRAGMAS)


def main() -> int:
    from flwr.superlink.cli import flower_superlink

    patch_busy_timeout()
    sys.argv[0] = "flower-superlink"
    return flower_superlink()


if __name__ == "__main__":
    sys.exit(main())
