"""Feature recipes: sites that record differently extract features of one meaning and width.
(The federated run of an E-DAIC-layout and a DAIC-layout site is in test_federation_e2e.py.)"""

from __future__ import annotations

import pytest

from conftest import run_cli
from mllm_dr.errors import InputError
from mllm_dr.features.extract import extract_workspace
from mllm_dr.features.recipe import RECIPES, get_recipe
from mllm_dr.federated import site_dims
from mllm_dr.federation_policy import recipe_refusal
from mllm_dr.synth import SynthConfig, write_synthetic
from mllm_dr.workspace import Workspace


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    edaic = write_synthetic(SynthConfig(root / "edaic", "edaic", participants=4, sites=1, seed=1, seconds=2.0,
                                        audio_tables=True))[0]
    daic = write_synthetic(SynthConfig(root / "daic", "daic", participants=4, sites=1, seed=2, seconds=2.0))[0]
    return edaic, daic


def _extract(tmp_path, name, corpus, recipe=None, **kw):
    ws = Workspace.init(tmp_path / name, name)
    return ws, extract_workspace(ws, corpus, recipe=recipe, **kw)


def test_without_a_recipe_the_layouts_differ_with_it_they_agree(corpora, tmp_path):
    edaic, daic = corpora
    _, own_e = _extract(tmp_path, "e", edaic)
    _, own_d = _extract(tmp_path, "d", daic)
    assert own_e["dims"]["audio"] == 23 and own_d["dims"]["audio"] == 25     # the handshake failure
    ws_e, rec_e = _extract(tmp_path, "e2", edaic, "egemaps-openface")
    ws_d, rec_d = _extract(tmp_path, "d2", daic, "egemaps-openface")
    want = RECIPES["egemaps-openface"].dims()
    assert rec_e["dims"] == rec_d["dims"] == site_dims(ws_e) == site_dims(ws_d) == want == {"audio": 25, "visual": 26}
    assert recipe_refusal(ws_e, "egemaps-openface") is None
    ws_own = Workspace(tmp_path / "e")
    why = recipe_refusal(ws_own, "egemaps-openface")
    assert "extracted with recipe 'site'" in why and "--recipe egemaps-openface" in why


def test_a_site_that_cannot_give_a_recipe_modality_joins_with_it_missing(corpora, tmp_path):
    """A site whose OpenFace export has no gaze columns: its visual modality is missing (zero padding
    in the model), noted per participant, even in strict mode; the widths are still the recipe's."""
    import shutil

    from mllm_dr.features.store import FeatureStore

    edaic = shutil.copytree(corpora[0], tmp_path / "corpus")
    for of in edaic.glob("*_P/features/*OpenFace*.csv"):
        rows = [ln.split(", ") for ln in of.read_text().splitlines()]
        drop = rows[0].index("gaze_0_x")
        of.write_text("\n".join(", ".join(c for i, c in enumerate(r) if i != drop) for r in rows) + "\n")
    ws, out = _extract(tmp_path, "w", edaic, "egemaps-openface")          # strict (the default)
    store = FeatureStore(ws.features_dir)
    assert store.participants
    for pid in store.participants:
        feats = store.get(pid)
        assert feats.visual is None and feats.audio is not None and feats.audio.shape[1] == 25
        assert any("gaze_0_x" in n and "egemaps-openface" in n for n in feats.notes)
    assert site_dims(ws) == {"audio": 25, "visual": 26}
    own, _ = _extract(tmp_path, "own", edaic)                              # without the recipe: 48 columns
    assert FeatureStore(own.features_dir).dims()["visual"] == 48


def test_unknown_recipe_is_one_line(corpora, tmp_path):
    with pytest.raises(InputError, match="unknown feature recipe 'nope'"):
        get_recipe("nope")
    run_cli("mllmdr-site", "init", "--workspace", tmp_path / "ws", "--site-id", "s")
    bad = run_cli("mllmdr-site", "extract", "--workspace", tmp_path / "ws", "--corpus", corpora[0], "--recipe", "nope",
                  check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr
