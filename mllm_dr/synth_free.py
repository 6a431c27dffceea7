"""Free-text interviews for the synthetic corpus (``data synth --text free``). NOT clinical data.

The template corpus (synth_text) says one sentence per item score, worded with the item's
own keywords, so keyword-based quote selection cannot fail on it. Real interviews are not
like that: answers are paraphrases ("I'm out like a light" for Sleep 0), hedged ("I guess"),
negated ("it's not that I'm lazy, my batteries are just flat"), separated by small talk
that happens to contain other items' keywords ("he works nights", "traffic downtown is
slow"), and some items are never asked. This module writes such interviews from the phrase
banks in ``resources/synth_free.json`` (several paraphrases per item x score, none
containing its own item's keywords; one more per cell below), in random item order, and says
which lines answer which item: the ground truth of the grounding figures (mllm_dr.grounding).

Each item x score cell is split into training-side and held-out phrasings (``answer_options``):
train/dev participants say only the first, test participants only the second, so a held-out
participant never repeats, word for word, a sentence that training saw with the same item
and score (before session 46 both drew from one list: 84% of the test answer lines were a
training phrase of the same item and label, a review).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

import numpy as np

from mllm_dr.corpus.model import INTERVIEWER_SPEAKER, PARTICIPANT_SPEAKER

Line = tuple[str, str, str | None]   # (speaker, text, the item this line answers or None)

P_UNASKED = 0.15      # chance that an item is never asked (its label still exists)
MAX_UNASKED = 2
P_SMALL_TALK = 0.6    # chance of a small-talk exchange before each item
P_STALL = 0.2         # chance of a hedge-only participant turn ("hmm, let me think.") before an answer
P_TWO_TURNS = 0.3     # chance that an answer takes two participant turns
P_HEDGE_BEFORE, P_HEDGE_AFTER = 0.4, 0.2
OPENING = "hi, thanks for coming in today."
# English phrasings that open with a negation ("it's not that I'm lazy, ..."): answer_options deals them out
# first, so where a cell holds two, training and held-out participants get one each
NEGATION_OPENER = re.compile(r"(it's not|it isn't|i wouldn't|i'm not)\b")

# One more phrasing per item x score beside the JSON bank's (appended to each cell by ``banks``), so that each
# cell splits into training-side and held-out phrasings (``answer_options``) with several of each. Written, like the
# bank, to share no keyword with item_keywords.json for their own item. NOT clinical data.
EXTRA_ANSWERS_EN: dict[str, list[str]] = {
    "NoInterest": [
        "it's not like I'm short of plans, my weekends are packed with stuff I look forward to.",
        "I wouldn't say I've lost the spark, it's just the odd week the guitar stays in its case.",
        "it isn't that I've got no time, most weeks I just can't work up the will to do the stuff I used to.",
        "it's not a phase, I don't get a kick out of a single activity anymore, not on any day.",
    ],
    "Depressed": [
        "it's not all sunshine, but on the inside I feel bright and easy most days.",
        "I wouldn't call it a problem, I just feel a bit heavy-hearted for a day now and again.",
        "it isn't just a rough patch, there's an emptiness hanging over me more days than not.",
        "I'm not just a bit gloomy, there's a weight on me every hour of every day.",
    ],
    "Sleep": [
        "it's not something I ever think about, I'm gone the minute the lights are off and up fresh with the alarm.",
        "I wouldn't call it a problem, but a couple of evenings a week my head keeps ticking over till late.",
        "it isn't just the odd rough evening, most of the week I'm lying there with my eyes open till the small hours.",
        "it's not a few bad evenings, I haven't had more than a couple of hours' rest any day this month.",
    ],
    "Tired": [
        "it's not that I never flag, but I've got the go to get through a long day and then some.",
        "I wouldn't say I'm worn out, just now and then I'm flagging by mid-afternoon.",
        "it isn't laziness, most days I'm flagging before lunch and dragging my feet till evening.",
        "it's not just a slump, every single day I'm running on nothing from the minute I get up.",
    ],
    "Appetite": [
        "it's not that I'm a big cook, but I clear my plate at every sitting like I always have.",
        "I wouldn't make much of it, a few days a week I only pick at lunch.",
        "it isn't on purpose, more days than not I leave most of my plate and skip lunch altogether.",
        "it's not a phase, every day I can only manage a few spoonfuls before I push the bowl away.",
    ],
    "Failure": [
        "it's not that I've got it all figured out, but I'm at peace with the person I am.",
        "I wouldn't say it's a big worry, but now and then I feel I haven't measured up for my family.",
        "it isn't false modesty, more days than not I feel like a disappointment to the people close to me.",
        "it's not just a bad patch, every day I feel like I've ruined everything and I'm no use to anyone.",
    ],
    "Concentrating": [
        "it's not that I'm a brain box, but I can stick with a long report or a film without drifting.",
        "I wouldn't call it a problem, now and then I drift off halfway through a page.",
        "it isn't for lack of trying, most days my head wanders off after a minute or two of any task.",
        "it's not just a bit of fog, every single day I can't keep hold of one line of a page.",
    ],
    "Moving": [
        "it's not like I'm the calmest person, but nobody's said a word about my pace or my speech.",
        "I wouldn't make a big deal of it, but a few days a month I can't keep my hands quiet.",
        "it isn't on purpose, more days than not my words come out at a crawl and people have to wait.",
        "it's not just nerves, every day I'm pacing that hallway for hours and can't stay in a chair.",
    ],
}
EXTRA_ANSWERS_ZH: dict[str, list[str]] = {
    "NoInterest": ["周末的安排我都很期待，每次都玩得很尽兴。", "有那么几天，平时常做的事也不太想碰。",
                   "一周里大部分日子对什么活动都提不起劲。", "每天都一样，以前喜欢的活动现在一点感觉都没有了。"],
    "Depressed": ["我每天都挺高兴的，没什么烦心事。", "偶尔会有一天觉得心里不太舒服，过去就好了。",
                  "一周里大半时间心里都沉甸甸的。", "每天心里都是灰的，一点亮光都看不到。"],
    "Sleep": ["晚上一沾枕头就着，早上自然醒。", "有几个晚上躺下以后要过好一阵才着。",
              "一周里大半晚上都要到后半夜才能着。", "每天晚上都只能迷糊一两个小时。"],
    "Tired": ["我一整天都精神饱满的。", "偶尔有几天干完活就想躺着。",
              "一周里大半时间都觉得身上没劲。", "每天从早到晚都浑身发软，什么都干不动。"],
    "Appetite": ["一日三餐照常，饭量没变过。", "有几天对着饭菜不太想动。",
                 "一周里大半时间一顿饭只动几筷子。", "每天都只能咽下几口粥，人瘦了一圈。"],
    "Failure": ["回头看我做过的事，我觉得挺踏实的。", "有时候会觉得我没做到家人期望的那样。",
                "一周里大半时间都觉得我拖累了别人。", "每天都觉得我把一切都搞砸了。"],
    "Concentrating": ["看书做事我都能一直看下去，不会走神。", "有几天开会时脑子会跑到别处去。",
                      "一周里大半时间一件事做不了几分钟就分心。", "每天都没法把心思放在任何一件事上。"],
    "Moving": ["家里人都说我跟平时没两样。", "偶尔有几天手脚闲不住。",
               "一周里大半时间别人都说我说话慢吞吞的。", "每天都在屋里转来转去，一刻也停不下来。"],
    "SelfHarm": ["我从没往那方面想过，日子过得挺好。", "偶尔会闪过不想活下去的念头，但很快就没了。",
                 "一周里大半时间都会想到不在了会不会更好。", "每天脑子里都是结束一切的念头。"],
}



@lru_cache(maxsize=1)
def banks() -> dict:
    """The phrase banks (one JSON file; sites never edit it: it is test data)."""
    raw = json.loads(resources.files("mllm_dr.resources").joinpath("synth_free.json").read_text(encoding="utf-8"))
    out = {k: v for k, v in raw.items() if not k.startswith("_")}
    for lang, extra in (("en", EXTRA_ANSWERS_EN), ("zh", EXTRA_ANSWERS_ZH)):
        out[f"answers_{lang}"] = {item: {score: list(phrases) + [extra[item][int(score)]] for score, phrases in by_score.items()}
                                  for item, by_score in out[f"answers_{lang}"].items()}
    return out


def answer_options(lang: str, item: str, score: int, held_out: bool) -> list[str]:
    """The phrasings of one item x score cell that a held-out (test) participant says (``held_out``), or
    that a train/dev participant says: the two never share a phrasing.

    The cell's phrasings (the JSON bank's, then this module's), negation openers first, are dealt out in
    turn: the first, third, ... to training, the second, fourth, ... held out (English 3 + 3, Chinese 2 + 2).
    """
    cell = banks()[f"answers_{lang}"][item][str(score)]
    dealt = [ph for ph in cell if NEGATION_OPENER.match(ph.lower())] + \
            [ph for ph in cell if not NEGATION_OPENER.match(ph.lower())]
    side = dealt[int(held_out)::2]
    if not side:
        raise ValueError(f"the {lang} phrase bank cell {item}={score} has no {'held-out' if held_out else 'training'} phrasing")
    return side


def unasked_items(items: list[str], rng: np.random.Generator) -> set[str]:
    """Items the interviewer never gets to (at most MAX_UNASKED)."""
    drawn = [i for i in items if rng.uniform() < P_UNASKED]
    return set(drawn[:MAX_UNASKED])


def _pick(options: list[str], rng: np.random.Generator) -> str:
    return str(options[int(rng.integers(len(options)))])


def _hedged(phrase: str, rng: np.random.Generator) -> str:
    """Add "I guess ..." / "..., you know." around a phrase, sometimes."""
    b = banks()
    if rng.uniform() < P_HEDGE_BEFORE:
        head = phrase if phrase.startswith(("I ", "I'")) else phrase[0].lower() + phrase[1:]
        phrase = _pick(b["hedges_before_en"], rng) + head
    if rng.uniform() < P_HEDGE_AFTER:
        phrase = phrase.rstrip(".") + _pick(b["hedges_after_en"], rng)
    return phrase


def interview(items: dict[str, int], rng: np.random.Generator, interviewer: bool, held_out: bool = False) -> list[Line]:
    """One English interview: (speaker, text, item) lines in order.

    ``interviewer=False`` leaves the interviewer's lines out (E-DAIC transcripts hold the
    participant only). Answer lines carry their item; small talk and stalls carry None.
    ``held_out``: a test participant's interview, answered with the held-out phrasings only.
    """
    b = banks()
    order = [str(i) for i in rng.permutation(list(items))]
    skipped = unasked_items(order, rng)
    small = [b["small_talk_en"][int(k)] for k in rng.permutation(len(b["small_talk_en"]))]
    lines: list[Line] = [(INTERVIEWER_SPEAKER, OPENING, None)] if interviewer else []

    def ask(text: str) -> None:
        if interviewer:
            lines.append((INTERVIEWER_SPEAKER, text, None))

    for item in order:
        if small and rng.uniform() < P_SMALL_TALK:
            question, answer = small.pop()
            ask(question)
            lines.append((PARTICIPANT_SPEAKER, answer, None))
        if item in skipped:
            continue
        ask(_pick(b["questions_en"][item], rng))
        if rng.uniform() < P_STALL:
            lines.append((PARTICIPANT_SPEAKER, _pick(b["stalls_en"], rng), None))
        options = answer_options("en", item, items[item], held_out)
        n = 2 if rng.uniform() < P_TWO_TURNS else 1
        for k in rng.choice(len(options), size=n, replace=False):
            lines.append((PARTICIPANT_SPEAKER, _hedged(options[int(k)], rng), item))
    return lines


def cmdc_answer(item: str | None, score: int | None, asked: bool, rng: np.random.Generator,
                held_out: bool = False) -> tuple[str, bool]:
    """The text of one CMDC question file and whether it answers its item.

    Questions mapped to no item get small talk; an unasked item's question gets a
    deflection ("这个不太好说。"), which says nothing about the item. ``held_out``: a test
    participant's answer, from the held-out phrasings only.
    """
    b = banks()
    if item is None:
        return _pick(b["small_talk_zh"], rng), False
    if not asked:
        return _pick(b["deflections_zh"], rng), False
    phrase = _pick(answer_options("zh", item, int(score), held_out), rng)
    if rng.uniform() < P_HEDGE_BEFORE:
        phrase = _pick(b["hedges_before_zh"], rng) + phrase
    return phrase, True
