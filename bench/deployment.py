"""A coordinating center and K sites on 127.0.0.1, driven through the real CLIs (TLS, node
authentication, signed checkpoints), as hospitals would run them. Used by the federated
benchmark and by the end-to-end tests; every process is stopped by PID on exit, also when the
benchmark gets SIGTERM or SIGHUP inside ``with`` (kill, a timeout, a closed terminal): the SuperLink
and SuperNodes start in sessions of their own, so nothing else would stop them (a review, session 45).

    with LocalFederation(root, corpora, policies={"site3": {...}}) as fed:
        fed.start()
        result = fed.run("demo", "--base-model", "tiny-random", "--stage2-rounds", "1")
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from mllm_dr import processes
from mllm_dr.processes import alive, free_port, running_from_pidfile

BIN = Path(sys.executable).parent


class CliError(RuntimeError):
    def __init__(self, proc: subprocess.CompletedProcess):
        self.proc = proc
        super().__init__(f"{' '.join(map(str, proc.args[:3]))} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")


def cli(tool: str, *args, timeout: float = 900, env: dict | None = None, check: bool = True):
    """Run a console script; returns the CompletedProcess (raises CliError on a non-zero exit with check)."""
    proc = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise CliError(proc)
    return proc


def cli_json(tool: str, *args, **kw):
    return json.loads(cli(tool, *args, "--json", **kw).stdout)


def cli_all(calls: list[tuple], timeout: float = 900, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Run several console scripts side by side (one per site: independent folders); CliError on the first
    that fails, after all have ended."""
    procs = [subprocess.Popen([str(BIN / tool), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **(env or {})}) for tool, *args in calls]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except BaseException:       # a timeout, Ctrl-C, or SIGTERM turned into Stopped: none is left running
        for q in procs:
            if q.poll() is None:
                q.kill()
            q.wait()
        raise
    for proc in done:
        if proc.returncode != 0:
            raise CliError(proc)
    return done


class LocalFederation:
    """``root/center`` and one workspace ``root/<site>`` per corpus (sites named site1..siteK unless given)."""

    def __init__(self, root: Path, corpora: list[Path], names: list[str] | None = None,
                 policies: dict[str, dict] | None = None, threads: int = 1, feature_recipe: str = ""):
        self.root, self.corpora = Path(root), [Path(c) for c in corpora]
        self.feature_recipe = feature_recipe   # the center's; sites extract with it (it comes in their bundle)
        self.names = names or [f"site{i + 1}" for i in range(len(corpora))]
        self.policies = policies or {}
        self.center = self.root / "center"
        self.env = {"OMP_NUM_THREADS": str(threads)}
        self.started = False

    def workspace(self, site: str) -> Path:
        return self.root / site

    def setup(self, extract: bool = True) -> "LocalFederation":
        """Center keys; each site: workspace, policy, enrollment request -> approval -> bundle, features
        (extracted after enrollment, so they follow the federation's recipe from the bundle)."""
        cli_json("mllmdr-center", "init", "--dir", self.center, "--port", free_port(),
                 "--feature-recipe", self.feature_recipe)
        for name, corpus in zip(self.names, self.corpora):
            ws = self.workspace(name)
            cli("mllmdr-site", "init", "--workspace", ws, "--site-id", name)
            if name in self.policies:
                (ws / "policy.json").write_text(json.dumps(self.policies[name]))
            cli_json("mllmdr-site", "enroll", "--workspace", ws, "--out", self.root / f"{name}.request.json")
            cli_json("mllmdr-center", "approve", self.root / f"{name}.request.json", "--dir", self.center,
                     "--out", self.root / f"{name}.bundle.json")
            cli_json("mllmdr-site", "enroll", "--workspace", ws, "--accept", self.root / f"{name}.bundle.json",
                     "--supernode-port", free_port())
        if extract:             # each site on its own data, side by side
            cli_all([("mllmdr-site", "extract", "--workspace", self.workspace(name), "--corpus", corpus)
                     for name, corpus in zip(self.names, self.corpora)], env=self.env)
        return self

    def start(self, sites: list[str] | None = None, base_model: str | None = None) -> None:
        """The SuperLink, then the sites' SuperNodes side by side (returns once every one is connected).
        ``base_model``: a local model folder the sites load (a site takes only the kit's named bases from the
        center; a folder is the site's own ``--base-model``, session 45)."""
        from mllm_dr.base_model import EMBEDDED

        cli_json("mllmdr-center", "serve", "--dir", self.center, "--detach", env=self.env)
        self.started = True
        own = ["--base-model", base_model] if base_model and base_model not in EMBEDDED else []
        cli_all([("mllmdr-site", "train", "--workspace", self.workspace(name), "--federated", "--detach", "--json", *own)
                 for name in sites or self.names], env=self.env)

    def run(self, name: str, *options, timeout: float = 3600) -> dict:
        return cli_json("mllmdr-center", "run", "--dir", self.center, "--name", name, *options,
                        "--timeout", timeout, timeout=timeout + 120)

    def history(self, run: str) -> dict:
        return json.loads((self.center / "runs" / run / "history.json").read_text())

    def pids(self) -> list[int]:
        """The SuperLink's and the SuperNodes' PIDs from their pid files, each only while it is still the
        process the file was written for (a number reused by another process is never reported)."""
        files = [self.center / "state" / "superlink.pid"] + [self.workspace(n) / "federation" / "supernode.pid"
                                                              for n in self.names]
        return [pid for pid in map(running_from_pidfile, files) if pid is not None]

    def stop(self) -> list[int]:
        """Stop every SuperNode and the SuperLink; returns the PIDs still alive afterwards (should be none).
        The PIDs are taken before the stop commands (which remove the pid files); a stop command that
        fails to start or hangs does not keep the others from running."""
        pids = self.pids()
        calls = [("mllmdr-site", "stop", "--workspace", self.workspace(name)) for name in self.names]
        for tool, *args in calls + [("mllmdr-center", "stop", "--dir", self.center)]:
            try:
                cli(tool, *args, check=False, timeout=STOP_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                pass
        return [p for p in pids if alive(p)]

    def __enter__(self) -> "LocalFederation":
        """SIGTERM and SIGHUP become ``cli.common.Stopped`` inside ``with`` (main thread only: Python takes
        signals there), so ``__exit__`` runs and stops the processes."""
        from cli.common import stop_on_signals

        self._signals = stop_on_signals() if threading.current_thread() is threading.main_thread() else None
        if self._signals is not None:
            self._signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        """Stop everything; whatever is still alive after the stop commands is stopped by PID (with its
        children). A second signal does not cut the stopping short."""
        signals, interrupt = getattr(self, "_signals", None), None
        if signals is not None:
            interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
            for s in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_IGN)
        try:
            for pid in self.stop():
                processes.stop(pid)
        finally:
            if signals is not None:
                self._signals = None
                signals.__exit__(None, None, None)       # SIGTERM's and SIGHUP's handlers from before ``with``
                signal.signal(signal.SIGINT, interrupt)


STOP_TIMEOUT = 120      # seconds one stop command may take (it waits ~10 s per process it stops)
