"""What `score` shows a clinician is what it kept and what it loaded: the page names the kept score, is written only
after the score is kept, and comes from the adapters chosen once; adapter folders are never left missing."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_dr import phq


def test_the_page_names_the_kept_score_review_rates():
    """`review --ratings` needs the kept score's id: the page a clinician reads must show it."""
    from mllm_dr.clinician import annotate, render_participant_html

    result = {"participant": "303", "base_model": "tiny-random", "adapters": "v", "total": 8, "band": phq.band(8),
              "binary": 0, "items": [{"item": i, "score": 1, "rationale": "r", "source": "generated",
                                      "regression_score": 1.0} for i in phq.PHQ8_ITEMS]}
    view = annotate(result, {"in_training_data": False, "split": "test", "note": "n"})
    sha = "3f2a9c1d0b7e" + "0" * 52
    page = render_participant_html(view, {}, {"site": "a", "adapters_kind": "local", "kept_score_sha256": sha})
    assert f"<b>3f2a9c1d0b7e</b> (kept_score_sha256 {sha})" in page and "--score 3f2a9c1d0b7e" in page


def test_a_swap_cut_short_never_leaves_the_folder_missing(tmp_path):
    """atomic_folder deleted the old folder, then renamed the new one in: a crash between left no folder at all
    (adapters, a signed checkpoint, the base model). Now the old one is renamed aside first, and a swap cut
    short between the renames is put back by the next write of that folder."""
    from mllm_dr.atomic import atomic_folder

    folder = tmp_path / "latest"
    folder.mkdir()
    (folder / "v").write_text("old")
    script = ("import os\nfrom pathlib import Path\nfrom mllm_dr.atomic import atomic_folder\n"
              "real = Path.rename\n"
              "def rename(self, target):\n"
              "    if self.name.endswith('.partial'):\n"
              "        os._exit(9)                  # the process dies as the new folder would be renamed in\n"
              "    return real(self, target)\n"
              "Path.rename = rename\n"
              f"with atomic_folder(Path({str(folder)!r})) as tmp:\n"
              "    (tmp / 'v').write_text('new')\n")
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    from mllm_dr.atomic import settled                # right after the crash a reader takes the old one (a second
    assert not folder.exists() and (settled(folder) / "v").read_text() == "old"     # read, session 42)
    with pytest.raises(RuntimeError):
        with atomic_folder(folder):
            raise RuntimeError("the next write fails as well")
    assert (folder / "v").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["latest"]
    with atomic_folder(folder) as tmp:
        (tmp / "v").write_text("new")
    assert (folder / "v").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def _score(ws, participant: str, html: Path) -> None:
    """`mllmdr-site score PARTICIPANT --html PAGE --json`, in this process (every option given: Typer's defaults
    are not values)."""
    from cli.site_model import Adapters, Device, Engine, score

    score(participant, workspace=ws.root, base_model=None, device=Device.cpu, max_new_tokens=8, user="dr.a",
          adapters=Adapters.auto, html=html, engine=Engine.torch, json_out=True)


def _participant(ws) -> str:
    from mllm_dr.dataset import load_corpus

    return load_corpus(ws).participants[0].id


