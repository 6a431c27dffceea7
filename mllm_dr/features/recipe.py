"""Feature recipes: one definition of what the audio and visual features are, so that hospitals
which record differently (E-DAIC-style OpenFace 2 + openSMILE tables, DAIC-style CLNF + COVAREP,
raw video) still produce features of the same meaning and width.

A federation fixes a recipe for its runs (the center's ``init --feature-recipe``; it travels in
the enrollment bundle and in every run's signed context). ``mllmdr-site extract --recipe NAME``
(default: the enrolled federation's recipe) produces exactly that recipe from what the site has:

- ``site``: no recipe; whatever the corpus ships (its own openSMILE/COVAREP tables when every
  participant has them, else eGeMAPS from the wav; every OpenFace column). Fine for one site;
  two sites federate only when their widths happen to agree.
- ``egemaps-openface``: audio = openSMILE eGeMAPSv02 low-level descriptors computed from the wav
  at every site (25 columns; a corpus's own audio tables are not used, since E-DAIC's 23-column
  eGeMAPS export and DAIC's COVAREP mean other things); visual = the facial action-unit
  intensities that OpenFace 2 and DAIC's CLNF both give, plus eye gaze and head pose (26 columns,
  in OpenFace's column order; CLNF's x_0 .. z_1 and Tx .. Rz are read as OpenFace 2's gaze_0_x ..
  pose_Rz, ``visual.CLNF_NAMES``). A participant whose files lack one of them has that modality missing
  (zero padding and a mask, as the paper does for a missing modality; the reason is in the manifest),
  never a shifted or partly filled table. When no participant with visual data has them, the site's
  files are at fault, not one participant's: the site still joins with visual missing (issue 12
  section 2), and extract warns once for the site, naming the columns (``extract.site_recipe_gap``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from mllm_dr.errors import InputError

# AU intensities in both OpenFace 2.x and DAIC's CLNF output (CLNF has no AU07_r, AU23_r, AU45_r)
SHARED_AU_INTENSITIES = [f"AU{a}_r" for a in ("01", "02", "04", "05", "06", "09", "10", "12", "14", "15", "17",
                                              "20", "25", "26")]
GAZE = [f"gaze_{e}_{a}" for e in (0, 1) for a in "xyz"]
POSE = [f"pose_{a}" for a in ("Tx", "Ty", "Tz", "Rx", "Ry", "Rz")]
EGEMAPS_LLD_WIDTH = 25


class FeatureRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    audio_source: str | None          # None: the site chooses (ExtractionSettings.audio_source)
    audio_width: int | None = None
    visual_columns: tuple[str, ...] | None = None   # None: every column the corpus ships
    description: str = ""

    @property
    def fixed(self) -> bool:
        """True when the recipe fixes the widths (sites can be compared by name)."""
        return self.audio_width is not None and self.visual_columns is not None

    def dims(self) -> dict[str, int]:
        """The feature widths every site extracting this recipe has (a missing modality is zero-padded)."""
        if not self.fixed:
            raise InputError(f"recipe {self.name!r} does not fix the feature widths")
        return {"audio": self.audio_width, "visual": len(self.visual_columns)}


RECIPES = {
    "site": FeatureRecipe(name="site", audio_source=None,
                          description="whatever the corpus ships (one site, or sites that record alike)"),
    "egemaps-openface": FeatureRecipe(
        name="egemaps-openface", audio_source="opensmile", audio_width=EGEMAPS_LLD_WIDTH,
        visual_columns=tuple(SHARED_AU_INTENSITIES + GAZE + POSE),
        description="eGeMAPSv02 LLDs from the wav (25) + the AU intensities OpenFace 2 and CLNF share, "
                    "gaze and head pose (26)"),
}
DEFAULT_RECIPE = "site"


def get_recipe(name: str | None) -> FeatureRecipe:
    """The named recipe (None or '' = ``site``); an unknown name is an error listing the known ones."""
    name = name or DEFAULT_RECIPE
    if name not in RECIPES:
        raise InputError(f"unknown feature recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]
