"""``python -m fl_server.superlink_main``: Flower's own ``flower-superlink``, with a longer SQLite
busy timeout and the message objects (adapter tensors in transit) kept in memory.

Flower 1.42 opens its file database with ``busy_timeout = 5000`` ms. On a loaded machine (a
center shared with other work, several sites pushing multi-MB updates at the same moment) a
write can wait longer; the SuperLink then answers the site's push with HTTP 500 ("database is
locked") and the SuperNode does not retry, so the round waits for that site until its timeout.
Measured on the 2-core machine at load ~15.

With a file ``--database`` (the kit needs one: node registrations survive a restart) Flower 1.42
also keeps every message's objects (each tensor chunk of every global and every site's update) in
that file, through SQLAlchemy, one statement per object. Measured in the demo (3 sites, SmolLM2):
the SuperLink spent ~17 s of CPU per round handing out the globals while every site's ClientApp
waited in Flower's pull backoff (1, 2, 4, 8 s ...). With the objects in memory the demo took
675 s against 761 s in an earlier session (not a same-run comparison), but the sites' wait before
a round (17-18 s after the first round) stayed: it came from the number of objects, two per
tensor, which ``fl_server/wire.py`` now packs into one array per message (README, "Round overhead").
Objects in transit need no disk: a SuperLink that restarts loses the round in flight either way
(``mllmdr-center run --resume`` restarts it from the last signed checkpoint). So the link state
(nodes, runs, messages) stays in the file and the object store is Flower's own in-memory one.
Everything else is Flower's code, unchanged.
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


def patch_object_store() -> None:
    """The SuperLink's object store (message payloads) is Flower's InMemoryObjectStore whatever
    ``--database`` says; the link state still uses the database file."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink import config_loader

    if getattr(config_loader, "ObjectStoreFactory", None) is not ObjectStoreFactory:
        raise RuntimeError("this Flower version builds its object store elsewhere; review fl_server/superlink_main.py")
    config_loader.ObjectStoreFactory = lambda database=None: ObjectStoreFactory()   # default: in memory


def main() -> int:
    from flwr.superlink.cli import flower_superlink

    patch_busy_timeout()
    patch_object_store()
    sys.argv[0] = "flower-superlink"
    return flower_superlink()


if __name__ == "__main__":
    sys.exit(main())