def test_the_page_is_written_only_after_the_score_is_kept(scored_ws, tmp_path, monkeypatch, capsys):
    """`score --html` wrote the page, then kept the score: a failure to keep it (a full disk) left a page showing
    scores that 'review' can never rate. Now the score is kept first; the page names it."""
    from mllm_dr import clinician

    participant, page = _participant(scored_ws), tmp_path / "report.html"

    def full_disk(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = clinician.keep_score
    monkeypatch.setattr(clinician, "keep_score", full_disk)
    with pytest.raises(OSError):
        _score(scored_ws, participant, page)
    assert not page.exists()
    monkeypatch.setattr(clinician, "keep_score", real)
    _score(scored_ws, participant, page)
    _, sha = clinician.kept_score(scored_ws, participant)
    assert f"kept_score_sha256 {sha}" in page.read_text()


def test_score_loads_the_adapters_it_chose_and_describes(scored_ws, tmp_path, monkeypatch, capsys):
    """`score` chose the adapters twice (for the page's provenance and stale note, then to load them): a federated
    round landing in between gave a page saying "local" over federated adapters. Now it chooses once."""
    import json

    import cli.site_model as site_model
    from mllm_dr import clinician
    from mllm_dr.adapters import read_meta
    from mllm_dr.federated import federated_dir
    from mllm_dr.local_run import run_dir

    real = site_model.adapter_choice

    def choice_then_a_round_lands(ws, adapters):
        chosen = real(ws, adapters)
        (federated_dir(ws) / "latest").mkdir(parents=True, exist_ok=True)    # a federated round finishes now
        return chosen

    monkeypatch.setattr(site_model, "adapter_choice", choice_then_a_round_lands)
    try:
        _score(scored_ws, _participant(scored_ws), tmp_path / "report.html")
    finally:
        (federated_dir(scored_ws) / "latest").rmdir()
    out = json.loads(capsys.readouterr().out)
    kept, _ = clinician.kept_score(scored_ws, out["participant"])
    assert kept["adapters_kind"] == "local" and out["adapters"] == read_meta(run_dir(scored_ws) / "latest")["version"]


# ----------------------------------------------------------------------------- refused before the model loads
def cmdc_ws(tmp_path: Path, *subjects: str):
    """A workspace over a copy of the small CMDC fixture, plus ``subjects`` (copies of HC01's interview and
    labels): no features, no adapters, so a command that goes as far as loading a model stops at
    ``refuse_model``."""
    import shutil

    from mllm_dr.workspace import Workspace

    corpus = tmp_path / "cmdc"
    shutil.copytree(Path(__file__).parent / "fixtures" / "cmdc", corpus)
    info = corpus / "SubjectInfo.csv"
    hc01 = next(line for line in info.read_text().splitlines() if line.startswith("HC01,"))
    for s in subjects:
        shutil.copytree(corpus / "part1" / "HC01", corpus / "part1" / s)
        info.write_text(info.read_text() + hc01.replace("HC01", s, 1) + "\n")
    ws = Workspace.init(tmp_path / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(corpus), "cmdc"
    ws.save()
    return ws


class ModelLoaded(Exception):
    """``refuse_model``'s stand-in for minutes of model loading."""


def refuse_model(monkeypatch) -> list[str]:
    """``cli.site_model.load_model`` raises ModelLoaded; returns the devices it was asked for."""
    import cli.site_model as site_model

    devices: list[str] = []

    def load_model(ws, kind, base_model, device):
        devices.append(device)
        raise ModelLoaded(f"the model was loaded on {device}")

    monkeypatch.setattr(site_model, "load_model", load_model)
    return devices


def score_args(**given) -> dict:
    """Every option of `score` (called in this process, Typer's defaults are not values), ``given`` ones changed."""
    from cli.site_model import Adapters, Device, Engine

    return dict(base_model=None, device=Device.cpu, max_new_tokens=8, user="dr.a", adapters=Adapters.auto, html=None,
                engine=Engine.torch, json_out=True) | given


def test_score_refuses_outputs_it_cannot_write_before_the_model_loads(tmp_path, monkeypatch):
    """`score` checked --html (a folder) and the kept score's file name (the participant id) only after minutes of
    scoring, and an --html in a missing or unwritable folder failed after the audit entry named a page never
    written. Now each is one line (InputError: exit 2) before any model loads, and nothing is audited."""
    from cli.site_model import score
    from mllm_dr.errors import InputError

    long_id = "HC" + "0" * 70 + "1"                 # a CMDC subject folder: in the corpus, but no file name
    ws = cmdc_ws(tmp_path, long_id)
    refuse_model(monkeypatch)
    (tmp_path / "a-file").write_text("x")
    cases = [("HC01", tmp_path, "--html is a folder"),
             ("HC01", tmp_path / "missing" / "p.html", "does not exist"),
             ("HC01", tmp_path / "a-file" / "p.html", "is not a folder"),
             ("HC01", Path("/proc/p.html"), "cannot write in"),            # unwritable, even for root
             (long_id, None, "is not a participant id")]
    if os.geteuid() != 0:                                                   # root writes in a read-only mode folder
        (tmp_path / "ro").mkdir(mode=0o500)
        cases.append(("HC01", tmp_path / "ro" / "p.html", "cannot write in"))
    for participant, html, why in cases:
        with pytest.raises(InputError, match=why) as err:
            score(participant, workspace=ws.root, **score_args(html=html))
        assert "\n" not in str(err.value) and (html is None or str(html.parent if why != "--html is a folder"
                                                                         else html) in str(err.value))
    assert not ws.audit_path.exists()


def test_score_reads_the_corpus_once_and_builds_the_instances_once(scored_ws, tmp_path, monkeypatch, capsys):
    """`score` read the corpus three times (its own check, the scoring, the excerpts) and built the participant's
    aspect instances twice (for the scores, then again for the excerpts beside them)."""
    import json

    import mllm_dr.dataset as dataset
    from cli.site_model import score

    participant = _participant(scored_ws)
    reads, built = [], []
    real_read, real_build = dataset.read_corpus, dataset.build_instances
    monkeypatch.setattr(dataset, "read_corpus", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    monkeypatch.setattr(dataset, "build_instances",
                        lambda corpus, p, *a, **k: built.append(p.id) or real_build(corpus, p, *a, **k))
    score(participant, workspace=scored_ws.root, **score_args(html=tmp_path / "p.html"))
    out = json.loads(capsys.readouterr().out)
    assert (len(reads), built) == (1, [participant])
    assert out["engine"] == "torch" and "scored with engine torch (fp32 weights)" in (tmp_path / "p.html").read_text()


def test_a_report_in_a_folder_yet_to_be_made_is_still_allowed(tmp_path):
    """A second read of session 42: the early check of --report refused a folder that does not exist yet, which
    `evaluate` has always made (reports.write_report); the nearest existing folder must take it instead."""
    from cli.site_model import check_writable
    from mllm_dr.errors import InputError

    check_writable(tmp_path / "new" / "deeper" / "r.md", "--report", creates_folder=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        check_writable(tmp_path / "a-file" / "sub" / "r.md", "--report", creates_folder=True)
    with pytest.raises(InputError, match="does not exist"):
        check_writable(tmp_path / "new" / "r.html", "--html")


def test_local_adapters_refuse_features_extracted_again_with_other_columns(site_ws):
    """A second read of session 42: reading DAIC's CLNF columns under OpenFace 2's names reorders the visual
    columns at the same width, and local adapters were checked by width only: trained before, they would read
    the re-extracted features permuted. Adapters now record their feature columns and refuse others, before
    any model loads."""
    import json

    from mllm_dr.adapters import META
    from mllm_dr.errors import InputError
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.local_run import load_trained, run_dir

    store = FeatureStore(site_ws.features_dir)
    meta = {"dims": store.dims(), "base_model": "no-such-base", "feature_columns": store.feature_columns()}
    (run_dir(site_ws) / "latest").mkdir(parents=True)
    (run_dir(site_ws) / "latest" / META).write_text(json.dumps(meta))
    with pytest.raises(Exception) as same:          # the columns agree: it goes on to load the (missing) base
        load_trained(site_ws)
    assert "other columns" not in str(same.value)
    meta["feature_columns"] = {m: ["0" * 16] for m in meta["feature_columns"]}
    (run_dir(site_ws) / "latest" / META).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="extracted again with other columns"):
        load_trained(site_ws)
