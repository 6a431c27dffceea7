"""End to end on the shared federation (tests/conftest.py ``federation``): real SuperLink and
SuperNodes on 127.0.0.1, TLS + node authentication, tiny-random base, one round per stage.
An E-DAIC-layout site and a DAIC-layout site federate through the center's feature recipe; a
site whose policy requires DP refuses and never trains. The run is the privacy issue's: sum-only
exact LoRA (ffa-lora) under a run policy that requires secure aggregation, so every training
round is masked across the three sites that join (the masking's properties are tested in-process
in tests/test_secagg.py and test_secagg_site.py; exact-lora runs end to end in
test_federation_faults.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_json, run_cli
from mllm_dr.processes import alive, free_port
from policies.schema import load_policy

pytestmark = pytest.mark.e2e

JOINED = ["site1", "site2", "site3"]


def _events(ws) -> list[dict]:
    return [json.loads(ln) for ln in (ws / "audit" / "audit.jsonl").read_text().splitlines()]


def secagg_policy() -> dict:
    pol = load_policy().model_dump() | {"min_participants": 2}      # tiny synthetic sites
    pol["secagg"].update(enabled=True, min_sites=3)
    return pol


def test_federated_run_heterogeneous_sites_signed_rounds(federation, tmp_path):
    fed, center = federation, federation.center
    wss = [fed.workspace(s) for s in JOINED]
    refusing = fed.workspace("site4")

    # the recipe came with the bundle: every site extracted it, whatever its corpus ships
    for ws in wss + [refusing]:
        manifest = json.loads((ws / "features" / "manifest.json").read_text())
        assert manifest["fingerprint"]["recipe"] == "egemaps-openface"
    status = cli_json("mllmdr-center", "status", "--dir", center)
    assert [n["status"] for n in status["supernodes"]] == ["online"] * 4

    # a node that made its own key but was never approved copies a real site's settings: refused
    rogue = tmp_path / "rogue"
    run_cli("mllmdr-site", "init", "--workspace", rogue, "--site-id", "rogue")
    cli_json("mllmdr-site", "enroll", "--workspace", rogue, "--out", tmp_path / "rogue.req")
    settings = json.loads((wss[0] / "federation.json").read_text())
    settings.update(node_key_path=str(rogue / "keys" / "node"), supernode_port=free_port())
    (rogue / "federation.json").write_text(json.dumps(settings))
    try:
        refused = run_cli("mllmdr-site", "train", "--workspace", rogue, "--federated", "--detach", "--wait", "0",
                          check=False)
    finally:
        pidfile = rogue / "federation" / "supernode.pid"
        pid = int(pidfile.read_text()) if pidfile.is_file() else None
        run_cli("mllmdr-site", "stop", "--workspace", rogue, check=False)
    assert pid is None or not alive(pid)
    assert refused.returncode == 2 and "not registered at the center" in refused.stderr, refused.stderr
    assert "Failed to activate SuperNode" in (rogue / "federation" / "supernode.log").read_text()

    policy = tmp_path / "secagg-policy.json"
    policy.write_text(json.dumps(secagg_policy()))
    result = fed.run("e2e", "--base-model", "tiny-random", "--stage1-rounds", "1", "--stage2-rounds", "1",
                     "--min-sites", "3", "--aggregation", "ffa-lora", "--policy", policy,
                     "--set", "local-steps=2", timeout=900)
    assert (result["flower_status"], result["status"]) == ("finished:completed", "completed")
    assert [(r["round"], r["stage"], r["sites"]) for r in result["rounds"]] == [(1, 1, 3), (2, 2, 3)]
    n_test = sum(p["split"] == "test" and p["total"] is not None
                 for c in fed.corpora[:3] for p in cli_json("mllmdr-site", "data", "check", c)["participants"])
    assert result["evaluation"]["n"] == n_test > 0      # pooled over the three sites, never the refusing one
    assert 0 <= result["evaluation"]["maa_mae"] <= 24    # the MAA head alone, pooled from its ss-maa-* statistics

    history = fed.history("e2e")
    assert history["sites"] == JOINED and set(history["rounds"][1]["sites"]) == set(JOINED)
    assert history["evaluation"]["sites"].keys() == set(JOINED)     # within-site figures, E-DAIC and DAIC

    # the refusing site: refused at the handshake, then never trained, never sent, never evaluated
    events = [e["event"] for e in _events(refusing)]
    assert "federation_refused" in events
    assert not {"federated_round", "dp_round", "federated_evaluation", "federated_final"} & set(events)
    assert all("site4" not in r["sites"] for r in history["rounds"])
    assert any("site4 refuses run e2e" in why for why in history["not_joined"])
    assert not (refusing / "checkpoints" / "federated").exists()

    after = cli_json("mllmdr-center", "status", "--dir", center)
    assert after["run"] == "e2e" and [r["round"] for r in after["rounds"]] == [1, 2]
    assert after["rounds"][1]["ratio_to_base"] > 0 and after["evaluation"]["n"] == n_test

    # the global adapters changed, stage by stage: LQ-formers in round 1, LoRA + MAA in round 2
    ck = center / "runs" / "e2e" / "checkpoints"
    g0, g1, g2 = (load_file(str(ck / f"round-000{r}" / "global.safetensors")) for r in range(3))
    changed = lambda a, b, prefix: any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))
    assert changed(g0, g1, "lq.") and not changed(g0, g1, "lora.") and not changed(g0, g1, "maa.")
    assert changed(g1, g2, "lora.") and changed(g1, g2, "maa.") and not changed(g1, g2, "lq.")
    assert all(torch.equal(g0[k], g2[k]) for k in g0 if "lora_A" in k)          # ffa-lora: A frozen, shared
    signed = json.loads((ck / "round-0002" / "checkpoint.json").read_text())
    assert signed["feature_recipe"] == "egemaps-openface"

    # one feature normalisation for the run, signed: the norms of the three joined sites' frames
    # together (what pooling them would give), summed from their handshake moments; never site4's
    from mllm_dr.federated import site_moments
    from mllm_dr.processor import norms_from_moments
    from mllm_dr.workspace import Workspace

    pooled = norms_from_moments([site_moments(Workspace(ws)) for ws in wss])
    assert set(signed["feature_norms"]) == set(pooled) == {"audio", "visual"}
    for m, (mean, std) in pooled.items():
        assert torch.allclose(torch.tensor(signed["feature_norms"][m]["mean"]), mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(torch.tensor(signed["feature_norms"][m]["std"]), std, rtol=1e-5, atol=1e-6)
    with_refusing = norms_from_moments([site_moments(Workspace(ws)) for ws in wss + [refusing]])
    assert not torch.allclose(with_refusing["audio"][0], pooled["audio"][0])
    assert {e.get("feature_moments_sent") for e in _events(wss[0]) if e["event"] == "federation_join"} == {True}

    # secure aggregation: every round masked across the three; stage 2 sent B + MAA only (no lora_A),
    # as int64 ring elements, + the masked weight; each site's keys used and gone
    assert history["secagg"] and [(r["round"], r["secagg"], len(r["sites"])) for r in history["rounds"]] == \
        [(1, True, 3), (2, True, 3)]
    b_maa = sum(t.numel() for k, t in g2.items() if "lora_B" in k or k.startswith("maa."))
    assert {s["bytes_up"] for s in history["rounds"][1]["sites"].values()} == {8 * (b_maa + 1)}
    assert all(0 <= r["aggregate_seconds"] <= r["round_seconds"] for r in history["rounds"])
    for ws in wss:
        masked = [e for e in _events(ws) if e["event"] == "secagg_masked" and e["run"] == "e2e"]
        assert [e["round"] for e in masked] == [1, 2] and all(len(e["sites"]) == 3 for e in masked)
        assert not list((ws / "federation" / "secagg").glob("e2e-*"))

    # every site verified the signed checkpoint of every round before training on it (resuming
    # from a signed checkpoint after a crash: test_federation_faults.py)
    for ws in wss:
        trained = [e for e in _events(ws) if e["event"] == "federated_round" and e["run"] == "e2e"]
        assert [(e["round"], e["verified_global_round"]) for e in trained] == [(1, 0), (2, 1)]
        assert [e["steps"] for e in trained] == [2, 2]      # --set local-steps=2: not the epoch's batches
        # where each message's time went, kept on site (the round overhead's parts, README "Does federating help?")
        for e in trained:
            assert set(e["seconds"]) == {"delivery", "process", "mods", "accept", "model", "validation", "train"}
            assert all(v >= 0 for k, v in e["seconds"].items() if k != "delivery") and e["seconds"]["train"] > 0
            assert e["seconds"]["delivery"] > -1    # psutil's process start rests on a whole-second boot time
        # what stage 2 trained on, in the site's own log (session 46: a site training on extractive rationales
        # alone was never told); stage 1 trains no answers
        src = trained[1]["rationale_sources"]
        assert src["teacher"] + src["extractive"] == trained[1]["examples"] and "rationale_sources" not in trained[0]
        kept = load_file(str(ws / "checkpoints" / "federated" / "latest" / "global.safetensors"))
        assert all(torch.equal(kept[k], g2[k]) for k in g2)

    # each side keeps the other side's signed audit heads (handshake, every round, the evaluation)
    for ws in wss:
        assert len((center / "sites" / f"{ws.name}.heads.jsonl").read_text().splitlines()) >= 4
        assert len((ws / "federation" / "center-heads.jsonl").read_text().splitlines()) >= 3
        cli_json("mllmdr-center", "audit", "verify", "--dir", center, "--json",
                 "--against", ws / "federation" / "center-heads.jsonl")
    center_events = [json.loads(ln)["event"] for ln in (center / "audit" / "audit.jsonl").read_text().splitlines()]
    assert center_events.count("site_audit_head") >= 12

    # the per-participant rows of the evaluation stay on site, in a local report
    assert (wss[0] / "reports" / "federated-e2e-test.md").is_file()

    # a site scores with the federated adapters; one flipped byte and it refuses
    test_id = next(p["id"] for p in cli_json("mllmdr-site", "data", "check", fed.corpora[0])["participants"]
                   if p["split"] == "test")
    scored = cli_json("mllmdr-site", "score", test_id, "--workspace", wss[0], "--max-new-tokens", "8")
    assert scored["adapters"] == "e2e/round-2"
    latest = wss[1] / "checkpoints" / "federated" / "latest" / "global.safetensors"
    good = latest.read_bytes()
    data = bytearray(good)
    data[-5] ^= 0x01
    latest.write_bytes(bytes(data))
    test2 = next(p["id"] for p in cli_json("mllmdr-site", "data", "check", fed.corpora[1])["participants"]
                 if p["split"] == "test")
    bad = run_cli("mllmdr-site", "score", test2, "--workspace", wss[1], "--json", check=False)
    latest.write_bytes(good)
    assert bad.returncode == 2 and "signature does not verify" in bad.stderr

    # a copy of site1 whose log is cut one entry short of the last head the center kept: its own
    # chain still verifies, the center's record does not
    cut = tmp_path / "site1-cut"
    shutil.copytree(wss[0], cut, ignore=shutil.ignore_patterns("features", "checkpoints"))
    heads = (center / "sites" / "site1.heads.jsonl").read_text().splitlines()
    entries = json.loads(heads[-1])["head"]["entries"]
    log = cut / "audit" / "audit.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:entries - 1]))
    assert cli_json("mllmdr-site", "audit", "verify", "--workspace", cut, "--json")["intact"]
    verdict = run_cli("mllmdr-site", "audit", "verify", "--workspace", cut, "--json",
                      "--against", center / "sites" / "site1.heads.jsonl", check=False)
    assert verdict.returncode == 2 and not json.loads(verdict.stdout)["intact"], verdict.stdout
