"""Benchmark: does quote selection pick a true answer turn for each item?

On synthetic corpora (free text and template text, E-DAIC / DAIC / CMDC layouts), the
share of asked items whose selected evidence turn is one of the item's true answer turns
(recorded in SYNTHETIC.json), for the kit's selector (mllm_dr.evidence, via build_instances)
and, as the baseline in the same process, the keyword ranking the kit used before (item
keyword hits, participant turns counted double). The extractive training rationale
('The participant said "<quote>", which fits a score of N.') is scored by the grounding
checks for both quotes. Items never asked (no true answer turn) should get no quote: the
share that got one is reported for the kit's selector and, as further baselines in the same
process, for session 25's selector (no rapport topics in the small-talk class), session 24's
(also several items may quote one turn) and session 23's (also without the small-talk class and
the score floor; ``--no-session-23`` skips it). Also the CPU
cost of build_instances per participant with a cold embedding cache (every turn encoded; wall
and process CPU time) and a warm one (what a later command pays when the cache file is used).

    .venv/bin/python -m bench.evidence_selection --participants 72 --sites 3 --seed 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
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
    from mllm_dr.dataset import fallback_rationale
    from mllm_dr.grounding import RationaleStats, load_answer_turns, participant_texts, selection_hits

    keywords, qmap = load_keywords(), load_question_map()
    enc = evidence.default_encoder()
    evidence.item_probabilities(["warm up"])          # item descriptions encoded once
    keep = set(enc.cache)
    hits = n = kw_hits = turns = unasked = unasked_quoted = 0
    cold, cold_cpu, warm = [], [], []
    extractive, extractive_kw = RationaleStats(), RationaleStats()
    for site in site_dirs:
        corpus, truth = read_corpus(site), load_answer_turns(site)
        for p in corpus.participants:
            for k in set(enc.cache) - keep:
                del enc.cache[k]
            t, c = time.perf_counter(), time.process_time()
            insts = build_instances(corpus, p)
            cold.append(time.perf_counter() - t)
            cold_cpu.append(time.process_time() - c)
            t = time.perf_counter()
            build_instances(corpus, p)
            warm.append(time.perf_counter() - t)
            turns += len(p.turns)
            h, m = selection_hits(insts, truth)
            hits, n = hits + h, n + m
            never_asked = [i for i in insts if not truth[p.id].get(i.item)]
            unasked += len(never_asked)
            unasked_quoted += sum(bool(i.evidence_turns) for i in never_asked)
            labelled = [i for i in insts if i.label is not None]
            texts = participant_texts(p.turns)
            extractive.add({i.item: fallback_rationale(i) for i in labelled}, {i.item: i.label for i in labelled},
                           texts, {i.item: i.evidence_turns for i in labelled}, truth[p.id])
            kw_insts = []
            for item in corpus.item_names:
                idx = [i for i, tt in enumerate(p.turns)
                       if corpus.format != "cmdc" or not qmap.get(item) or tt.question in qmap[item]]
                pick = keyword_pick([p.turns[i] for i in idx], item, keywords)
                kw_hits += bool(truth[p.id][item]) and pick is not None and idx[pick] in truth[p.id][item]
                inst = next(i for i in labelled if i.item == item) if p.items.get(item) is not None else None
                if inst is not None and pick is not None:
                    kw_insts.append(replace(inst, evidence=p.turns[idx[pick]].text, evidence_turns=[idx[pick]]))
            extractive_kw.add({i.item: fallback_rationale(i) for i in kw_insts}, {i.item: i.label for i in kw_insts},
                              texts, {i.item: i.evidence_turns for i in kw_insts}, truth[p.id])
    return {"asked_items": n, "selector": round(hits / n, 3), "keywords_baseline": round(kw_hits / n, 3),
            "unasked_items": unasked, "unasked_items_quoted": round(unasked_quoted / unasked, 3) if unasked else None,
            "participants": len(cold), "turns_per_participant": round(turns / len(cold), 1),
            "wall_s_per_participant_cold": round(statistics.mean(cold), 3),
            "cpu_s_per_participant_cold": round(statistics.mean(cold_cpu), 3),
            "wall_s_per_participant_cold_max": round(max(cold), 3),
            "wall_s_per_participant_warm": round(statistics.mean(warm), 4),
            "extractive_rationales": _rounded(extractive.compute()),
            "extractive_rationales_keywords_baseline": _rounded(extractive_kw.compute())}


# item_queries.json's "none" before session 26 added rapport topics (studies, tastes, seasons)
SESSION_25_NONE = ("what I do for a living, my job", "my family, partner, children, brothers and sisters, pets",
                   "the weather and how I travelled here today", "where I grew up and where I live now",
                   "I don't know, hard to say, not sure")


def measure_earlier_selector(site_dirs: list[Path], session: int) -> dict:
    """Selection figures of an earlier selector: session 25's small-talk class had no rapport
    topics (SESSION_25_NONE); session 24's also let several items quote one turn
    (ONE_QUOTE_PER_TURN off); session 23's also had no small-talk class and no score floor."""
    from contextlib import ExitStack
    from unittest import mock

    from mllm_dr import evidence

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(evidence, "none_descriptions", lambda: SESSION_25_NONE))
        if session <= 24:
            stack.enter_context(mock.patch.object(evidence, "ONE_QUOTE_PER_TURN", False))
        if session == 23:
            stack.enter_context(mock.patch.object(evidence, "none_descriptions", lambda: ()))
            stack.enter_context(mock.patch.object(evidence, "MIN_EVIDENCE_SCORE", 0.0))
        m = measure(site_dirs)
    return {k: m[k] for k in ("selector", "unasked_items_quoted", "extractive_rationales")}


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def main() -> None:
    from cli.common import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--participants", type=int, default=72)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", default="edaic,daic,cmdc")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-evidence"),
                    help="emptied first: only a folder this benchmark made, or an empty one")
    ap.add_argument("--no-session-23", action="store_true", help="skip the session-23 selector baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU figure is per process)")
    args = ap.parse_args()
    from bench.common import check_fresh_output, fresh_output

    check_fresh_output(args.out, "bench.evidence_selection")     # refused before the encoder loads
    import torch

    torch.set_num_threads(args.threads)
    from mllm_dr import evidence
    from mllm_dr.synth import SynthConfig, write_synthetic

    fresh_output(args.out, "bench.evidence_selection")          # never a folder this benchmark did not make
    t = time.perf_counter()
    evidence.default_encoder()
    result = {"encoder_load_s": round(time.perf_counter() - t, 2), "seed": args.seed, "threads": args.threads,
              "participants": args.participants, "sites": args.sites, "runs": {}}
    for text in ("free", "template"):
        for fmt in args.formats.split(","):
            sites = write_synthetic(SynthConfig(args.out / text / fmt, fmt, args.participants, args.sites,
                                                args.seed, seconds=0.5, text=text))
            result["runs"][f"{text}/{fmt}"] = measure(sites)
            for session in (25, 24) if args.no_session_23 else (25, 24, 23):
                result["runs"][f"{text}/{fmt}"][f"session_{session}_selector"] = measure_earlier_selector(sites, session)
            print(f"{text}/{fmt}: {result['runs'][f'{text}/{fmt}']}", flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
