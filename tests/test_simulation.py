"""Rehearsal of a consortium under Flower's simulation engine (issue 14, section 2).

Units: the virtual node's workspace and dropouts never apply to a real SuperNode; the dropout
schedule; a synthetic corpus split 10 ways. End to end: `mllmdr-center simulate` with 10 virtual
sites (tiny-random, one round per stage), a rehearsed dropout and a site whose policy refuses;
every process is stopped by PID, no simulation SuperLink is left running.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import run_cli
from mllm_dr.errors import InputError
from mllm_dr.processes import with_environment
from mllm_dr.rehearsal import (SIMULATION_ENV, Rehearsal, SimulatedDropout, dropout_schedule, node_workspace,
                               rehearse_dropout)


@pytest.fixture
def rehearsal_env(tmp_path, monkeypatch):
    path = Rehearsal(workspaces=["/virtual/site1", "/virtual/site2"], dropouts={2: ["site2"]}).write(
        tmp_path / "rehearsal.json")
    monkeypatch.setenv(SIMULATION_ENV, str(path))
    return path


def test_real_supernode_keeps_its_workspace_even_when_simulation_is_set(rehearsal_env):
    real = {"workspace": "/srv/hospital", "partition-id": 1}    # partition-id alone cannot redirect a real node
    assert node_workspace(real) == "/srv/hospital"
    rehearse_dropout(real, "site2", 2)                           # no dropout outside a simulation


def test_virtual_node_maps_partition_to_workspace_and_drops_when_told(rehearsal_env):
    assert node_workspace({"partition-id": 1, "num-partitions": 2}) == "/virtual/site2"
    with pytest.raises(SimulatedDropout, match="site2 drops out of round 2"):
        rehearse_dropout({"partition-id": 1}, "site2", 2)
    rehearse_dropout({"partition-id": 1}, "site2", 1)
    rehearse_dropout({"partition-id": 0}, "site1", 2)
    with pytest.raises(InputError, match="partition 5 has no workspace"):
        node_workspace({"partition-id": 5})


def test_node_without_workspace_is_refused_outside_a_simulation(monkeypatch):
    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    with pytest.raises(InputError, match="names no workspace"):
        node_workspace({"partition-id": 0})
    with pytest.raises(InputError, match="names no workspace"):
        node_workspace({})


@pytest.mark.parametrize("uplink", ["fp32", "int8"])
def test_clientapp_of_a_virtual_node_runs_the_site_path_and_fails_its_rehearsed_round(site_ws, flower_task, tmp_path,
                                                                                    monkeypatch, uplink):
    """The handshake (through the egress guard) answers from the partition's workspace; a train message
    of a round the rehearsal drops fails before anything is trained, whichever uplink encoding the run
    asks for (the uplink mod used to look the workspace up itself: a KeyError on every virtual node)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr.base_model import base_info
    from mllm_dr.config import ModelConfig
    from mllm_dr.protocol import TrainInstruction
    from mllm_dr.signing import load_private, sign_state

    path = Rehearsal(workspaces=[str(site_ws.root)], dropouts={1: ["site1"]}).write(tmp_path / "rehearsal.json")
    monkeypatch.setenv(SIMULATION_ENV, str(path))
    virtual = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config={})
    sha = base_info("tiny-random").sha256
    q = ConfigRecord({"run": "sim", "base-model": "tiny-random", "base-sha256": sha, "policy": ""})
    reply = app(Message(RecordDict({"config": q}), dst_node_id=7, message_type="query"), virtual)
    assert not reply.has_error() and reply.content["config"]["site-id"] == "site1"
    ctx = {"round": 0, "stage": 0, "base_model": "tiny-random", "base_sha256": sha, "run": "sim",
           "model": ModelConfig().to_dict(), "dims": {"audio": 25}}
    state = {"maa.v": torch.randn(4)}
    t = TrainInstruction(context=json.dumps(ctx), signature=sign_state(load_private(tmp_path / "center.key"), state,
                                                                         ctx),
                         policy="", round=1, stage=1, local_epochs=1, batch_size=2, lr_lq=1e-3, lr_lora=1e-3,
                         lr_maa=1e-3, uplink=uplink)
    msg = Message(RecordDict({"arrays": packed_record(state),
                              "config": ConfigRecord(t.to_record())}), dst_node_id=7, message_type="train")
    with pytest.raises(Exception, match="site1 drops out of round 1"):
        app(msg, virtual)


def test_dropout_schedule_draws_the_share_each_round_seeded():
    sites = [f"s{i}" for i in range(10)]
    a = dropout_schedule(sites, 3, 0.2, seed=1)
    assert sorted(a) == [1, 2, 3] and all(len(v) == 2 and set(v) <= set(sites) for v in a.values())
    assert a == dropout_schedule(sites, 3, 0.2, seed=1)
    assert dropout_schedule(sites, 3, 0.0) == {}
    with pytest.raises(InputError):
        dropout_schedule(sites, 3, 1.0)


def test_synthetic_corpus_splits_ten_ways_with_unique_ids(tmp_path):
    """Failed before the fix: from the 6th site the test ids met the train ids (FileExistsError)."""
    from mllm_dr.corpus import read_corpus
    from mllm_dr.synth import SynthConfig, write_synthetic

    sites = write_synthetic(SynthConfig(tmp_path, "edaic", participants=60, sites=10, seed=0, seconds=0.5))
    assert len(sites) == 10
    for site in sites:
        corpus = read_corpus(site)
        ids = [p.id for p in corpus.participants]
        assert len(ids) == 6 and len(set(ids)) == 6
        assert {p.split for p in corpus.participants} == {"train", "dev", "test"}


def test_simulate_refuses_bad_input_in_one_line(tmp_path):
    proc = run_cli("mllmdr-center", "simulate", "--sites", "3", "--dropout-rate", "0.5", "--dir", tmp_path / "r",
                   check=False)
    assert proc.returncode == 2 and "fewer than the 2 a round needs" in proc.stderr
    assert not (tmp_path / "r" / "sites").exists()        # refused before anything was prepared
    proc = run_cli("mllmdr-center", "simulate", "--sites", "3", "--site-policy-share", "0.5", check=False)
    assert proc.returncode == 2 and "needs --site-policy" in proc.stderr


def test_processes_are_found_by_the_rehearsal_variable_however_they_detached(tmp_path):
    """How `simulate` finds Ray's processes that re-parented themselves (then stops them by PID)."""
    import os
    import subprocess

    mark = str(tmp_path / "rehearsal.json")
    # The child says "ready" once it runs: Popen returns when exec closed its pipe, which is before the
    # kernel has set up the new environment (/proc/PID/environ is briefly empty on a loaded machine).
    child = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"]
    detached = subprocess.Popen(child, env={**os.environ, SIMULATION_ENV: mark}, start_new_session=True,
                                stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen(child, env={**os.environ, SIMULATION_ENV: mark + ".other"},
                             stdout=subprocess.PIPE, text=True)
    assert detached.stdout.readline() == other.stdout.readline() == "ready\n"
    try:
        assert with_environment(SIMULATION_ENV, mark) == [detached.pid]
    finally:
        for p in (detached, other):
            p.kill()
            p.wait()
            p.stdout.close()
    assert with_environment(SIMULATION_ENV, mark) == []


@pytest.mark.e2e
def test_ten_virtual_sites_rehearse_a_round_dropouts_and_policies(tmp_path):
    """One stage-2 round (the cheaper stage), no pooled evaluation: the e2e federation tests cover that."""
    strict = json.loads(open(__import__("policies.schema", fromlist=["x"]).default_policy_path()).read())
    strict["dp"]["enabled"] = True                  # the run has no DP: a site holding this refuses to join
    (tmp_path / "strict.json").write_text(json.dumps(strict))
    root = tmp_path / "rehearsal"
    proc = run_cli("mllmdr-center", "simulate", "--sites", "10", "--base-model", "tiny-random", "--stage1-rounds", "0",
                   "--stage2-rounds", "1", "--no-evaluate", "--dropout-rate", "0.2", "--site-policy",
                   tmp_path / "strict.json", "--site-policy-share", "0.1", "--dir", root, "--timeout", "600", "--json",
                   timeout=900)
    out = json.loads(proc.stdout)
    assert out["flower_status"] == "finished:completed" and out["status"] == "completed"
    assert out["stray_pids"] == [] and with_environment(SIMULATION_ENV, str(root.resolve() / "rehearsal.json")) == []
    assert out["joined"] == 9 and len(out["not_joined"]) == 1 and "site01" in out["not_joined"][0]
    hist = json.loads((root / "center" / "runs" / out["run"] / "history.json").read_text())
    assert [r["round"] for r in hist["rounds"]] == [1]
    r = hist["rounds"][0]
    dropped = [s for s in out["dropouts"]["1"] if s != "site01"]          # site01 was never asked
    assert dropped, "the seeded schedule drops a joined site"
    for site in dropped:
        assert "rehearsed dropout" in r["rejected"][site]
    assert sorted(r["sites"]) == sorted(set(hist["sites"]) - set(dropped))      # the rest made the round
    assert out["rounds_per_minute"] > 0 and out["peak_rss_bytes"] > 0
