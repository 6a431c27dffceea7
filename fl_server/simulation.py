"""The real ServerApp and ClientApp under Flower's simulation engine: N virtual sites, one machine.

Flower 1.42 facts this relies on (measured here): ``flower-superlink --simulation`` runs each
submitted run in a ``flwr-simulation`` process: the ServerApp in a thread, the ClientApp in Ray
actors (``flwr[simulation]``, the optional extra ``simulation``); the number of virtual nodes and
each ClientApp's CPUs are the federation's simulation config (``flwr federation simulation-config``).
The SuperLink serves the center's TLS certificate, so the ``flwr`` calls of a real run
(``fl_server/superlink.py``: submit, status, log) are the same. Everything listens on 127.0.0.1
and is stopped by PID, Ray's processes included (they are the SuperLink's descendants).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from fl_server.superlink import (CONNECTION, flower_env, flwr, superlink_command, superlink_log,
                                 superlink_pidfile)
from mllm_dr.center import CenterDir
from mllm_dr.errors import InputError
from mllm_dr.processes import alive, descendants, spawn, stop, stop_pidfile, wait_until, with_environment
from mllm_dr.rehearsal import SIMULATION_ENV

NOOP_FEDERATION = "@none/default"      # the federation of a SuperLink without accounts


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def tree_rss(*pids: int) -> int:
    """Resident bytes of processes and all their descendants (Ray's workers included)."""
    total = 0
    for p in {q for pid in pids for q in (pid, *descendants(pid))}:
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmRSS:")), 0)
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples ``tree_rss`` in a thread: the peak resident memory of process trees (and of the
    processes ``also()`` names at each sample)."""

    def __init__(self, *pids: int, also=None, interval: float = 0.5):
        self.pids, self.also, self.interval, self.peak = pids, also, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(*self.pids, *(self.also() if self.also else [])))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class SimulationLink:
    """A SuperLink in simulation mode for one center folder, with N virtual nodes."""

    def __init__(self, center: CenterDir, rehearsal_file: Path, threads: int = 1):
        self.center, self.rehearsal_file, self.threads = center, Path(rehearsal_file), threads
        self.proc = None
        self.ray_tmp: str | None = None

    @property
    def pidfile(self) -> Path:
        return superlink_pidfile(self.center)

    def start(self, timeout: float = 90) -> int:
        if not ray_available():
            raise InputError("the simulation engine needs Ray: pip install 'mllm-dr[simulation]' "
                             "(scripts/setup.sh installs it)")
        # Ray's socket paths must stay short: its session folder goes under a short /tmp path
        self.ray_tmp = tempfile.mkdtemp(prefix="mllmdr-ray-")
        env = flower_env(self.center.state_dir / "flwr-superlink", threads=self.threads)
        env.update({SIMULATION_ENV: str(self.rehearsal_file.resolve()), "RAY_TMPDIR": self.ray_tmp,
                    "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"})
        cmd = [c for c in superlink_command(self.center) if c != "--enable-supernode-auth"] + ["--simulation"]
        log = superlink_log(self.center)
        self.proc = spawn(cmd, log, self.pidfile, env=env, cwd=self.center.root)
        try:
            wait_until(self._answers, timeout, "simulation SuperLink", self.proc, log)
        except BaseException:
            self.stop()
            raise
        return self.proc.pid

    def _answers(self) -> bool:
        try:
            flwr(self.center, ["ls", CONNECTION, "--format", "json"], timeout=20)
            return True
        except Exception:    # not up yet
            return False

    def configure(self, sites: int, actors: int) -> None:
        """N virtual nodes; ``actors`` ClientApps at a time (one CPU each, Ray's accounting)."""
        flwr(self.center, ["federation", "simulation-config", NOOP_FEDERATION, CONNECTION, "--format", "json",
                           "--num-supernodes", str(sites), "--client-resources-num-cpus", "1",
                           "--init-args-num-cpus", str(actors), "--init-args-logging-level", "WARNING"])

    def started(self) -> list[int]:
        """Every process this link started, detached ones included (by the rehearsal variable)."""
        return with_environment(SIMULATION_ENV, str(self.rehearsal_file.resolve()))

    def stop(self) -> list[int]:
        """Stop the SuperLink, everything below it and whatever of Ray detached from it; returns the
        PIDs still alive (should be none)."""
        pids = set(self.started()) | ({self.proc.pid, *descendants(self.proc.pid)} if self.proc else set())
        stop_pidfile(self.pidfile, grace=15)
        if self.proc is not None:
            self.proc.poll()
        for _ in range(3):                      # Ray's processes that re-parented themselves
            left = self.started()
            if not left:
                break
            pids |= set(left)
            for pid in left:
                stop(pid, grace=5)
        if self.ray_tmp:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
            self.ray_tmp = None
        return sorted(p for p in pids if alive(p))


def rehearse(root: Path, sites: int, plan: dict, participants: int = 4, seed: int = 0, dropout_rate: float = 0.0,
             actors: int = 2, site_policies: dict[str, dict] | None = None, timeout: float = 1800,
             progress=None) -> dict:
    """Prepare (or reuse) ``sites`` virtual sites under ``root``, run ``plan`` (run-config keys, without
    center-dir) under the simulation engine, stop every process; returns the run's figures and history.

    Preparation is kept: a second call with the same root and number of sites reuses the workspaces."""
    from fl_server.plan import RunPlan
    from fl_server.superlink import run_log, submit_run, wait_run
    from mllm_dr.processes import free_port
    from mllm_dr.rehearsal import REHEARSAL_FILE, Rehearsal, dropout_schedule, prepare_sites, site_names
    from mllm_dr.run_folder import RunFolder

    root = Path(root).resolve()
    # every virtual site answers the handshake through `actors` ClientApps: the wait grows with the sites
    plan = {"node-timeout": max(60.0, 30.0 * sites / actors), "round-timeout": timeout, **plan}
    run_plan = RunPlan.model_validate({"center-dir": str(root / "center"), **plan})
    dropouts = dropout_schedule(site_names(sites), run_plan.total_rounds, dropout_rate, seed)
    if sites - len(dropouts.get(1, [])) < run_plan.min_sites:
        raise InputError(f"{sites} site(s) with dropout rate {dropout_rate} leave {sites - len(dropouts.get(1, []))} "
                         f"per round, fewer than the {run_plan.min_sites} a round needs (--min-sites)")
    started = time.perf_counter()
    if (root / "center" / "center.json").is_file():
        center = CenterDir(root / "center")
        workspaces = sorted(str(p.resolve()) for p in (root / "sites").glob("site*") if p.is_dir())
        if len(workspaces) != sites:
            raise InputError(f"this rehearsal folder holds {len(workspaces)} virtual sites, not {sites}; "
                             "use a new --dir", root)
    else:
        center = CenterDir.init(root / "center", port=free_port())
        workspaces = [str(p) for p in prepare_sites(root, center, sites, participants, seed,
                                                    site_policies=site_policies, progress=progress)]
    rehearsal = Rehearsal(workspaces=workspaces, dropouts=dropouts).write(root / REHEARSAL_FILE)
    prepared = time.perf_counter() - started
    folder = RunFolder(center.runs_dir, run_plan.run_name)
    link = SimulationLink(center, rehearsal, threads=max(threads_env() // actors, 1))   # no oversubscription
    try:
        link.start()
        link.configure(sites, actors)
        with PeakMemory(link.proc.pid, also=link.started) as memory:
            t0 = time.perf_counter()
            run_id = submit_run(center, run_plan.to_run_config())
            try:
                status = wait_run(center, run_id, timeout, progress_stamp=folder.history_stamp)
            finally:     # the run's log (ServerApp and ClientApps) is kept, finished or not
                run_seconds = time.perf_counter() - t0
                folder.root.mkdir(parents=True, exist_ok=True)
                folder.log_path.write_text(run_log(center, run_id))
    finally:
        stray = link.stop()
    hist = folder.history()
    rounds = hist.get("rounds", [])
    round_seconds = [r["round_seconds"] for r in rounds]
    return {"sites": sites, "base_model": run_plan.base_model, "run": run_plan.run_name, "dir": str(root),
            "flower_status": status, "status": hist.get("status"), "error": hist.get("error"),
            "prepare_seconds": round(prepared, 2), "run_seconds": round(run_seconds, 2),
            "round_seconds": [round(s, 2) for s in round_seconds],
            "rounds_per_minute": round(60 * len(rounds) / sum(round_seconds), 3) if rounds else None,
            "peak_rss_bytes": memory.peak, "actors": actors, "dropouts": {str(k): v for k, v in dropouts.items()},
            "rejected": {str(r["round"]): r["rejected"] for r in rounds}, "stray_pids": stray,
            "joined": len(hist.get("sites", [])), "not_joined": hist.get("not_joined", []),
            "evaluation": hist.get("evaluation", {}).get("pooled"), "log": str(folder.log_path)}


def threads_env() -> int:
    return max(int(os.environ.get("OMP_NUM_THREADS", 1)), 1)
