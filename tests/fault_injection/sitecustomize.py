"""Fault injection for tests/test_private_files.py: on PYTHONPATH, this makes the real CLI hit an
unexpected exception (a bug), so the test can check where the traceback of an internal error goes.
Active only when MLLMDR_INJECT_FAULT is set; never on any installed path."""

import os

if os.environ.get("MLLMDR_INJECT_FAULT"):
    import mllm_dr.workspace

    def _bug(*args, **kwargs):
        raise RuntimeError("injected fault: a bug inside a command")

    mllm_dr.workspace.resolve_workspace = _bug
