"""Faults with real processes on the shared federation (tests/conftest.py): a SuperNode killed
mid-round, the SuperLink killed between rounds (resume from the last signed checkpoint, no round
lost), a tampered center checkpoint (refused before any site is asked). It runs after every other test of the shared federation
(``federation_last`` marker) and leaves it running again."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import BIN, ROOT, cli_json, run_cli, wait_for
from mllm_dr.processes import running_from_pidfile, stop

pytestmark = [pytest.mark.e2e, pytest.mark.federation_last]


def test_killed_supernode_killed_superlink_resume_and_tampered_checkpoint(federation):
    fed, center = federation, federation.center
    history = lambda: fed.history("f") if (center / "runs" / "f" / "history.json").is_file() else {}  # noqa: E731
    pidfile = lambda site: fed.workspace(site) / "federation" / "supernode.pid"                     # noqa: E731
    run_args = ["run", "--dir", center, "--base-model", "tiny-random", "--stage1-rounds", "1", "--stage2-rounds", "1",
                "--name", "f", "--min-sites", "2", "--no-evaluate", "--timeout", "600"]
    runner = subprocess.Popen([str(BIN / "mllmdr-center"), *map(str, run_args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        # site3's SuperNode dies while round 1 is under way
        wait_for(lambda: history().get("site_nodes"), 240, "the handshake", runner, [center / "state" / "superlink.log"])
        stop(int(pidfile("site3").read_text()), grace=5)
        # the round completes with the two others; then the SuperLink (and its ServerApp) is killed
        wait_for(lambda: len(history().get("rounds", [])) >= 1, 600, "round 1", runner,
                 [center / "state" / "superlink.log"])
        r1 = history()["rounds"][0]
        assert sorted(r1["sites"]) == ["site1", "site2"] and "site3" in r1["rejected"]
        os.kill(int((center / "state" / "superlink.pid").read_text()), signal.SIGKILL)
        out, err = runner.communicate(timeout=120)
        assert runner.returncode != 0 and "Traceback" not in err
        assert [r["round"] for r in history()["rounds"]] in ([1], [1, 2])
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()

    # the center comes back (as after a crash of its machine); the hospitals' SuperNodes that kept
    # running reconnect by themselves, site3 is started again; --resume continues from the last
    # signed checkpoint, nothing re-run
    round1 = (center / "runs" / "f" / "checkpoints" / "round-0001" / "global.safetensors").read_bytes()
    run_cli("mllmdr-center", "stop", "--dir", center, check=False)
    kept = {s: running_from_pidfile(pidfile(s)) for s in ("site1", "site2", "site4")}
    fed.start()
    assert all(running_from_pidfile(pidfile(s)) for s in fed.names)
    assert all(running_from_pidfile(pidfile(s)) == pid for s, pid in kept.items() if pid)
    resumed = cli_json("mllmdr-center", *run_args[:-2], "--resume", "--timeout", "400", timeout=460)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2] and resumed["status"] == "completed"
    assert (center / "runs" / "f" / "checkpoints" / "round-0001" / "global.safetensors").read_bytes() == round1
    for site in ("site1", "site2", "site3"):
        entries = [json.loads(x) for x in (fed.workspace(site) / "audit" / "audit.jsonl").read_text().splitlines()]
        assert [e["verified_global_round"] for e in entries
                if e["event"] == "federated_round" and e["run"] == "f"][-1] == 1

    # one flipped byte in the center's last checkpoint: resuming from it is refused
    blob = center / "runs" / "f" / "checkpoints" / "round-0002" / "global.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    starts = lambda: (center / "audit" / "audit.jsonl").read_text().count('"event": "run_start"')   # noqa: E731
    before = starts()
    bad = run_cli("mllmdr-center", *run_args[:-2], "--resume", "--timeout", "300", "--json", check=False, timeout=360)
    assert bad.returncode == 2 and "signature does not verify" in bad.stderr
    # a resume that would change what the run promised its sites is refused too (it used to take the defaults)
    other = run_cli("mllmdr-center", "run", "--dir", center, "--name", "f", "--resume", "--aggregation", "fedavg",
                    "--stage2-rounds", "2", "--policy", ROOT / "policies" / "demo-secagg.json", "--json",
                    check=False, timeout=120)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr
    for change in ("aggregation 'exact-lora' -> 'fedavg'", "stage2-rounds 1 -> 2", "policy (another policy)"):
        assert change in other.stderr, other.stderr
    assert starts() == before          # refused by the CLI: no Flower run was submitted, no site was asked
