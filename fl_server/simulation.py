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
from mllm_dr.processes import (alive, descendants, spawn, stop, stop_pidfile, unsignalled, wait_until,
                               with_environment)
from mllm_dr.rehearsal import SIMULATION_ENV, folder_lock

NOOP_FEDERATION = "@none/default"      # the federation of a SuperLink without accounts
NEEDS_RAY = "the simulation engine needs Ray: pip install 'mllm-dr[simulation]' (scripts/setup.sh installs it)"
SECAGG_DROPOUTS = ("--dropout-rate with secure aggregation in the --policy: a rehearsed dropout happens after the "
                   "key exchange, which fails the round every time (so does a deployment's site dropping after the "
                   "key exchange; one dropping before it, which the round survives, is not rehearsed); rehearse "
                   "dropouts under a policy without secure aggregation")


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def tree_memory(*pids: int) -> tuple[int, int, str]:
    """(proportional bytes, resident bytes, measure) of processes and all their descendants. Proportional:
    each process's Pss from /proc/PID/smaps_rollup (a page shared by k processes counts 1/k in each, so
    the sum is the tree's real footprint); a process whose smaps_rollup cannot be read counts its VmRSS
    instead. ``measure`` says which: "pss", "rss" (none readable) or "pss+rss" (some fell back)."""
    pss = rss = 0
    kinds = set()
    for p in {q for pid in pids for q in (pid, *descendants(pid))}:
        fields = _kib_fields(f"/proc/{p}/smaps_rollup", ("Pss:", "Rss:"))
        if "Pss:" in fields:
            pss, rss = pss + fields["Pss:"], rss + fields.get("Rss:", fields["Pss:"])
            kinds.add("pss")
            continue
        fields = _kib_fields(f"/proc/{p}/status", ("VmRSS:",))
        if "VmRSS:" in fields:                      # smaps_rollup unreadable (an older kernel, another user)
            pss, rss = pss + fields["VmRSS:"], rss + fields["VmRSS:"]
            kinds.add("rss")
    return pss, rss, "+".join(sorted(kinds)) or "pss"


