"""Rationale and evidence quality: does each item's rationale come from that item's part of the dialogue?

Pure functions on text and counts (no model), pooled across sites through
:class:`RationaleStats` like the totals' SufficientStats. Three checks per item rationale
(the "Evaluation Reason" text), each defined precisely where it is implemented:

- **item-grounded** (:func:`is_grounded`): it shares content words with the item's own
  evidence turns, more than with any other participant turn;
- **repeated** (:func:`repeated_items`): it says what another item's rationale of the same
  participant says;
- **opposite severity** (:func:`states_opposite`): its wording claims a severity on the other
  side of the scale from the score it comes with (a documented lexical check).

"Evidence turns" come from the dialogue alone (the turns the quote selector attributes to the
item, mllm_dr.evidence) or, on the synthetic corpus, from the true answer turns recorded in
SYNTHETIC.json (:func:`load_answer_turns`); both are reported.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mllm_dr.errors import InputError
from mllm_dr.metrics import PooledCounts

MIN_SHARED = 2          # content words a rationale must share with the turn it is grounded in
REPEAT_JACCARD = 0.8    # content-word Jaccard at or above which two rationales say the same thing

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[\u4e00-\u9fff]+")
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both but
by can could did do does doing don't down during each few for from further had has have having he her here hers him
his how i i'd i'll i'm i've if in into is it it's its just me more most my no nor not now of off on once only or other
our out over own same she should so some such than that that's the their them then there there's these they this
those through to too under until up very was we were what when where which while who whom why will with would you
your really kind guess mean well um uh like just also yes yeah okay
participant participants patient said says say saying stated states reported reports reporting mentioned mentions
describes described evaluation result reason score scored scores fits fit given item rating suggests suggest
indicates indicate which dialogue answer answered
every single day days week weeks time times month months most half nearly always often sometimes then once while
few couple lately anymore feel feels feeling
""".split())
# How often, not what: shared by every item's answers, so they cannot tie a rationale to one item.
CJK_STOP = ("几乎每天", "每天", "每晚", "一半以上的日子", "一半以上", "大多数时候", "大多数", "经常", "偶尔", "有时候",
            "有几天", "觉得", "我", "都", "的", "很", "了", "会", "是")


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\uff07": "'"})


def plain_apostrophes(text: str) -> str:
    """``text`` with the typographic apostrophes (’ ‘, full-width ＇) as ': "can’t" is "can't" to every check
    here (session 46: the curly one split it into "can" and "t", flipping the severity check)."""
    return text.translate(_APOSTROPHES)


def content_words(text: str) -> set[str]:
    """Lowercased words minus stopwords, frequency words and rationale boilerplate, lightly stemmed
    (-s, -ing, -ed); Chinese runs, less CJK_STOP, become character bigrams. Apostrophes: :func:`plain_apostrophes`."""
    out: set[str] = set()
    for tok in _WORD.findall(plain_apostrophes(text).lower()):
        if "\u4e00" <= tok[0] <= "\u9fff":
            for stop in CJK_STOP:
                tok = tok.replace(stop, " ")
            for run in tok.split():
                out.update(run[i:i + 2] for i in range(max(len(run) - 1, 1)))
            continue
        tok = tok.split("'")[0] if tok.endswith(("'s", "'m", "'re", "'ve", "'ll", "'d")) else tok
        if tok in STOPWORDS or len(tok) < 3:
            continue
        for suffix in ("ing", "ed", "s"):
            if tok.endswith(suffix) and len(tok) - len(suffix) >= 3:
                tok = tok[: -len(suffix)]
                break
        out.add(tok)
    return out


