"""The center's side of secure aggregation (the math is in ``mllm_dr/secagg.py``).

Before every masked training round the strategy runs ``key_exchange``: each accepted site
makes a key pair for (run, round) and sends its public key; the roster of keys travels with the
training message. After the round, ``unmask`` sums the masked replies: the center learns
sum_k n_k * delta_k and sum_k n_k, never one site's update. Every site that exchanged keys
must be in the sum (its masks are in everyone else's reply): if one drops, ``missing`` names it
and the strategy fails the round cleanly (nothing is decoded); ``--resume`` re-keys with the
sites still online.
"""

from __future__ import annotations

from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from mllm_dr.protocol import SECAGG_KEYS, SecAggKeysQuery, SecAggKeysReply, SiteId, malformed
from mllm_dr.secagg import WEIGHT, apply_sum, format_roster, public_key_problem, unmask_sum

SUM_ONLY = ("ffa-lora", "fedavg")     # aggregations that are a weighted sum of what the sites send


def key_exchange(grid, sites: dict[int, str], run: str, round_: int, base_sha256: str, policy: str,
                 timeout: float, center=None, local_epochs: int = 1) -> tuple[dict[int, str], dict[str, str]]:
    """node -> public key hex of the sites that answered, and why the others did not. The center
    (``CenterDir``) keeps the signed audit head each reply carries, as for every other reply."""
    q = SecAggKeysQuery(run=run, round=round_, base_sha256=base_sha256, policy=policy,
                        local_epochs=local_epochs if local_epochs != 1 else None)
    msgs = [Message(RecordDict({"config": ConfigRecord(q.to_record())}), message_type=SECAGG_KEYS, dst_node_id=n)
            for n in sites]
    keys, problems = {}, {}
    for msg in grid.send_and_receive(msgs, timeout=timeout):
        node = msg.metadata.src_node_id
        if node not in sites:
            continue
        if msg.has_error():
            problems[sites[node]] = msg.error.reason
            continue
        try:       # a reply this kit cannot read keeps that site out of the masked sum, named
            config, ours = dict(msg.content.config_records["config"]), SecAggKeysReply.keys()
            site = SiteId.from_record({k: v for k, v in config.items() if k not in ours}).site_id
            public_key = SecAggKeysReply.from_record({k: v for k, v in config.items() if k in ours}).public_key
        except (KeyError, ValueError) as err:
            problems[sites[node]] = malformed("key-exchange reply", err)
            continue
        if site != sites[node]:
            problems[sites[node]] = f"answered as {site!r}"
            continue
        why = public_key_problem(public_key) or \
            (center.keep_reply_head(site, config, run=run, round=round_) if center is not None else None)
        if why:
            problems[site] = why
            continue
        keys[node] = public_key
    for twice in {k for k in keys.values() if list(keys.values()).count(k) > 1}:    # pairs would mask with 0
        for node in [n for n, k in keys.items() if k == twice]:
            problems[sites[node]] = "sent the same public key as another site"
            del keys[node]
    for node, site in sites.items():
        if node not in keys and site not in problems:
            problems[site] = "no reply to the key exchange"
    for site, why in problems.items():
        log(WARNING, "round %d: %s not in the masked sum: %s", round_, site, why)
    log(INFO, "round %d: secure aggregation keys from %d site(s)", round_, len(keys))
    return keys, problems


def roster(sites: dict[int, str], keys: dict[int, str]) -> str:
    return format_roster({sites[n]: pub for n, pub in keys.items()})


def missing(sent: list[int], sites: dict[int, str], arrived: set[str]) -> list[str]:
    """The sites asked in a masked round whose masked reply is not usable: the sum cannot be unmasked."""
    return sorted(sites[n] for n in sent if sites[n] not in arrived)


def not_masked(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    """Is a reply not masked as a masked round requires (int64 ring elements of the global's shapes)?"""
    return any(t.dtype != torch.int64 or t.shape != (torch.Size([1]) if n == WEIGHT else reference[n].shape)
               for n, t in tensors.items())


def unmask(masked: list[dict[str, torch.Tensor]], reference: dict[str, torch.Tensor], declared: int,
           clip_norm: float | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """The new global tensors from the masked replies, and the norm of the averaged update."""
    sums, weight = unmask_sum(masked, reference, declared, clip_norm)
    new = apply_sum(reference, sums, weight)
    return new, float(sum(float((s / weight).pow(2).sum()) for s in sums.values()) ** 0.5)
