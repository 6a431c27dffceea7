"""A coordinating center and K sites on 127.0.0.1, driven through the real CLIs (TLS, node
authentication, signed checkpoints), as hospitals would run them. Used by the federated
benchmark and by the end-to-end tests; every process is stopped by PID on exit.

    with LocalFederation(root, corpora, policies={"site3": {...}}) as fed:
        fed.start()
        result = fed.run("demo", "--base-model", "tiny-random", "--stage2-rounds", "1")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mllm_dr.processes import alive, free_port

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
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
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

    def start(self, sites: list[str] | None = None) -> None:
        """The SuperLink, then the sites' SuperNodes side by side (returns once every one is connected)."""
        cli_json("mllmdr-center", "serve", "--dir", self.center, "--detach", env=self.env)
        self.started = True
        cli_all([("mllmdr-site", "train", "--workspace", self.workspace(name), "--federated", "--detach", "--json")
                 for name in sites or self.names], env=self.env)

    def run(self, name: str, *options, timeout: float = 3600) -> dict:
        return cli_json("mllmdr-center", "run", "--dir", self.center, "--name", name, *options,
                        "--timeout", timeout, timeout=timeout + 120)

    def history(self, run: str) -> dict:
        return json.loads((self.center / "runs" / run / "history.json").read_text())

    def pids(self) -> list[int]:
        files = [self.center / "state" / "superlink.pid"] + [self.workspace(n) / "federation" / "supernode.pid"
                                                              for n in self.names]
        return [int(p.read_text()) for p in files if p.is_file()]

    def stop(self) -> list[int]:
        """Stop every SuperNode and the SuperLink; returns the PIDs still alive afterwards (should be none)."""
        pids = self.pids()
        for name in self.names:
            cli("mllmdr-site", "stop", "--workspace", self.workspace(name), check=False)
        cli("mllmdr-center", "stop", "--dir", self.center, check=False)
        return [p for p in pids if alive(p)]

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