def is_grounded(rationale: str, turns: list[str], own: list[int]) -> bool:
    """Item-grounded: the rationale quotes or paraphrases the item's own evidence turns.

    ``turns`` are the participant's turns (texts; interviewer turns blank, see
    :func:`participant_texts`), ``own`` the indices of this item's evidence turns. With
    shared(t) = number of content words (:func:`content_words`) the rationale shares with
    turn t: grounded iff some own turn o has shared(o) >= min(MIN_SHARED, content words of o)
    and >= 1 (a short answer like "I overeat" has one), and shared(o) is strictly greater than
    shared(t) for every turn t not in ``own`` (another item's answer, small talk). An item
    with no evidence turn is never grounded, nor one whose evidence turns hold no content word ("Yes.",
    "No, not really"): nothing can be shared with them (:func:`groundable`; RationaleStats leaves such
    items out of the grounded share's denominator).
    """
    words = content_words(rationale)
    own_set = {i for i in own if 0 <= i < len(turns)}
    rest = max((len(words & content_words(t)) for i, t in enumerate(turns) if i not in own_set), default=0)
    for i in own_set:
        turn_words = content_words(turns[i])
        shared = len(words & turn_words)
        if shared >= max(1, min(MIN_SHARED, len(turn_words))) and shared > rest:
            return True
    return False


def groundable(turns: list[str], own: list[int]) -> bool:
    """Whether some own turn holds a content word: a rationale can be item-grounded (:func:`is_grounded`)
    only then. An evidence turn like "Yes." or "No, not really" has none (session 46: such items counted
    in the grounded share's denominator although no rationale could be grounded in them)."""
    return any(content_words(turns[i]) for i in set(own) if 0 <= i < len(turns))


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^a-z\u4e00-\u9fff]+", " ", text.lower()).split())


def repeated_items(rationales: dict[str, str]) -> set[str]:
    """Items whose rationale repeats another item's rationale of the same participant.

    Two rationales are the same when they are equal after lowercasing and dropping digits
    and punctuation (so "...score of 2" and "...score of 3" match), or when the Jaccard
    index of their content-word sets is >= REPEAT_JACCARD. Both items of such a pair count.
    """
    norm = {k: _normalized(v) for k, v in rationales.items()}
    words = {k: content_words(v) for k, v in rationales.items()}
    out = set()
    keys = list(rationales)
    for a_i, a in enumerate(keys):
        for b in keys[a_i + 1:]:
            union = words[a] | words[b]
            jaccard = len(words[a] & words[b]) / len(union) if union else 0.0
            if (norm[a] and norm[a] == norm[b]) or jaccard >= REPEAT_JACCARD:
                out.update((a, b))
    return out


# Severity wording: symptom words and the PHQ's own top anchor ("nearly every day"). Plain
# frequency words ("every day", "most of the time") are not claims: "energetic most of the time".
# Phrases match as whole words, longest first, each text span once.
SEVERE_PHRASES = (
    "nearly every day", "hopeless", "worthless", "despair", "exhausted", "drained", "barely", "hardly", "can't",
    "cannot", "unable", "no energy", "no appetite", "no interest", "severe", "severely", "几乎每天", "绝望", "失眠",
    "筋疲力尽", "一无是处",
)
MILD_PHRASES = (
    "not at all", "no problem", "no problems", "no trouble", "without trouble", "without any trouble", "no issue",
    "no issues", "no change", "fine", "good", "well", "great", "normal", "normally", "plenty", "happy", "cheerful",
    "enjoys", "enjoy", "positive", "healthy", "很好", "正常", "没有问题", "从来没有", "满意",
)
NEGATORS = ("not", "no", "never", "hardly", "barely")
# words a negator reaches over (at most NEGATION_REACH of them): "not feeling good", "can't sleep well", "not
# really happy"; besides these, -ing verbs ("not sleeping well"). A review, session 45.
NEGATION_SKIPPED = ("feel", "feels", "felt", "feeling", "be", "been", "being", "very", "really", "so", "too", "that",
                    "all", "much", "quite", "always", "doing", "going", "sleep", "eat", "enjoy", "look", "looking",
                    "seem", "seems", "seemed")
