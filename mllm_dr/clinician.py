"""What a clinician reads about one scored participant: item wording, the binary call explained,
caveats (decision support only, training data, stale or test model) and the HTML report.

Everything is built from the dict that ``local_run.score_participant`` returns (participant,
items [item, score, rationale, source, regression_score], total, band, binary, adapters,
base_model, warning), so scoring can change without touching this.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from mllm_dr import __version__, phq

SELF_HARM = "SelfHarm"      # PHQ-9 item 9 (phq.PHQ9_ITEMS)
DISCLAIMER = ("Decision support, not a diagnosis: these scores are a model's reading of one interview; "
              "the clinician decides.")


def binary_explanation(total: int, n_items: int) -> str:
    """Why the binary call is what it is, in one sentence."""
    cut, top = phq.BINARY_CUTOFF, phq.max_total(n_items)
    if total >= cut:
        return (f"Screens positive: the total {total} (of {top}) is at or above the PHQ cut-off of {cut}, "
                "the usual threshold for probable major depression.")
    return (f"Screens negative: the total {total} (of {top}) is below the PHQ cut-off of {cut}, "
            "the usual threshold for probable major depression.")


def training_data_note(participant, kind: str, meta: dict) -> dict:
    """The one rule for "was this participant in the model's training data?".

    Training uses the labelled train/dev participants of the corpus (never test): local adapters
    those of this site; a federated run those of every site that took part, this one included.
    Zero-shot adapters were trained on nobody. ``participant`` is a corpus Participant.

    Adapters made since session 42 record who they were trained on (``trained_on`` in their metadata,
    ``adapters.participant_keys``), and that record answers; the corpus's split as it is today answers
    only for older adapters (a split file edited after training made the page say "Not in the training
    data" for a patient the model had learned: a review, session 42).
    """
    from mllm_dr.adapters import participant_keys
    from mllm_dr.corpus.labels import effective_split

    split = effective_split(participant.id, participant.split)
    labelled = any(v is not None for v in participant.items.values())
    if meta.get("zero_shot"):
        return {"in_training_data": False, "split": split,
                "note": "Not in the training data: the base model was not trained on any participant (zero-shot)."}
    if "trained_on" in meta and participant_keys([participant.id])[0] not in meta["trained_on"]:
        return {"in_training_data": False, "split": split,
                "note": f"Not in the training data: participant {participant.id} is not among the participants "
                        "these adapters were trained on (as recorded when they were made)."}
    if "trained_on" not in meta and (split not in ("train", "dev") or not labelled):
        why = f"is in the {split} split" if labelled else "has no item labels"
        return {"in_training_data": False, "split": split,
                "note": f"Not in the training data: participant {participant.id} {why}, which training never uses."}
    by = ("these local adapters were trained on this site's train/dev participants" if kind == "local" else
          f"federated run {meta.get('run', meta.get('version', '?'))} trained on the train/dev participants "
          "of every site that took part, this site's included")
    return {"in_training_data": True, "split": split,
            "note": f"In the training data: participant {participant.id} ({split} split) was used to train this "
                    f"model ({by}); these scores are not an independent assessment."}


def participant_excerpts(instances) -> dict[str, tuple[str, str]]:
    """Per item: the key quote and the dialogue excerpt the item was scored from (``instances``: the aspect
    instances it was scored from, ``evaluation.participant_instances``)."""
    from mllm_dr.review import excerpt

    return {i.item: excerpt(i) for i in instances}


def self_harm_alert(items: list[dict]) -> str | None:
    """The alert a PHQ-9 item 9 (SelfHarm) score above 0 raises, whatever the total: None when it scored 0 or the
    questionnaire has no item 9. A result with item 9 at 3 and every other item 0 read "Screens negative" and
    warned of nothing (a review, session 46)."""
    it = next((i for i in items if i.get("item") == SELF_HARM), None)
    if it is None or it["score"] < 1:
        return None
    return (f"PHQ-9 item 9 (thoughts of self-harm) scored {it['score']} ({phq.RESPONSES[it['score']]}): assess risk "
            "now, whatever the total or the binary call")


def no_statement_warning(items: list[dict]) -> str | None:
    """How many item scores rest on no statement of the participant's in the interview (no evidence turn: the
    item's questions went unanswered, or nothing said speaks to it); None when every item has one, or when the
    result does not say (scored before session 46)."""
    none = [i["item"] for i in items if i.get("has_evidence") is False]
    if not none:
        return None
    return (f"{len(none)} of {len(items)} item scores rest on no statement in the interview ({', '.join(none)}): "
            "the total may be over- or under-stated")


def annotate(result: dict, training: dict, stale: str | None = None, engine: str = "torch") -> dict:
    """The score result plus what a clinician needs to read it (also the ``score --json`` output); ``engine``:
    the one that scored (onnx_engine.ENGINES). A self-harm score above 0 is the first warning (``safety_alert``)."""
    n = len(result["items"])
    items = [it | {"wording": phq.ITEM_WORDING.get(it["item"], it["item"]),
                   "response": phq.RESPONSES[it["score"]]} for it in result["items"]]
    alert = self_harm_alert(items)
    warnings = [w for w in (alert, result.get("warning"), no_statement_warning(items),
                            stale and f"stale adapters: {stale}",
                            training["in_training_data"] and training["note"]) if w]
    return result | {"items": items, "engine": engine, "questionnaire": f"PHQ-{n}", "max_total": phq.max_total(n),
                     "binary_explanation": binary_explanation(result["total"], n), "disclaimer": DISCLAIMER,
                     "training_data": training, "safety_alert": alert,
                     "items_without_statement": [i["item"] for i in items if i.get("has_evidence") is False],
                     "warnings": warnings}


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:2em auto;max-width:70em;
color:#1a1a1a;line-height:1.4;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}.disclaimer{border-left:4px solid #555;background:#f2f2f2;padding:.5em 1em}
.warn{border-left:4px solid #b45309;background:#fff7e6;padding:.5em 1em}
.alert{border:3px solid #b91c1c;background:#fde8e8;color:#7f1d1d;font-size:1.2em;font-weight:bold;padding:.6em 1em}
tr.nostatement td,tr.nostatement th{background:#fff7e6}.nostatement-note{color:#b45309;font-weight:bold}
.summary{font-size:1.15em}.total{font-size:1.4em;font-weight:bold}
table{border-collapse:collapse;width:100%;margin-top:1em}th,td{border:1px solid #ccc;padding:.5em;vertical-align:top;
text-align:left}thead th{background:#eef}.short{font-weight:bold}.wording{color:#444;font-weight:normal}.score{font-size:1.3em;
font-weight:bold}.quote{background:#fff3b0;display:block;margin-bottom:.4em}.dialogue{color:#555;font-size:.9em;
white-space:pre-wrap}.small{font-size:.85em;color:#555}footer{margin-top:2em;font-size:.85em;color:#555}
"""


def render_participant_html(result: dict, excerpts: dict[str, tuple[str, str]], meta: dict) -> str:
    """A self-contained page (inline CSS, no scripts, fonts or links; a CSP forbids any fetch).

    ``result``: the output of :func:`annotate`; ``meta``: site, adapters_kind (local/federated) and
    kept_score_sha256, the id of the kept score the page shows (what ``review --score`` names).
    """
    from mllm_dr.onnx_engine import engine_label
    from mllm_dr.scoring import regression_text

    e = html.escape
    n = len(result["items"])
    rows = []
    for it in result["items"]:
        quote, dialogue = excerpts.get(it["item"], ("", ""))
        how = ("generated by the model" if it["source"] == "generated" else
               f"the generated text broke the answer format; the regression head's score "
               f"{regression_text(it['regression_score'])} was used")
        none = it.get("has_evidence") is False
        rows.append(
            f"<tr{' class=nostatement' if none else ''}><th><span class=short>{e(it['item'])}</span><br>"
            f"<span class=wording>{e(it['wording'])}</span></th>"
            f"<td><span class=score>{it['score']}</span> / 3<br><span class=small>{e(it['response'])}</span><br>"
            f"<span class=small>{e(how)}</span>"
            f"{'<br><span class=nostatement-note>no statement in the interview on this item</span>' if none else ''}"
            f"</td><td>{e(it['rationale'])}</td>"
            f"<td>{f'<q class=quote>{e(quote)}</q>' if quote else ''}"
            f"<span class=dialogue>{e(dialogue) if dialogue else '(no dialogue for this item)'}</span></td></tr>")
    alert = result.get("safety_alert")            # its own element, first on the page (session 46)
    alert_line = f"<p class=alert role=alert>Safety alert: {e(alert)}</p>\n" if alert else ""
    warnings = "".join(f"<p class=warn>{e(w)}</p>" for w in result["warnings"] if w != alert)
    if not result["training_data"]["in_training_data"]:
        warnings += f"<p class=small>{e(result['training_data']['note'])}</p>"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kept = str(meta.get("kept_score_sha256") or "")
    kept_line = (f"<p class=small>Score id for review: <b>{e(kept[:12])}</b> (kept_score_sha256 {e(kept)}): "
                 f"mllmdr-site review {e(result['participant'])} --score {e(kept[:12])}</p>") if kept else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>PHQ-{n} decision support: participant {e(result['participant'])}</title><style>{_CSS}</style></head>
<body><header><h1>PHQ-{n} decision support: participant {e(result['participant'])}</h1>
{alert_line}<p class=disclaimer>{e(result['disclaimer'])}</p>{warnings}</header>
<section class=summary><p class=total>Total {result['total']} of {result['max_total']}: {e(result['band'])}</p>
<p>{e(result['binary_explanation'])}</p><p class=small>{e(phq.STEM)} Item scores: 0 {e(phq.RESPONSES[0])},
1 {e(phq.RESPONSES[1])}, 2 {e(phq.RESPONSES[2])}, 3 {e(phq.RESPONSES[3])}.</p>{kept_line}</section>
<table><colgroup><col style="width:22%"><col style="width:13%"><col style="width:28%"><col style="width:37%">
</colgroup><thead><tr><th>item</th><th>score</th><th>rationale</th><th>interview excerpt it rests on</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<footer>Site {e(str(meta.get('site', '?')))}. Base model {e(result['base_model'])}; {e(meta.get('adapters_kind', ''))}
adapters {e(str(result['adapters']))}; scored with engine {e(engine_label(result['engine']))}.
MLlm-DR kit {e(__version__)}. Generated {when}.</footer>
</body></html>
"""


# ----------------------------------------------------------------------------- what the clinician was shown
SCORE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")   # a participant id as a file name: never a path


def kept_score_path(ws, participant: str) -> Path:
    from mllm_dr.errors import InputError

    if not SCORE_ID.fullmatch(participant):
        raise InputError(f"participant {participant[:40]!r} is not a participant id a score can be kept under "
                         "(scores/ID.json: 1-64 letters, digits, '_', '.', '-', the first a letter or digit)")
    return Path(ws.root) / "scores" / f"{participant}.json"


def kept_score_record(view: dict, excerpts: dict[str, tuple[str, str]], engine: str, adapters_kind: str,
                      user: str | None) -> tuple[bytes, str]:
    """(bytes, sha256) of what ``score`` shows the clinician, as it is kept on site (``keep_score``): the
    annotated result, the excerpts beside it, the engine and adapters. The sha goes into the audit entry
    before the record is written, so a kept score always has its entry."""
    record = {"view": view, "excerpts": {k: list(v) for k, v in excerpts.items()}, "engine": engine,
              "adapters_kind": adapters_kind, "scored_by": user,
              "scored_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    from mllm_dr.atomic import json_text

    data = json_text(record, indent=1).encode("utf-8")
    return data, hashlib.sha256(data).hexdigest()


def keep_score(ws, participant: str, data: bytes) -> Path:
    """Keep ``kept_score_record``'s bytes as the participant's last shown score, replacing the one before;
    a clinical record (0600). ``review`` rates exactly this, never a new scoring."""
    from mllm_dr.atomic import atomic_write_bytes
    from mllm_dr.private import private_dir

    path = kept_score_path(ws, participant)
    private_dir(path.parent)
    atomic_write_bytes(path, data)              # mkstemp: 0600, never half a record
    return path


def kept_score(ws, participant: str) -> tuple[dict, str]:
    """(record, sha256) of the score ``score`` last showed for the participant; a one-line error when there
    is none, when it is not one, when it is another participant's, or when no ``score`` audit entry names
    its hash (edited, or copied from elsewhere, after it was shown)."""
    from mllm_dr import audit
    from mllm_dr.errors import InputError

    path = kept_score_path(ws, participant)
    if not path.is_file():
        raise InputError(f"no score of participant {participant} is kept at this site: run 'mllmdr-site score "
                         f"{participant}' first (a review rates the scores the clinician was shown)", path)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    try:
        record = json.loads(data.decode("utf-8"))
        view, items = record["view"], record["view"]["items"]
        ok = (isinstance(items, list) and items and all(isinstance(i, dict) and {"item", "score", "source", "rationale"}
                                                         <= set(i) for i in items)
              and all(k in view for k in ("participant", "adapters", "total", "band"))
              and all(k in record for k in ("engine", "adapters_kind", "scored_at")))
        record["excerpts"] = {k: tuple(v) for k, v in record.get("excerpts", {}).items()}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise InputError("not a kept score (damaged): run 'mllmdr-site score' again", path)
    if view["participant"] != participant:
        raise InputError(f"the kept score is participant {view['participant']}'s, not {participant}'s: run "
                         f"'mllmdr-site score {participant}' again", path)
    try:                                       # one verified read of the log (it used to verify it twice on a miss)
        entries, intact, why = audit.read_checked(ws.audit_path)
    except (ValueError, InputError) as err:
        entries, intact, why = [], False, str(err)
    shown = audit.values(entries, "score", "kept_score_sha256")
    if sha not in shown and not intact:        # not "score again": that cannot help
        raise InputError(f"the audit log does not verify ({why}), so no 'score' entry after that point vouches "
                         "for this kept score: 'mllmdr-site audit verify' says more", ws.audit_path)
    if sha not in shown:
        raise InputError("no 'score' audit entry names this kept score (edited or copied after it was shown): run "
                         f"'mllmdr-site score {participant}' again", path)
    return record, sha
