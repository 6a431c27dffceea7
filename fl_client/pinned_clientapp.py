"""``python -m fl_client.pinned_clientapp``: Flower's own ``flwr-clientapp``, running the ClientApp
installed at this site, never code from the run's FAB.

Why. Flower 1.42's SuperNode (``--isolation subprocess``) starts ``flower-superexec``, which starts
``flwr-clientapp`` by name through PATH for every message. Flower's ``flwr-clientapp`` installs the
run's FAB (the app bundle the center submitted) and imports the component its pyproject names with
the FAB folder first on ``sys.path``. The kit's FAB ships ``fl_client/*.py``, so the FAB's copies of
the egress guard, the DP and SecAgg mods and the signature checks replaced the ones installed here,
and a FAB could name any other ClientApp. Anyone who can reach the center's Control API (it shares the
center's one port in 1.42) could submit such a FAB (a site-path review, session 45).

What it does. The site's SuperNode finds ``flwr-clientapp`` first in a kit-owned folder on its PATH
(``fl_client/supernode.py::clientapp_shim``): a shim that runs this module with the site's own
interpreter. Here Flower's loader is replaced by ``pinned_loader``: it reads the installed FAB's
pyproject only to check that its ``clientapp`` component is the kit's (``KIT_CLIENTAPP``), refuses any
other (Flower then answers the center with an error reply), and returns the ``fl_client.app.app``
object installed at this site without putting the FAB folder on ``sys.path``. Everything else is
Flower's code, unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

KIT_CLIENTAPP = "fl_client.app:app"      # the one component a run's FAB may name ([tool.flwr.app.components])
DEPENDENCY_INSTALL_FLAG = "--allow-runtime-dependency-installation"
REVIEW = "review fl_client/pinned_clientapp.py"


class ForeignClientApp(RuntimeError):
    """The run's FAB names a ClientApp other than the kit's, or cannot be read: the message is refused."""


def fab_clientapp(project_dir: Path) -> str:
    """The ``clientapp`` component the installed FAB at ``project_dir`` names (its pyproject is TOML: reading
    it runs nothing). ForeignClientApp when it names none."""
    from flwr.common.config import get_project_config

    try:
        return str(get_project_config(project_dir)["tool"]["flwr"]["app"]["components"]["clientapp"])
    except Exception as err:           # no pyproject, bad TOML, no such table: nothing to compare
        raise ForeignClientApp(f"the run's app bundle names no ClientApp this site can check "
                               f"({type(err).__name__})") from None


def installed_app():
    """The ``fl_client.app.app`` installed beside this module: the egress guard, DP and SecAgg mods this
    site reviewed. Imported here, where Flower would import the FAB's (``fl_client.app.LOADED`` keeps
    meaning "after the message was pulled"); ``fl_client`` itself was imported from the site's install
    when this module started, so its submodules resolve there whatever ``sys.path`` holds."""
    import fl_client.app as kit

    here = Path(__file__).resolve().parent
    if Path(kit.__file__).resolve().parent != here:
        raise ForeignClientApp(f"fl_client.app was imported from {kit.__file__}, not from this site's kit ({here})")
    return kit.app


def _refuse(reason: str):
    """Log one line (the SuperNode's log) and raise: Flower turns the exception into the error reply."""
    from logging import ERROR

    from flwr.supercore import log

    log(ERROR, "this site runs only its installed ClientApp (%s): %s", KIT_CLIENTAPP, reason)
    raise ForeignClientApp(f"this site runs only its installed ClientApp ({KIT_CLIENTAPP}): {reason}")


def pinned_loader(default_app_ref: str = "", app_path: str | None = None, multi_app: bool = True):
    """Stands in for Flower's ``get_load_client_app_fn`` (same arguments, ignored): a loader that takes
    (fab_id, fab_version, fab_hash) and returns the installed ClientApp, or refuses."""
    del default_app_ref, app_path, multi_app

    def load(fab_id: str, fab_version: str, fab_hash: str):
        from flwr.common.config import get_project_dir

        try:
            named = fab_clientapp(get_project_dir(fab_id, fab_version, fab_hash))
        except ForeignClientApp as err:
            _refuse(str(err))
        except ValueError as err:                      # a FAB id Flower cannot place
            _refuse(f"the run's app bundle id cannot be read ({err})")
        if named != KIT_CLIENTAPP:
            _refuse(f"the run's app bundle {fab_id!r} names ClientApp {named[:120]!r}")
        return installed_app()

    return load


def patch_loader() -> None:
    """Flower's ``flwr-clientapp`` loads the ClientApp through ``get_load_client_app_fn`` as imported into
    ``flwr.supernode.runtime.run_clientapp``; replace it there. Fails loudly when a Flower upgrade moved it
    (then nothing would be pinned)."""
    from flwr.supernode.runtime import run_clientapp as rc

    if not callable(getattr(rc, "get_load_client_app_fn", None)) or \
            "get_load_client_app_fn" not in rc.run_clientapp.__code__.co_names:
        raise RuntimeError("this Flower version loads the ClientApp elsewhere (flwr.supernode.runtime.run_clientapp"
                           f".get_load_client_app_fn is gone or unused); {REVIEW}")
    rc.get_load_client_app_fn = pinned_loader


def main() -> None:
    """Flower's ``flwr-clientapp`` with the loader pinned. A FAB's own dependencies are never installed:
    none of its code runs here."""
    patch_loader()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = ["flwr-clientapp", *(a for a in sys.argv[1:] if a != DEPENDENCY_INSTALL_FLAG)]
    flwr_clientapp()


if __name__ == "__main__":
    from fl_client.pinned_clientapp import main as pinned_main   # the named module's classes, not __main__'s

    pinned_main()