NEGATION_REACH = 2
_NOT_VERBS = ("thing", "morning", "evening", "during")
# what a negator reaches over to a SEVERE phrase: linking words only, no verbs ("not feeling hopeless", "isn't
# really exhausted"); "can't sleep, exhausted" is two claims, not a negated "exhausted" (punctuation is not seen)
# not degree words ("so", "too", "that", "much"): "never felt so exhausted" intensifies (a second read, session 46)
SEVERE_NEGATION_SKIPPED = ("feel", "feels", "felt", "feeling", "be", "been", "being", "very", "really", "all",
                           "quite", "always", "seem", "seems", "seemed", "look", "looks", "looking")


def _negated(before: list[str], skipped: tuple[str, ...] = NEGATION_SKIPPED, ing_verbs: bool = True) -> bool:
    """Whether the words ``before`` a phrase (the original words, nearest last) end with a negator, perhaps
    followed by up to NEGATION_REACH ``skipped`` words (and -ing verbs when ``ing_verbs``)."""
    def negator(word: str) -> bool:
        return word in NEGATORS or word.endswith("n't")

    for back in range(min(NEGATION_REACH, len(before)) + 1):
        if back and not (before[-back] in skipped
                         or (ing_verbs and before[-back].endswith("ing") and len(before[-back]) > 4
                             and not before[-back].endswith(_NOT_VERBS))):
            return False
        if len(before) > back and negator(before[-back - 1]):
            return True
    return False


def severity_claim(text: str) -> str | None:
    """"severe", "mild" or None (no claim, or as many severe as mild hits).

    Counts SEVERE_PHRASES and MILD_PHRASES hits; a mild phrase after a negator ("not good", "isn't
    happy", "barely enjoy": a word in NEGATORS or ending in n't, perhaps with up to two words between
    such as "feeling" or an -ing verb: "not feeling good"; Chinese: the previous character is 不 or 没)
    counts as severe, and a severe phrase after one ("not hopeless", "isn't really exhausted", with no verb
    between: SEVERE_NEGATION_SKIPPED; Chinese: 不 or 没 before it) counts as mild: it says the symptom is
    absent (session 46: "not hopeless" at a score of 0 read as a severe claim). Negation is read on the
    original words: a phrase already counted (say "barely") still negates what follows it (session 45). Apostrophes: :func:`plain_apostrophes`.
    """
    original = " " + " ".join(re.findall(r"[a-z']+|[\u4e00-\u9fff]+", plain_apostrophes(text).lower())) + " "
    low = original          # matched spans masked with '#', same length: positions stay those of ``original``
    severe = mild = 0
    for phrase in sorted(SEVERE_PHRASES + MILD_PHRASES, key=len, reverse=True):
        is_cjk = "\u4e00" <= phrase[0] <= "\u9fff"
        pattern = re.escape(phrase) if is_cjk else r"(?<= )" + re.escape(phrase) + r"(?= )"
        for m in list(re.finditer(pattern, low)):
            if is_cjk:
                negated = original[max(m.start() - 1, 0)] in "不没"
            else:
                negated = (_negated(original[: m.start()].split()) if phrase in MILD_PHRASES
                           else _negated(original[: m.start()].split(), SEVERE_NEGATION_SKIPPED, ing_verbs=False))
            if (phrase in SEVERE_PHRASES) != negated:     # a negated severe phrase is mild, a negated mild one severe
                severe += 1
            else:
                mild += 1
        low = re.sub(pattern, lambda m: "#" * len(m.group()), low)
    return "severe" if severe > mild else "mild" if mild > severe else None


def states_opposite(rationale: str, score: int) -> bool:
    """Opposite severity: the rationale claims "severe" with a score of 0, or "mild" with 2-3.

    A score of 1 ("several days") fits symptom words ("some nights I can't sleep"), so only
    0 is opposite to a severe claim; 2-3 ("more than half the days", "nearly every day")
    are opposite to a statement that the aspect is fine.
    """
    claim = severity_claim(rationale)
    return (claim == "severe" and score == 0) or (claim == "mild" and score >= 2)


