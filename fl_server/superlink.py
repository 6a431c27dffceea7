"""The center's Flower processes and CLI calls: SuperLink, node registration, runs.

Flower 1.42 facts this relies on (measured): one HTTPS port for the
SuperLink; node authentication with P-384 OpenSSH keys registered by ``flwr supernode
register``; a file database so registrations survive restarts (its SQLite busy timeout raised to
60 s by ``superlink_main``); ``flwr run --stream``
exits 0 even when a run failed, so the status is read back with ``flwr ls``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mllm_dr.center import CenterDir
from mllm_dr.errors import MllmDrError
from mllm_dr.processes import ProcessError, check_port, running_from_pidfile, spawn, stop_pidfile, wait_until

APP_ROOT = Path(__file__).resolve().parents[1]       # the folder holding pyproject.toml's [tool.flwr.app]
CONNECTION = "center"


def flower_bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def flower_env(home: Path, threads: int | None = None) -> dict:
    """Environment for a Flower process: own FLWR_HOME, no telemetry, no update check."""
    env = dict(os.environ)
    home.mkdir(parents=True, exist_ok=True)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # flower-superexec
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def cli_home(center: CenterDir) -> Path:
    """FLWR_HOME of the ``flwr`` CLI calls, with a connection to this center's SuperLink."""
    home = center.state_dir / "flwr-cli"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{center.config.address}"\nroot-certificates = "{center.pki / "ca.crt"}"\n')
    return home


def superlink_pidfile(center: CenterDir) -> Path:
    return center.state_dir / "superlink.pid"


def superlink_log(center: CenterDir) -> Path:
    return center.state_dir / "superlink.log"


def superlink_command(center: CenterDir) -> list[str]:
    pki = center.pki
    return [sys.executable, "-m", "fl_server.superlink_main", "--ssl-ca-certfile", str(pki / "ca.crt"),
            "--ssl-certfile", str(pki / "server.pem"), "--ssl-keyfile", str(pki / "server.key"),
            "--enable-supernode-auth", "--database", str(center.state_dir / "superlink.db"),
            "--host", center.config.host, "--port", str(center.config.port),
            "--disable-runtime-dependency-installation"]


def start_superlink(center: CenterDir, timeout: float = 60) -> subprocess.Popen | int:
    """Start the SuperLink in the background and register every approved site; returns the process."""
    pid = running_from_pidfile(superlink_pidfile(center))
    if pid:
        return pid
    # named before anything starts (a clash showed as "process exited with code N" and a log tail)
    check_port(center.config.port, "the center's port, 'mllmdr-center init --port'")
    log = superlink_log(center)
    proc = spawn(superlink_command(center), log, superlink_pidfile(center),
                 env=flower_env(center.state_dir / "flwr-superlink", threads=int(os.environ.get("OMP_NUM_THREADS", 1))),
                 cwd=center.root)
    try:
        wait_until(lambda: _superlink_answers(center), timeout, "SuperLink", proc, log)
        register_all(center)
        unregister_revoked(center)
    except BaseException:
        stop_pidfile(superlink_pidfile(center))
        raise
    return proc


def _superlink_answers(center: CenterDir) -> bool:
    try:
        flwr(center, ["supernode", "ls", CONNECTION, "--format", "json"], timeout=20)
        return True
    except MllmDrError:
        return False


def stop_superlink(center: CenterDir) -> bool:
    return stop_pidfile(superlink_pidfile(center))


