"""mllmdr-center: what the coordinating center runs. It only ever sees adapter weights."""

from __future__ import annotations

import typer

from cli.common import console, run_app

app = typer.Typer(help="MLlm-DR coordinating center: aggregates adapter weights across sites.\n\n"
                       "Example: mllmdr-center version",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command()
def version():
    """Print the package version.

    Example: mllmdr-center version
    """
    from mllm_dr import __version__

    console.print(__version__)


@app.callback()
def _root():
    """Federation commands (init, approve, serve, run, status) arrive with the federation issue."""


main = run_app(app)

if __name__ == "__main__":
    main()
