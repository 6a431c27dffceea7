"""End to end: a real SuperLink and 2 SuperNodes on 127.0.0.1, TLS + node authentication,
tiny-random base, one round per stage. Every process is stopped by PID at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_json, run_cli
from mllm_dr.processes import alive, free_port
from policies.schema import default_policy_path

pytestmark = pytest.mark.e2e


def _site(tmp: Path, corpus: Path, name: str) -> Path:
    ws = tmp / name
    run_cli("mllmdr-site", "init", "--workspace", ws, "--site-id", name)
    policy = json.loads(default_policy_path().read_text()) | {"min_participants": 2}   # tiny synthetic sites
    (ws / "policy.json").write_text(json.dumps(policy))
    run_cli("mllmdr-site", "extract", "--workspace", ws, "--corpus", corpus)
    return ws


def _pids(*pidfiles: Path) -> list[int]:
    return [int(p.read_text()) for p in pidfiles if p.is_file()]


def test_two_sites_tls_auth_signed_rounds(tmp_path):
    from mllm_dr.synth import SynthConfig, write_synthetic

    sites = write_synthetic(SynthConfig(tmp_path / "synth", "edaic", participants=8, sites=3, seed=3, seconds=3.0))
    center = tmp_path / "center"
    cli_json("mllmdr-center", "init", "--dir", center, "--port", str(free_port()))
    wss = [_site(tmp_path, sites[i], f"site{i + 1}") for i in range(2)]
    # site3 is enrolled and connected, but its policy requires DP and the run has none: it refuses
    refusing = _site(tmp_path, sites[2], "site3")
    strict = json.loads((refusing / "policy.json").read_text())
    strict["dp"]["enabled"] = True
    (refusing / "policy.json").write_text(json.dumps(strict))
    for ws in wss + [refusing]:
        cli_json("mllmdr-site", "enroll", "--workspace", ws, "--out", ws.parent / f"{ws.name}.req")
        approved = cli_json("mllmdr-center", "approve", ws.parent / f"{ws.name}.req", "--dir", center,
                            "--out", ws.parent / f"{ws.name}.bundle")
        assert approved["registered"] == "at next serve"
        cli_json("mllmdr-site", "enroll", "--workspace", ws, "--accept", ws.parent / f"{ws.name}.bundle",
                 "--supernode-port", str(free_port()))
    # a third site made its own key but was never approved: it copies a real site's settings
    rogue = _site(tmp_path, sites[2], "rogue")
    cli_json("mllmdr-site", "enroll", "--workspace", rogue, "--out", tmp_path / "rogue.req")
    fed = json.loads((wss[0] / "federation.json").read_text())
    fed.update(node_key_path=str(rogue / "keys" / "node"), supernode_port=free_port())
    (rogue / "federation.json").write_text(json.dumps(fed))

    pidfiles = [center / "state" / "superlink.pid"] + [w / "federation" / "supernode.pid"
                                                        for w in wss + [refusing, rogue]]
    try:
        served = cli_json("mllmdr-center", "serve", "--dir", center, "--detach")
        assert served["sites_approved"] == ["site1", "site2", "site3"]
        for ws in wss + [refusing]:
            cli_json("mllmdr-site", "train", "--workspace", ws, "--federated", "--detach")
        refused = run_cli("mllmdr-site", "train", "--workspace", rogue, "--federated", "--detach", "--wait", "0",
                          check=False)
        assert refused.returncode == 2 and "not registered at the center" in refused.stderr, refused.stderr
        assert "Failed to activate SuperNode" in (rogue / "federation" / "supernode.log").read_text()

        status = cli_json("mllmdr-center", "status", "--dir", center)
        assert [n["status"] for n in status["supernodes"]] == ["online"] * 3

        result = cli_json("mllmdr-center", "run", "--dir", center, "--base-model", "tiny-random", "--stage1-rounds", "1",
                          "--stage2-rounds", "1", "--name", "e2e", "--timeout", "480", timeout=560)
        assert (result["flower_status"], result["status"]) == ("finished:completed", "completed")
        assert [(r["round"], r["stage"], r["sites"]) for r in result["rounds"]] == [(1, 1, 2), (2, 2, 2)]
        n_test = sum(p["split"] == "test" and p["total"] is not None
                     for s in sites[:2] for p in cli_json("mllmdr-site", "data", "check", s)["participants"])
        assert result["evaluation"]["n"] == n_test > 0      # pooled over both sites, never the refusing one

        # the refusing site: refused at the handshake, then never trained, never sent, never evaluated
        events = [json.loads(ln)["event"] for ln in (refusing / "audit" / "audit.jsonl").read_text().splitlines()]
        assert "federation_refused" in events
        assert not {"federated_round", "dp_round", "federated_evaluation", "federated_final"} & set(events)
        history = json.loads((center / "runs" / "e2e" / "history.json").read_text())
        assert all("site3" not in r["sites"] for r in history["rounds"]) and "site3" not in history["sites"]
        assert any("site3 refuses run e2e" in why for why in history["not_joined"])
        assert not (refusing / "checkpoints" / "federated").exists()

        after = cli_json("mllmdr-center", "status", "--dir", center)
        assert after["run"] == "e2e" and [r["round"] for r in after["rounds"]] == [1, 2]
        assert sorted(n["site"] for n in after["supernodes"] if n["site"]) == ["site1", "site2"]
        assert after["rounds"][1]["ratio_to_base"] > 0 and after["evaluation"]["n"] == n_test

        # the global adapters changed, stage by stage: LQ-formers in round 1, LoRA + MAA in round 2
        ck = center / "runs" / "e2e" / "checkpoints"
        g0, g1, g2 = (load_file(str(ck / f"round-000{r}" / "global.safetensors")) for r in range(3))
        changed = lambda a, b, prefix: any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))
        assert changed(g0, g1, "lq.") and not changed(g0, g1, "lora.") and not changed(g0, g1, "maa.")
        assert changed(g1, g2, "lora.") and changed(g1, g2, "maa.") and not changed(g1, g2, "lq.")

        # both sites verified the signed checkpoint of every round before training on it
        for ws in wss:
            entries = [json.loads(ln) for ln in (ws / "audit" / "audit.jsonl").read_text().splitlines()]
            rounds = [(e["round"], e["verified_global_round"]) for e in entries if e["event"] == "federated_round"]
            assert rounds == [(1, 0), (2, 1)]
            assert all(e["center"] == fed["center_fingerprint"] for e in entries if e["event"] == "federated_round")
            kept = load_file(str(ws / "checkpoints" / "federated" / "latest" / "global.safetensors"))
            assert all(torch.equal(kept[k], g2[k]) for k in g2)

        # each side keeps the other side's signed audit heads (handshake, every round, the evaluation)
        for ws in wss:
            kept_by_center = center / "sites" / f"{ws.name}.heads.jsonl"
            assert len(kept_by_center.read_text().splitlines()) >= 4
            assert len((ws / "federation" / "center-heads.jsonl").read_text().splitlines()) >= 3
            cli_json("mllmdr-center", "audit", "verify", "--dir", center, "--json",
                     "--against", ws / "federation" / "center-heads.jsonl")
        center_events = [json.loads(ln)["event"] for ln in (center / "audit" / "audit.jsonl").read_text().splitlines()]
        assert center_events.count("site_audit_head") >= 8

        # the per-participant rows of the evaluation stay on site, in a local report
        assert (wss[0] / "reports" / "federated-e2e-test.md").is_file()

        # resume: one more stage-2 round continues from the signed round-2 checkpoint, nothing re-run
        before = {r: (ck / f"round-000{r}" / "global.safetensors").read_bytes() for r in (1, 2)}
        more = cli_json("mllmdr-center", "run", "--dir", center, "--base-model", "tiny-random", "--stage1-rounds", "1",
                        "--stage2-rounds", "2", "--name", "e2e", "--resume", "--no-evaluate", "--timeout", "300",
                        timeout=360)
        assert [r["round"] for r in more["rounds"]] == [1, 2, 3]
        assert all((ck / f"round-000{r}" / "global.safetensors").read_bytes() == b for r, b in before.items())
        entries = [json.loads(ln) for ln in (wss[0] / "audit" / "audit.jsonl").read_text().splitlines()]
        assert [(e["round"], e["verified_global_round"]) for e in entries if e["event"] == "federated_round"][-1] == (3, 2)
        g2 = load_file(str(ck / "round-0003" / "global.safetensors"))

        # a site scores with the federated adapters; one flipped byte and it refuses
        test_id = next(p["id"] for p in cli_json("mllmdr-site", "data", "check", sites[0])["participants"]
                       if p["split"] == "test")
        scored = cli_json("mllmdr-site", "score", test_id, "--workspace", wss[0], "--max-new-tokens", "8")
        assert scored["adapters"] == "e2e/round-3"
        latest = wss[1] / "checkpoints" / "federated" / "latest" / "global.safetensors"
        data = bytearray(latest.read_bytes())
        data[-5] ^= 0x01
        latest.write_bytes(bytes(data))
        bad = run_cli("mllmdr-site", "score", test_id, "--workspace", wss[1], "--json", check=False)
        assert bad.returncode == 2 and "signature does not verify" in bad.stderr

        # site1's log is cut to one entry short of the last head the center kept: its own chain still
        # verifies, the center's record does not
        log = wss[0] / "audit" / "audit.jsonl"
        last = json.loads((center / "sites" / "site1.heads.jsonl").read_text().splitlines()[-1])["head"]["entries"]
        log.write_text("".join(log.read_text().splitlines(keepends=True)[:last - 1]))
        assert cli_json("mllmdr-site", "audit", "verify", "--workspace", wss[0], "--json")["intact"]
        cut = run_cli("mllmdr-site", "audit", "verify", "--workspace", wss[0], "--json",
                      "--against", center / "sites" / "site1.heads.jsonl", check=False)
        assert cut.returncode == 2 and not json.loads(cut.stdout)["intact"], cut.stdout
    finally:
        pids = _pids(*pidfiles)
        for ws in wss + [refusing, rogue]:
            run_cli("mllmdr-site", "stop", "--workspace", ws, check=False)
        run_cli("mllmdr-center", "stop", "--dir", center, check=False)
    assert not [p for p in pids if alive(p)], "processes left behind"
