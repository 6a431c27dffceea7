"""A federated run's folder at the center: the one owner of its layout and of ``history.json``.

    runs/<run>/history.json                 what `mllmdr-center status` shows (rewritten atomically)
    runs/<run>/plan.json                    the run plan it started with (a resumed run keeps it)
    runs/<run>/checkpoints/round-NNNN/      signed global adapters after each round (signing.py)
    runs/<run>/serverapp.log                the ServerApp's log, saved when a run fails
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mllm_dr.atomic import atomic_write_text, json_text
from mllm_dr.errors import InputError


class RunFolder:
    def __init__(self, runs_dir: Path, run: str):
        self.root = Path(runs_dir) / run
        self.run = run

    history_path = property(lambda self: self.root / "history.json")
    log_path = property(lambda self: self.root / "serverapp.log")
    plan_path = property(lambda self: self.root / "plan.json")

    def checkpoint(self, round_: int) -> Path:
        return self.root / "checkpoints" / f"round-{round_:04d}"

    def last_checkpoint(self) -> int | None:
        """The last round whose signed checkpoint is complete (a ``.partial`` folder does not count)."""
        done = sorted(p for p in (self.root / "checkpoints").glob("round-*")
                      if p.name[6:].isdigit() and (p / "checkpoint.json").is_file())
        return int(done[-1].name[6:]) if done else None

    # ----------------------------------------------------------------- plan
    def record_plan(self, config: dict) -> None:
        """The run config a (fresh) run starts with: what ``--resume`` must keep (fl_server/plan.py)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.plan_path, json.dumps(config, indent=1, sort_keys=True))

    def plan(self) -> dict | None:
        """The recorded run config; None when the run never started (or started before plans were kept)."""
        if not self.plan_path.is_file():
            return None
        try:
            plan = json.loads(self.plan_path.read_text())
        except ValueError as err:
            raise InputError(f"not a readable run plan ({err})", self.plan_path) from None
        if not isinstance(plan, dict):
            raise InputError("not a run plan (a JSON object of run-config keys)", self.plan_path)
        return plan

    def started(self) -> bool:
        """Whether a run of this name ever started here (a plan recorded or a checkpoint written)."""
        return self.plan_path.is_file() or self.last_checkpoint() is not None

    def final_step_done(self, total_rounds: int, evaluate: bool = False) -> bool:
        """Whether the final round's evaluation step reached at least one site (the final global went out), and
        with ``evaluate`` (the plan asks for the pooled evaluation) whether that step evaluated: a run completed
        with --no-evaluate and resumed with --evaluate evaluates then (session 44: it was "nothing to resume")."""
        hist, ev = self.history(), self.history().get("evaluation") or {}
        evaluated = ev.get("round") == total_rounds and bool(ev.get("sites"))
        delivered = hist.get("final_global_delivered_round") == total_rounds and bool(hist.get("final_global_delivered"))
        return evaluated or (delivered and not evaluate)

    # ----------------------------------------------------------------- history
    def history_stamp(self) -> tuple[int, int, int] | None:
        """Changes whenever ``history.json`` is rewritten (a round ended, the run ended): what the
        center's status polls wait on. The inode too: two atomic rewrites within one clock tick
        share a modification time, never an inode."""
        try:
            st = self.history_path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def history(self) -> dict:
        """The run's history ({} before it started); InputError naming the file when it is not one."""
        if not self.history_path.is_file():
            return {}
        try:
            data = json.loads(self.history_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"not a readable run history ({type(err).__name__})", self.history_path) from None
        if not isinstance(data, dict) or not isinstance(data.get("rounds", []), list):
            raise InputError("not a run history (a JSON object with a list of rounds)", self.history_path)
        return data

    def update(self, **fields) -> dict:
        data = self.history() or {"run": self.run, "rounds": []}
        data.update(fields, updated=time.time())
        self._write(data)
        return data

    def start(self, **fields) -> dict:
        """A (re)started run: clears a previous failure, keeps the rounds done so far."""
        data = self.history() or {"run": self.run, "rounds": []}
        data.pop("error", None)
        data.update(fields, status="running", updated=time.time())
        self._write(data)
        return data

    def add_round(self, entry: dict) -> None:
        data = self.history() or {"run": self.run, "rounds": []}
        data["rounds"] = [r for r in data.get("rounds", []) if r["round"] != entry["round"]] + [entry]
        data["updated"] = time.time()
        self._write(data)

    def fail(self, reason: str) -> None:
        self.update(status="failed", error=reason)

    def _write(self, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # strict JSON: a NaN metric (undefined precision, no head statistics, ...) is null, never bare NaN
        atomic_write_text(self.history_path, json_text(data, indent=1, default=float))


def latest_run(runs_dir: Path) -> str | None:
    runs = sorted(Path(runs_dir).glob("*/history.json"), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent.name if runs else None
