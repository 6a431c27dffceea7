"""End to end with secure aggregation on the shared federation (tests/conftest.py): an ffa-lora
run whose policy requires secure aggregation, every training round masked across the three sites
that join (the fourth refuses: its policy requires DP). ``check_secagg_run`` takes any running
``bench.deployment.LocalFederation`` with >= 3 joining sites."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from policies.schema import load_policy

pytestmark = pytest.mark.e2e


def secagg_policy() -> dict:
    pol = load_policy().model_dump() | {"min_participants": 2}      # tiny synthetic sites
    pol["secagg"].update(enabled=True, min_sites=3)
    return pol


def check_secagg_run(fed, name: str = "secagg", timeout: float = 900) -> dict:
    """One stage-2 round, masked (the masking is the same code for either stage's tensors; its
    properties are tested in-process in tests/test_secagg.py); checks what the center kept and what
    each site sent."""
    policy = fed.root / f"{name}-policy.json"
    policy.write_text(json.dumps(secagg_policy()))
    result = fed.run(name, "--base-model", "tiny-random", "--aggregation", "ffa-lora", "--stage1-rounds", "0",
                     "--stage2-rounds", "1", "--no-evaluate", "--min-sites", "3", "--policy", policy, timeout=timeout)
    assert result["status"] == "completed", result
    hist = fed.history(name)
    assert hist["secagg"] and [(r["round"], r["secagg"], len(r["sites"])) for r in hist["rounds"]] == \
        [(1, True, 3)]
    ck = fed.center / "runs" / name / "checkpoints"
    g0, g1 = (load_file(str(ck / f"round-000{r}" / "global.safetensors")) for r in range(2))
    changed = lambda a, b, part: any(not torch.equal(a[k], b[k]) for k in a if part in k)
    assert changed(g0, g1, "lora_B") and changed(g0, g1, "maa.") and not changed(g0, g1, "lora_A")   # A frozen
    assert not changed(g0, g1, "lq.")
    # stage 2 uplink: B + MAA only (no lora_A), as int64 ring elements, + the masked weight
    b_maa = sum(t.numel() for k, t in g1.items() if "lora_B" in k or k.startswith("maa."))
    assert {s["bytes_up"] for s in hist["rounds"][0]["sites"].values()} == {8 * (b_maa + 1)}
    assert len(hist["sites"]) >= 3
    for site in hist["sites"]:
        events = [json.loads(ln) for ln in (fed.workspace(site) / "audit" / "audit.jsonl").read_text().splitlines()]
        masked = [e for e in events if e["event"] == "secagg_masked" and e["run"] == name]
        assert [e["round"] for e in masked] == [1] and all(len(e["sites"]) == 3 for e in masked)
        assert not list((fed.workspace(site) / "federation" / "secagg").glob(f"{name}-*"))   # keys used, gone
    return hist


def test_a_masked_ffa_lora_run_through_real_processes(federation):
    check_secagg_run(federation)
