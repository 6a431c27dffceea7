"""Benchmark: CPU the coordinating center spends watching a run, beside the old every-2-s poll.

``mllmdr-center run`` waits for the Flower run by asking the SuperLink for its status, and each
ask is a ``flwr ls`` process (its imports cost most of a second of CPU). While a round trains, that
CPU is taken from the sites on the same machine (every site of the demo and of ``bench.federation``
runs beside the center). This starts a real SuperLink on 127.0.0.1 (a throwaway center folder), then
for ``--seconds`` each, in the same process:

- ``every_2s``: the wait before session 26: a status poll, then 2 s of sleep, again;
- ``kit``: ``fl_server.superlink.wait_run`` as the center runs it while no round ends (the run's
  history file unchanged): polls back off from 2 s to 30 s.

Both poll with the same ``flwr ls`` call. Reported: polls, the CPU seconds of their processes
(``getrusage(RUSAGE_CHILDREN)``), and that as a share of one core.

    .venv/bin/python -m bench.status_poll --seconds 120
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(poll_loop, seconds: float) -> dict:
    polls = []
    cpu0 = children_cpu()
    poll_loop(polls, seconds)
    cpu = children_cpu() - cpu0
    return {"polls": len(polls), "children_cpu_s": round(cpu, 2), "cpu_s_per_poll": round(cpu / max(len(polls), 1), 3),
            "share_of_one_core": round(cpu / seconds, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="how long each way of waiting is measured")
    args = ap.parse_args()

    from fl_server import superlink as sl
    from mllm_dr.center import CenterDir
    from mllm_dr.processes import ProcessError, free_port

    root = Path(tempfile.mkdtemp(prefix="mllmdr-bench-poll-"))
    center = CenterDir.init(root / "center", port=free_port())
    sl.start_superlink(center)
    try:
        def ls(polls: list) -> str:
            polls.append(time.monotonic())
            sl.flwr(center, ["ls", sl.CONNECTION, "--format", "json"])
            return "running"

        def every_2s(polls: list, seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                ls(polls)
                time.sleep(2)

        def kit(polls: list, seconds: float) -> None:
            with mock.patch.object(sl, "run_status", lambda _c, _r: ls(polls)), \
                 mock.patch.object(sl, "stop_run", lambda _c, _r: None):
                try:
                    sl.wait_run(center, 0, seconds, progress_stamp=lambda: None)
                except ProcessError:       # "did not finish within": the measured span is over
                    pass

        result = {"seconds": args.seconds, "every_2s": measure(every_2s, args.seconds), "kit": measure(kit, args.seconds)}
    finally:
        sl.stop_superlink(center)
        shutil.rmtree(root, ignore_errors=True)
    result["cpu_saved_share_of_one_core"] = round(result["every_2s"]["share_of_one_core"]
                                                  - result["kit"]["share_of_one_core"], 4)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
