"""Faults with real processes: a SuperNode killed mid-round, the SuperLink killed between rounds
(resume from the last signed checkpoint, no round lost), a tampered center checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, cli_json, run_cli, wait_for
from mllm_dr.processes import alive, free_port, stop

pytestmark = pytest.mark.e2e


def _history(center: Path) -> dict:
    p = center / "runs" / "f" / "history.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def test_killed_supernode_killed_superlink_resume_and_tampered_checkpoint(tmp_path):
    from mllm_dr.synth import SynthConfig, write_synthetic

    sites = write_synthetic(SynthConfig(tmp_path / "synth", "edaic", participants=24, sites=3, seed=5, seconds=3.0))
    center = tmp_path / "center"
    cli_json("mllmdr-center", "init", "--dir", center, "--port", str(free_port()))
    wss = []
    for i, corpus in enumerate(sites):
        ws = tmp_path / f"site{i + 1}"
        run_cli("mllmdr-site", "init", "--workspace", ws, "--site-id", ws.name)
        run_cli("mllmdr-site", "extract", "--workspace", ws, "--corpus", corpus)
        cli_json("mllmdr-site", "enroll", "--workspace", ws, "--out", tmp_path / f"{ws.name}.req")
        cli_json("mllmdr-center", "approve", tmp_path / f"{ws.name}.req", "--dir", center, "--out", tmp_path / f"{ws.name}.b")
        cli_json("mllmdr-site", "enroll", "--workspace", ws, "--accept", tmp_path / f"{ws.name}.b",
                 "--supernode-port", str(free_port()))
        wss.append(ws)
    pidfile = lambda ws: ws / "federation" / "supernode.pid"     # noqa: E731
    run_args = ["run", "--dir", center, "--base-model", "tiny-random", "--stage1-rounds", "1", "--stage2-rounds", "2",
                "--name", "f", "--min-sites", "2", "--no-evaluate", "--timeout", "600"]
    runner = None
    try:
        cli_json("mllmdr-center", "serve", "--dir", center, "--detach")
        for ws in wss:
            cli_json("mllmdr-site", "train", "--workspace", ws, "--federated", "--detach")
        runner = subprocess.Popen([str(BIN / "mllmdr-center"), *map(str, run_args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        # site3's SuperNode dies while round 1 is under way
        wait_for(lambda: _history(center).get("site_nodes"), 240, "the handshake")
        stop(int(pidfile(wss[2]).read_text()), grace=5)
        # the round completes with the two others; then the SuperLink (and its ServerApp) is killed
        wait_for(lambda: len(_history(center).get("rounds", [])) >= 2, 400, "rounds 1 and 2")
        r1 = _history(center)["rounds"][0]
        assert sorted(r1["sites"]) == ["site1", "site2"] and "site3" in r1["rejected"]
        os.kill(int((center / "state" / "superlink.pid").read_text()), signal.SIGKILL)
        out, err = runner.communicate(timeout=120)
        assert runner.returncode != 0 and "Traceback" not in err
        done_before = [r["round"] for r in _history(center)["rounds"]]
        assert done_before in ([1, 2], [1, 2, 3])

        # restart everything; --resume continues from the last signed checkpoint
        run_cli("mllmdr-center", "stop", "--dir", center, check=False)
        cli_json("mllmdr-center", "serve", "--dir", center, "--detach")
        for ws in wss[:2]:
            run_cli("mllmdr-site", "stop", "--workspace", ws, check=False)
            cli_json("mllmdr-site", "train", "--workspace", ws, "--federated", "--detach")
        resumed = cli_json("mllmdr-center", *run_args[:-2], "--resume", "--timeout", "400", timeout=460)
        assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3] and resumed["status"] == "completed"
        for ws in wss[:2]:
            entries = [json.loads(x) for x in (ws / "audit" / "audit.jsonl").read_text().splitlines()]
            assert [e["verified_global_round"] for e in entries if e["event"] == "federated_round"][-1] == 2

        # one flipped byte in the center's last checkpoint: resuming from it is refused
        blob = center / "runs" / "f" / "checkpoints" / "round-0003" / "global.safetensors"
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 1
        blob.write_bytes(bytes(data))
        bad = run_cli("mllmdr-center", "run", "--dir", center, "--base-model", "tiny-random", "--stage1-rounds", "1",
                      "--stage2-rounds", "3", "--name", "f", "--resume", "--min-sites", "2", "--timeout", "300",
                      "--json", check=False, timeout=360)
        assert bad.returncode == 2 and "signature does not verify" in bad.stderr
    finally:
        if runner and runner.poll() is None:
            runner.kill()
            runner.wait()
        pids = [int(p.read_text()) for p in [pidfile(w) for w in wss] + [center / "state" / "superlink.pid"]
                if p.is_file()]
        for ws in wss:
            run_cli("mllmdr-site", "stop", "--workspace", ws, check=False)
        run_cli("mllmdr-center", "stop", "--dir", center, check=False)
    assert not [p for p in pids if alive(p)]