@dataclass
class RationaleStats(PooledCounts):
    """Counts behind the rationale figures; ``merge`` pools sites exactly."""

    PARTS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("n_evidence_items", "n_items"), ("grounded", "n_evidence_items"), ("repeated", "n_items"),
        ("opposite", "n_items"), ("n_truth_items", "n_items"), ("grounded_truth", "n_truth_items"))
    n_items: int = 0
    n_evidence_items: int = 0  # items the selector found an own part of the dialogue for, with a content word
                               # in it (:func:`groundable`: the others, "Yes.", cannot be grounded, session 46)
    grounded: int = 0          # item-grounded against the evidence turns chosen from the dialogue
    repeated: int = 0
    opposite: int = 0
    n_truth_items: int = 0     # items with true answer turns (synthetic corpus, asked items), with a content word
    grounded_truth: int = 0    # item-grounded against the true answer turns

    def add(self, rationales: dict[str, str], scores: dict[str, int], turns: list[str],
            evidence: dict[str, list[int]], truth: dict[str, list[int]] | None = None) -> None:
        """One participant: item -> rationale, item -> the score it came with, participant turns,
        item -> evidence turn indices (selector), optional item -> true answer turn indices. An item whose
        evidence (true) turns hold no content word is in neither grounded share's denominator: it is counted
        with the items that have no evidence (``no_evidence``); the wire's fields stay as they are."""
        rep = repeated_items(rationales)
        for item, text in rationales.items():
            self.n_items += 1
            if groundable(turns, evidence.get(item) or []):
                self.n_evidence_items += 1
                self.grounded += is_grounded(text, turns, evidence[item])
            self.repeated += item in rep
            self.opposite += states_opposite(text, scores[item])
            if truth and groundable(turns, truth.get(item) or []):
                self.n_truth_items += 1
                self.grounded_truth += is_grounded(text, turns, truth[item])

    def compute(self) -> dict[str, float | int]:
        def share(k: int, n: int) -> float:
            return k / n if n else math.nan
        # item_grounded counts the items that have an own part with a content word: one nobody spoke to cannot
        # quote it (its rationale says so, see dataset.fallback_rationale), nor ground in a bare "Yes."; no_evidence
        # is the share of the others (both kinds: telling them apart would take a new field on the wire)
        return {"n_items": self.n_items, "item_grounded": share(self.grounded, self.n_evidence_items),
                "no_evidence": share(self.n_items - self.n_evidence_items, self.n_items),
                "repeated": share(self.repeated, self.n_items), "opposite_severity": share(self.opposite, self.n_items),
                "n_truth_items": self.n_truth_items, "item_grounded_truth": share(self.grounded_truth, self.n_truth_items)}


def load_answer_turns(corpus_root: Path) -> dict[str, dict[str, list[int]]] | None:
    """participant -> item -> true answer turn indices, from a synthetic site's SYNTHETIC.json;
    None for a real corpus (no such file, or one written before answer turns were recorded)."""
    path = Path(corpus_root) / "SYNTHETIC.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"not JSON ({err})", path) from None
    return data.get("answer_turns")


def participant_texts(turns) -> list[str]:
    """Turn texts with interviewer turns blanked, so indices still match the reader's turn list."""
    from mllm_dr.corpus.model import PARTICIPANT_SPEAKER

    return [t.text if t.speaker == PARTICIPANT_SPEAKER else "" for t in turns]


def selection_hits(instances, answer_turns: dict[str, dict[str, list[int]]]) -> tuple[int, int]:
    """(hits, n): of the instances whose item was asked (has true answer turns), how many have
    their selected evidence turn (``evidence_turns[0]``) among those true answer turns."""
    hits = n = 0
    for inst in instances:
        truth = answer_turns.get(inst.participant, {}).get(inst.item) or []
        if truth:
            n += 1
            hits += bool(inst.evidence_turns) and inst.evidence_turns[0] in truth
    return hits, n