def _kib_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """The ``NAME: N kB`` lines of a /proc file, in bytes; {} when it cannot be read (a process gone)."""
    out = {}
    try:
        with open(path) as fh:
            for ln in fh:
                head = ln.split(None, 1)[0] if ln.strip() else ""
                if head in names and head not in out:
                    out[head] = int(ln.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


class PeakMemory:
    """Samples ``tree_memory`` in a thread: the peak memory of process trees (and of the processes
    ``also()`` names at each sample). ``peak``: the peak of the resident sum (VmRSS, as before session 46;
    ``bench.simulation`` compares it with its baseline, which uses this class too); ``peak_pss``: the peak
    of the proportional sum (shared pages counted once in all), ``measure``: what ``peak_pss`` is made of."""

    def __init__(self, *pids: int, also=None, interval: float = 0.5):
        self.pids, self.also, self.interval, self.peak, self.peak_pss, self.measure = pids, also, interval, 0, 0, "pss"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        kinds = set()
        while not self._stop.is_set():
            pss, rss, measure = tree_memory(*self.pids, *(self.also() if self.also else []))
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            kinds.update(measure.split("+"))
            self.measure = "+".join(sorted(kinds))
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
            raise InputError(NEEDS_RAY)
        # Ray's socket paths must stay short: its session folder goes under a short /tmp path
        self.ray_tmp = tempfile.mkdtemp(prefix="mllmdr-ray-")
        env = flower_env(self.center.state_dir / "flwr-superlink", threads=self.threads)
        env.update({SIMULATION_ENV: str(self.rehearsal_file.resolve()), "RAY_TMPDIR": self.ray_tmp,
                    "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"})
        cmd = [c for c in superlink_command(self.center) if c != "--enable-supernode-auth"] + ["--simulation"]
        log = superlink_log(self.center)
        self.proc = spawn(cmd, log, self.pidfile, env=env, cwd=self.center.root)
        try:
            # its own process first: a SuperLink answering on this port may be another's (session 46: a second
            # `simulate --dir D` took the first one's SuperLink for its own, then its stop() killed it)
            wait_until(lambda: self.proc.poll() is None and self._answers(), timeout, "simulation SuperLink",
                       self.proc, log)
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


def check_plan(root: Path, sites: int, plan: dict, dropout_rate: float = 0.0, seed: int = 0, actors: int = 2,
               timeout: float = 1800) -> tuple:
    """The rehearsal's run plan (run-config keys, without center-dir) validated for a rehearsal folder
    ``root``, and its dropout schedule; InputError, one line, when either cannot run, or when Ray is missing.
    `simulate` calls it before it makes a temporary folder (session 44: each refused plan left an empty one
    behind; session 46: without Ray, every site was prepared in a temporary folder before the refusal)."""
    from fl_server.plan import validated_plan
    from mllm_dr.rehearsal import dropout_schedule, site_names

    # every virtual site answers the handshake through `actors` ClientApps: the wait grows with the sites
    plan = {"node-timeout": max(60.0, 30.0 * sites / actors), "round-timeout": timeout, **plan}
    run_plan = validated_plan({"center-dir": str(Path(root).resolve() / "center"), **plan})
    if dropout_rate > 0 and run_plan.secagg.enabled:
        raise InputError(SECAGG_DROPOUTS)
    dropouts = dropout_schedule(site_names(sites), run_plan.total_rounds, dropout_rate, seed)
    if sites - len(dropouts.get(1, [])) < run_plan.min_sites:
        raise InputError(f"{sites} site(s) with dropout rate {dropout_rate} leave {sites - len(dropouts.get(1, []))} "
                         f"per round, fewer than the {run_plan.min_sites} a round needs (--min-sites)")
    if not ray_available():
        raise InputError(NEEDS_RAY)
    return run_plan, dropouts


def rehearse(root: Path, sites: int, plan: dict, participants: int = 4, seed: int = 0, dropout_rate: float = 0.0,
             actors: int = 2, site_policies: dict[str, dict] | None = None, timeout: float = 1800,
             progress=None, warn=None) -> dict:
    """Prepare (or reuse) ``sites`` virtual sites under ``root``, run ``plan`` (run-config keys, without
    center-dir) under the simulation engine, stop every process; returns the run's figures and history.

    Preparation is kept: a second call with the same root and the same sites, participants, seed and site
    policies reuses the workspaces; other options are refused (``rehearsal.reusable``). One rehearsal at a
    time uses ``root``: a second is refused while the first holds ``root/rehearsal.lock`` (session 46: two at
    once rewrote each other's record and stopped each other's processes). A run history the stopped run
    left "running" (a --timeout, Ctrl-C, a signal, a crash) is marked failed. ``warn(text)``: told the PIDs
    still alive after the stop when an exception ends the rehearsal (else they are ``stray_pids``)."""
    from mllm_dr.rehearsal import read_folder

    root = Path(root).resolve()
    run_plan, dropouts = check_plan(root, sites, plan, dropout_rate, seed, actors, timeout)
    read_folder(root)                # a file, or a folder of something else, is refused before the lock is made
    with _folder_lock(root):
        return _rehearse(root, sites, run_plan, dropouts, participants, seed, actors, site_policies, timeout,
                         progress, warn)


def _folder_lock(root: Path):
    """The rehearsal folder ``root`` for this process alone while the block runs (``rehearsal.folder_lock``)."""
    return folder_lock(root, "another 'mllmdr-center simulate'{holder} is using this rehearsal folder; wait for it to "
                             "end or give another --dir", root)


def _rehearse(root: Path, sites: int, run_plan, dropouts: dict, participants: int, seed: int, actors: int,
              site_policies: dict[str, dict] | None, timeout: float, progress, warn) -> dict:
    from fl_server.superlink import run_log, submit_run, wait_run
    from mllm_dr.rehearsal import REHEARSAL_FILE, Preparation, Rehearsal
    from mllm_dr.run_folder import RunFolder

    asked = Preparation(sites=sites, participants=participants, seed=seed, site_policies=site_policies or {})
    started = time.perf_counter()
    center, workspaces = _prepared(root, asked, progress)
    rehearsal = Rehearsal(workspaces=workspaces, dropouts=dropouts,
                          preparation=asked.model_copy(update={"complete": True})).write(root / REHEARSAL_FILE)
    prepared = time.perf_counter() - started
    folder = RunFolder(center.runs_dir, run_plan.run_name)
    link = SimulationLink(center, rehearsal, threads=max(threads_env() // actors, 1))   # no oversubscription
    status, ended = None, None
    try:
        link.start()
        link.configure(sites, actors)
        with PeakMemory(link.proc.pid, also=link.started) as memory:
            t0 = time.perf_counter()
            run_id = submit_run(center, run_plan.to_run_config())
            try:
                status = wait_run(center, run_id, timeout, round_ticker(folder, run_plan.total_rounds, progress),
                                  progress_stamp=folder.history_stamp)
            finally:     # the run's log (ServerApp and ClientApps) is kept, finished or not
                run_seconds = time.perf_counter() - t0
                folder.root.mkdir(parents=True, exist_ok=True)
                folder.log_path.write_text(run_log(center, run_id))
    except BaseException as err:
        ended = err
        raise
    finally:
        stray = unsignalled(link.stop)     # SIGTERM, SIGHUP: a second one does not cut the stop short
        _mark_stopped(folder, ended, status, timeout)
        if ended is not None and stray and warn:
            warn(stray_text(stray))
    hist = folder.history()
    rounds = hist.get("rounds", [])
    round_seconds = [r["round_seconds"] for r in rounds]
    return {"sites": sites, "base_model": run_plan.base_model, "run": run_plan.run_name, "dir": str(root),
            "flower_status": status, "status": hist.get("status"), "error": hist.get("error"),
            "prepare_seconds": round(prepared, 2), "run_seconds": round(run_seconds, 2),
            "round_seconds": [round(s, 2) for s in round_seconds],
            "rounds_per_minute": round(60 * len(rounds) / sum(round_seconds), 3) if rounds else None,
            "peak_rss_bytes": memory.peak, "peak_memory_bytes": memory.peak_pss, "memory_measure": memory.measure,
            "actors": actors, "dropouts": {str(k): v for k, v in dropouts.items()},
            "site_policy_holders": sorted(asked.site_policies),
            "rejected": {str(r["round"]): r["rejected"] for r in rounds}, "stray_pids": stray,
            "joined": len(hist.get("sites", [])), "not_joined": hist.get("not_joined", []),
            "evaluation": hist.get("evaluation", {}).get("pooled"), "log": str(folder.log_path)}


def stray_text(pids: list[int]) -> str:
    return (f"process(es) the rehearsal started still run after it stopped them: PID {', '.join(map(str, pids))}; "
            f"stop them by PID (kill {' '.join(map(str, pids))})")


def _mark_stopped(folder, ended: BaseException | None, status: str | None, timeout: float) -> None:
    """Once every process is stopped nothing runs the rehearsal's run: a history it left "running" (the run
    stopped on --timeout, Ctrl-C, a signal, or the ServerApp gone) is marked failed, as `mllmdr-center run`
    does (``cli.center_run._stopped``; session 46: it stayed "running"). One the ServerApp ended is kept."""
    from fl_server.superlink import RunTimedOut

    try:
        if folder.history().get("status") != "running":
            return
    except InputError:                # an unreadable history is left for the reader to name
        return
    if isinstance(ended, RunTimedOut):
        reason = f"--timeout {timeout:g} s"
    elif isinstance(ended, KeyboardInterrupt):
        reason = "interrupted (Ctrl-C)"
    elif ended is not None:
        reason = f"{type(ended).__name__}: {ended}"[:300]
    else:
        reason = f"the Flower run ended {status} before the ServerApp recorded its end"
    folder.fail(f"stopped by 'mllmdr-center simulate': {reason}")


def _prepared(root: Path, asked, progress) -> tuple[CenterDir, list[str]]:
    """The rehearsal center and the virtual sites' workspaces under ``root``: those a completed preparation
    with the same options left (``rehearsal.reusable``), else prepared now. The record is written first
    (incomplete: it marks the folder as a rehearsal's) and, by ``rehearse``, again once every site is
    enrolled (complete)."""
    from mllm_dr.processes import free_port
    from mllm_dr.rehearsal import REHEARSAL_FILE, Rehearsal, prepare_sites, read_folder, reusable, site_workspaces

    if reusable(root, read_folder(root), asked):
        return CenterDir(root / "center"), [str(p) for p in site_workspaces(root, asked.sites)]
    Rehearsal(workspaces=[], preparation=asked).write(root / REHEARSAL_FILE)
    center = CenterDir.init(root / "center", port=free_port())
    return center, [str(p) for p in prepare_sites(root, center, asked.sites, asked.participants, asked.seed,
                                                  site_policies=asked.site_policies, progress=progress)]


def round_ticker(folder, total_rounds: int, progress):
    """``wait_run``'s ``on_tick``: the rounds the run's history records as done, on the library's progress
    callback (session 44: `simulate` showed nothing while the run went on). The history is read only when
    it was rewritten (its stamp changed). None without a callback or rounds."""
    from mllm_dr import progress as prog

    if not progress or not total_rounds:
        return None
    prog.start(progress, f"{folder.run}: rounds done", total_rounds)
    done, seen = 0, None

    def tick(_status: str) -> None:
        nonlocal done, seen
        stamp = folder.history_stamp()
        if stamp == seen:
            return
        seen = stamp
        now = len(folder.history().get("rounds", []))
        if now > done:
            prog.advance(progress, now - done)
            done = now

    return tick


def threads_env() -> int:
    return max(int(os.environ.get("OMP_NUM_THREADS", 1)), 1)