def flwr(center: CenterDir, args: list[str], timeout: float = 60) -> dict:
    """Run a ``flwr`` CLI command against this center and return its JSON output."""
    try:
        res = subprocess.run([flower_bin("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                             env=flower_env(cli_home(center)), cwd=center.root)
    except subprocess.TimeoutExpired:
        raise ProcessError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''}: no answer after {timeout:.0f} s") from None
    try:
        out = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise ProcessError(f"flwr {' '.join(args[:2])} failed (exit {res.returncode}): "
                           f"{(res.stdout + res.stderr).strip()[-400:]}") from None
    if isinstance(out, dict) and out.get("success") is False:
        raise ProcessError(f"flwr {' '.join(args[:2])}: {out.get('error-message', out)}")
    return out


def register(center: CenterDir, site_id: str) -> str:
    """Register an approved site's node key with the running SuperLink ('already' is fine).

    The node id Flower assigns is kept in the site's record: revoking needs it.
    """
    pub = center.sites_dir / f"{site_id}.pub"
    try:
        out = flwr(center, ["supernode", "register", str(pub), CONNECTION, "--name", site_id, "--format", "json"])
    except ProcessError as err:
        if "already" in str(err).lower():
            return "already registered"
        raise
    if out.get("node-id"):
        center.update_site(site_id, node_id=str(out["node-id"]))
    return "registered"


def register_all(center: CenterDir) -> dict[str, str]:
    return {s["site_id"]: register(center, s["site_id"]) for s in center.approved_sites()}


def unregister(center: CenterDir, node_id: str) -> str:
    """Take a node key off the SuperLink: the node is refused at its next activation."""
    try:
        flwr(center, ["supernode", "unregister", str(node_id), CONNECTION, "--format", "json"])
    except ProcessError as err:
        if "not found" in str(err).lower() or "already" in str(err).lower():
            return "already unregistered"
        raise
    return "unregistered"


def node_id_of(center: CenterDir, rec: dict) -> str | None:
    return rec.get("node_id") or center.history_by_site().get(rec["site_id"], {}).get("node_id")


def unregister_revoked(center: CenterDir) -> dict[str, str]:
    """Revocations made while the SuperLink was down take effect when it starts."""
    done = {}
    for rec in center.revoked_sites():
        node = None if rec.get("unregistered") else node_id_of(center, rec)
        if node:
            done[rec["site_id"]] = unregister(center, node)
            center.mark_unregistered(rec["site_id"])
    return done


def revoke(center: CenterDir, site_id: str) -> dict:
    """Unregister the site's node key at the SuperLink (now if it runs, else at the next start)
    and move the site to the revoked list."""
    rec = center.site(site_id)
    node = node_id_of(center, rec)
    running = running_from_pidfile(superlink_pidfile(center))
    if running and not node:
        raise ProcessError(f"site {site_id}: its Flower node id is unknown (approved before node ids were kept and "
                           "never in a run); cannot unregister its key")
    status = unregister(center, node) if running else "at next serve"
    center.revoke(site_id, unregistered=bool(running))
    return {"site_id": site_id, "node_fingerprint": rec["fingerprint"], "node_id": node, "unregistered": status}


def sites_overview(center: CenterDir) -> list[dict]:
    """Approved sites with key fingerprints, approval time and when they were last seen:
    from ``flwr supernode ls`` while the SuperLink runs, else from the runs' histories."""
    from datetime import datetime, timezone

    from mllm_dr.audit_heads import latest

    live = None
    if running_from_pidfile(superlink_pidfile(center)):
        live = {str(n.get("node-id")): n for n in supernodes(center)}
    hist = center.history_by_site()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for rec in center.approved_sites():
        site, node = rec["site_id"], node_id_of(center, rec)
        row = {"site_id": site, "node_fingerprint": rec["fingerprint"], "audit_key": rec.get("audit_key", ""),
               "approved": rec.get("approved"), "node_id": node, "status": None, "last_seen": None, "seen_by": None}
        n = (live or {}).get(str(node))
        if n:
            seen = now if n.get("status") == "online" else next(
                (n[k] for k in ("offline-at", "online-at") if n.get(k) not in (None, "N/A")), None)
            row.update(status=n.get("status"), last_seen=seen, seen_by="superlink" if seen else None)
        elif live is not None:
            row["status"] = "not registered"
        h = hist.get(site, {})
        if not row["last_seen"] and h.get("time"):
            row.update(last_seen=datetime.fromtimestamp(h["time"], timezone.utc).isoformat(timespec="seconds"),
                       seen_by=f"run {h['run']} round {h['round']}")
        head = latest(center.site_heads_path(site))
        row["audit_head"] = f"{head['entries']}:{head['last_hash']}" if head else None
        rows.append(row)
    return rows


def supernodes(center: CenterDir) -> list[dict]:
    out = flwr(center, ["supernode", "ls", CONNECTION, "--format", "json"])
    return out.get("nodes", out.get("supernodes", [])) if isinstance(out, dict) else out


def submit_run(center: CenterDir, overrides: dict) -> int:
    """Start the app with run-config overrides (written to a TOML file of this call's own, removed after);
    returns the run id. One fixed state/run-config.toml let two `run` commands started together submit
    each other's plan (a review, session 44)."""
    import tempfile

    import tomli_w

    center.state_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="run-config-", suffix=".toml", dir=center.state_dir)
    cfg = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(tomli_w.dumps(overrides))
        out = flwr(center, ["run", str(APP_ROOT), CONNECTION, "--run-config", str(cfg), "--format", "json"],
                   timeout=120)
    finally:
        cfg.unlink(missing_ok=True)
    return int(out["run-id"])


def run_status(center: CenterDir, run_id: int) -> str:
    """'pending', 'starting', 'running', 'finished:completed', 'finished:failed', ..."""
    out = flwr(center, ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
    runs = out.get("runs", [])
    return runs[0].get("status", "unknown") if runs else "unknown"


def run_log(center: CenterDir, run_id: int, timeout: float = 60) -> str:
    """The run's log as ``flwr log`` shows it. Best effort (callers keep it in a ``finally``): a fetch that
    times out or cannot start gives what came back and a note, never an error that would hide the run's
    own outcome (session 46: a slow fetch turned a completed rehearsal into an internal error, exit 3)."""
    try:
        res = subprocess.run([flower_bin("flwr"), "log", str(run_id), CONNECTION, "--show"], capture_output=True,
                             text=True, timeout=timeout, env=flower_env(cli_home(center)), cwd=center.root)
    except subprocess.TimeoutExpired as err:        # subprocess.run killed and reaped the flwr process
        got = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in (err.stdout, err.stderr) if x)
        return got + f"\n[mllm-dr: 'flwr log {run_id}' gave no complete answer within {timeout:.0f} s; the log above " \
                     "is what came back, possibly nothing]\n"
    except OSError as err:
        return f"[mllm-dr: 'flwr log {run_id}' could not run: {err.strerror or err}]\n"
    return res.stdout + res.stderr


def stop_run(center: CenterDir, run_id: int) -> None:
    try:
        flwr(center, ["stop", str(run_id), CONNECTION, "--format", "json"])
    except ProcessError:
        pass


class RunTimedOut(ProcessError):
    """A run that did not finish within the caller's time (``wait_run`` stopped it)."""


STATUS_PATIENCE = 600.0   # seconds of unanswered status polls tolerated while the SuperLink process lives
POLL_FIRST_S, POLL_MAX_S, POLL_GROWTH = 2.0, 30.0, 1.5   # status polls back off while the run's history stays put


def wait_run(center: CenterDir, run_id: int, timeout: float, on_tick=None, progress_stamp=None) -> str:
    """Poll the run's status until it finishes. On a loaded machine one ``flwr ls`` can take longer than
    its 60 s: that alone never ends a run (which is healthy meanwhile); a SuperLink that is gone, or
    that has not answered for STATUS_PATIENCE seconds, does.

    Each poll is a ``flwr ls`` process, about a second of CPU (its imports; ``bench.status_poll``):
    every 2 s that took a fifth of a core from the sites training beside the center. So the time
    between polls grows from POLL_FIRST_S by POLL_GROWTH up to POLL_MAX_S while ``progress_stamp()``
    (the run's history file, rewritten when a round ends and when the run ends) stays the same; a
    change, or a SuperLink process that is gone (checked every second, no process started), polls at
    once and starts again at POLL_FIRST_S. ``on_tick`` is called every second.

    Whoever stops following the run stops it: past ``timeout`` (RunTimedOut), and on Ctrl-C (then the
    KeyboardInterrupt goes on to the caller); before session 44 Ctrl-C left the Flower run going."""
    try:
        return _follow(center, run_id, timeout, on_tick, progress_stamp)
    except KeyboardInterrupt:
        stop_run(center, run_id)
        raise


def _follow(center: CenterDir, run_id: int, timeout: float, on_tick, progress_stamp) -> str:
    """``wait_run``'s polls; RunTimedOut (the run stopped) past ``timeout``."""
    deadline = time.monotonic() + timeout
    status, unanswered_since = "unknown", None
    interval, next_poll = POLL_FIRST_S, time.monotonic()
    stamp = progress_stamp() if progress_stamp else None
    link = True                                            # the SuperLink process was there at the last tick
    while time.monotonic() < deadline:
        if time.monotonic() >= next_poll:
            try:
                status, unanswered_since = run_status(center, run_id), None
            except ProcessError as err:
                now = time.monotonic()
                unanswered_since = unanswered_since or now
                if not running_from_pidfile(superlink_pidfile(center)):
                    raise ProcessError(f"run {run_id}: the SuperLink is not running any more ({err})") from None
                if now - unanswered_since > STATUS_PATIENCE:
                    raise ProcessError(f"run {run_id}: the SuperLink has not answered for {now - unanswered_since:.0f} "
                                       f"s ({err}); the run may still be going: 'mllmdr-center status'") from None
                status = "waiting for the SuperLink to answer"
            if status.startswith("finished"):
                if on_tick:
                    on_tick(status)
                return status
            next_poll, interval = time.monotonic() + interval, min(interval * POLL_GROWTH, POLL_MAX_S)
        if on_tick:
            on_tick(status)
        time.sleep(1.0)
        now_stamp, now_link = (progress_stamp() if progress_stamp else None), bool(running_from_pidfile(
            superlink_pidfile(center)))
        if now_stamp != stamp or now_link != link:
            stamp, link, interval, next_poll = now_stamp, now_link, POLL_FIRST_S, time.monotonic()
    stop_run(center, run_id)
    raise RunTimedOut(f"run {run_id} did not finish within {timeout:.0f} s (last status {status}); stopped it")

