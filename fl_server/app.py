"""ServerApp: runs at the center for one federated run.

1. Waits (bounded) for the sites, asks each for its feature widths and base-model hash.
2. Builds the round-0 global adapters (or, with ``resume``, loads the last signed checkpoint).
3. Runs the two-stage round schedule with ``AdapterFedAvg``; a pooled evaluation at the end.
"""

from __future__ import annotations

import os
import time
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_server.plan import RunPlan
from fl_server.strategy import AdapterFedAvg, checkpoint_dir

app = ServerApp()


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} site(s) connected after {timeout:.0f} s; the run needs {n}")
        time.sleep(1)


def handshake(grid: Grid, nodes: list[int], plan: RunPlan, base_sha256: str
              ) -> tuple[dict[int, str], dict[str, int], list[str]]:
    """node id -> site id of the sites that accepted the run (only they take part in it), the feature
    widths every site must share, and why the others did not join."""
    cfg = ConfigRecord({"run": plan.run_name, "base-model": plan.base_model, "base-sha256": base_sha256,
                        "policy": plan.policy})
    msgs = [Message(RecordDict({"config": cfg}), message_type="query", dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=plan.node_timeout + 120))
    sites, dims, problems = {}, {}, []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            problems.append(f"node {node}: {msg.error.reason}")
            continue
        site = str(msg.content.config_records["config"]["site-id"])
        m = msg.content.metric_records["metrics"]
        site_dims = {k[4:]: int(v) for k, v in m.items() if k.startswith("dim-")}
        if dims and site_dims != dims:
            problems.append(f"site {site}: feature widths {site_dims} differ from {dims}")
            continue
        dims = dims or site_dims
        sites[node] = site
        log(INFO, "site %s (node %d): %d training examples, feature widths %s", site, node,
            int(m["num-examples"]), site_dims)
    if len(sites) < plan.min_sites:
        raise RuntimeError(f"{len(sites)} site(s) ready, {plan.min_sites} needed: " + "; ".join(problems or ["no reply"]))
    return sites, dims, problems


def last_checkpoint(run_dir: Path) -> int | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("round-*") if (p / "checkpoint.json").is_file())
    return int(done[-1].name.split("-")[1]) if done else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = RunPlan.model_validate(dict(context.run_config))
    try:
        run(grid, plan)
    except Exception as err:   # leave the reason where `mllmdr-center run/status` read it, then fail the run
        record_failure(plan, f"{type(err).__name__}: {err}")
        raise


def record_failure(plan: RunPlan, reason: str) -> None:
    import json

    from mllm_dr.atomic import atomic_write_text

    path = Path(plan.center_dir) / "runs" / plan.run_name / "history.json"
    data = json.loads(path.read_text()) if path.is_file() else {"run": plan.run_name, "rounds": []}
    data.update(status="failed", error=reason, updated=time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, default=float))


def run(grid: Grid, plan: RunPlan) -> None:
    import torch

    from mllm_dr.base_model import base_info
    from mllm_dr.center import CenterDir
    from mllm_dr.federated import RunSpec, initial_state
    from mllm_dr.model import ModelOptions
    from mllm_dr.signing import load_private, read_checkpoint, write_checkpoint

    torch.set_num_threads(max(int(os.environ.get("OMP_NUM_THREADS", 1)), 1))
    from policies.schema import SitePolicy

    if plan.policy and SitePolicy.model_validate_json(plan.policy).secagg.enabled:
        raise RuntimeError("the run's policy requires secure aggregation, which this strategy does not provide "
                           "(see README: 'Secure aggregation'); refusing to start")
    center = CenterDir(Path(plan.center_dir))
    key = load_private(center.signing_key)
    info = base_info(plan.base_model)
    run_dir = center.run_dir(plan.run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    base_bytes = sum(f.stat().st_size for f in info.path.glob("*.safetensors"))

    nodes = wait_for_nodes(grid, plan.min_sites, plan.node_timeout)
    sites, dims, not_joined = handshake(grid, nodes, plan, info.sha256)
    opts = ModelOptions(lora_r=plan.lora_rank, lora_alpha=2 * plan.lora_rank, max_frames=plan.max_frames)
    spec = RunSpec(plan.run_name, plan.base_model, info.sha256, dims, opts)

    done = last_checkpoint(run_dir) if plan.resume else None
    if done is not None:
        state, meta = read_checkpoint(checkpoint_dir(run_dir, done), key.public_key(), info.sha256)
        if RunSpec.from_context(meta).dims != dims:
            raise RuntimeError(f"cannot resume {plan.run_name}: the sites' feature widths changed")
        log(INFO, "resuming %s after round %d (signed checkpoint verified)", plan.run_name, done)
    else:
        done = 0
        state = initial_state(spec, plan.seed)
        write_checkpoint(checkpoint_dir(run_dir, 0), key, state, spec.context(0, 0))
    remaining = plan.total_rounds - done
    strategy = AdapterFedAvg(plan, spec, key, run_dir, state, done, sites, base_bytes)
    strategy.history.set(sites=sorted(sites.values()), site_nodes={str(k): v for k, v in sites.items()},
                         not_joined=not_joined)
    if remaining > 0:
        strategy.start(grid, initial_arrays=strategy_arrays(state), num_rounds=remaining, timeout=plan.round_timeout)
    strategy.history.set(status="completed", final_round=plan.total_rounds)


def strategy_arrays(state):
    from flwr.app import ArrayRecord

    return ArrayRecord.from_torch_state_dict(state)
