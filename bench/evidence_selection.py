"""Benchmark: does quote selection pick a true answer turn for each item?

On synthetic corpora (free text and template text, E-DAIC / DAIC / CMDC layouts), the
share of asked items whose selected evidence turn is one of the item's true answer turns
(recorded in SYNTHETIC.json), for the kit's selector (mllm_dr.evidence, via build_instances)
and, as the baseline in the same process, the keyword ranking the kit used before (item
keyword hits, participant turns counted double). Also the CPU cost of build_instances per
participant with a cold embedding cache (every turn encoded) and a warm one.

    .venv/bin/python -m bench.evidence_selection --participants 72 --sites 3 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path


def keyword_pick(turns, item: str, keywords: dict[str, list[str]]) -> int | None:
    """The pre-evidence.py selector: most keyword hits (participant turns x2), earliest on ties."""
    words = [w.lower() for w in keywords.get(item, [])]

    def relevance(i: int) -> int:
        return sum(turns[i].text.lower().count(w) for w in words) * (2 if turns[i].speaker == "Participant" else 1)

    order = sorted(range(len(turns)), key=lambda i: (-relevance(i), i))
    ranked = [i for i in order if turns[i].speaker == "Participant"]
    return ranked[0] if ranked else None


def measure(site_dirs: list[Path]) -> dict:
    from mllm_dr import evidence
    from mllm_dr.aspects import build_instances, load_keywords, load_question_map
    from mllm_dr.corpus import read_corpus
    from mllm_dr.grounding import load_answer_turns, selection_hits

    keywords, qmap = load_keywords(), load_question_map()
    enc = evidence.default_encoder()
    evidence.item_probabilities(["warm up"])          # item descriptions encoded once
    keep = set(enc.cache)
    hits = n = kw_hits = 0
    cold, warm = [], []
    for site in site_dirs:
        corpus, truth = read_corpus(site), load_answer_turns(site)
        for p in corpus.participants:
            for k in set(enc.cache) - keep:
                del enc.cache[k]
            t = time.perf_counter()
            insts = build_instances(corpus, p)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            build_instances(corpus, p)
            warm.append(time.perf_counter() - t)
            h, m = selection_hits(insts, truth)
            hits, n = hits + h, n + m
            for item in corpus.item_names:
                idx = [i for i, tt in enumerate(p.turns)
                       if corpus.format != "cmdc" or not qmap.get(item) or tt.question in qmap[item]]
                pick = keyword_pick([p.turns[i] for i in idx], item, keywords)
                kw_hits += bool(truth[p.id][item]) and pick is not None and idx[pick] in truth[p.id][item]
    return {"asked_items": n, "selector": round(hits / n, 3), "keywords_baseline": round(kw_hits / n, 3),
            "participants": len(cold), "cpu_s_per_participant_cold": round(statistics.mean(cold), 3),
            "cpu_s_per_participant_cold_max": round(max(cold), 3),
            "cpu_s_per_participant_warm": round(statistics.mean(warm), 4)}


def main() -> None:
    from cli.common import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--participants", type=int, default=72)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", default="edaic,daic,cmdc")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-evidence"))
    args = ap.parse_args()

    from mllm_dr import evidence
    from mllm_dr.synth import SynthConfig, write_synthetic

    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    evidence.default_encoder()
    result = {"encoder_load_s": round(time.perf_counter() - t, 2), "seed": args.seed,
              "participants": args.participants, "sites": args.sites, "runs": {}}
    for text in ("free", "template"):
        for fmt in args.formats.split(","):
            sites = write_synthetic(SynthConfig(args.out / text / fmt, fmt, args.participants, args.sites,
                                                args.seed, seconds=0.5, text=text))
            result["runs"][f"{text}/{fmt}"] = measure(sites)
            print(f"{text}/{fmt}: {result['runs'][f'{text}/{fmt}']}", flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
