"""PHQ-8 / PHQ-9 items, severity bands and the binary cut-off.

Names follow the AVEC / DAIC label columns (``PHQ8_Sleep`` -> ``Sleep``); CMDC's
ninth item is ``SelfHarm``.
"""

from __future__ import annotations

PHQ8_ITEMS: tuple[str, ...] = (
    "NoInterest", "Depressed", "Sleep", "Tired", "Appetite", "Failure", "Concentrating", "Moving",
)
PHQ9_ITEMS: tuple[str, ...] = PHQ8_ITEMS + ("SelfHarm",)

#: Plain-language aspect used in prompts (paper Table 1: "performance in {aspect}").
ITEM_ASPECTS: dict[str, str] = {
    "NoInterest": "little interest or pleasure in doing things",
    "Depressed": "feeling down, depressed, or hopeless",
    "Sleep": "trouble falling or staying asleep, or sleeping too much",
    "Tired": "feeling tired or having little energy",
    "Appetite": "poor appetite or overeating",
    "Failure": "feeling bad about yourself, or that you are a failure or have let yourself or your family down",
    "Concentrating": "trouble concentrating on things",
    "Moving": "moving or speaking so slowly that others noticed, or being fidgety or restless",
    "SelfHarm": "thoughts that you would be better off dead, or of hurting yourself",
}

#: The questionnaire's own wording (PHQ-9, Kroenke, Spitzer & Williams 2001; PHQ-8 is items 1-8),
#: shown to clinicians beside the short names. Stem: "Over the last 2 weeks, how often have you
#: been bothered by any of the following problems?"
ITEM_WORDING: dict[str, str] = {
    "NoInterest": "Little interest or pleasure in doing things",
    "Depressed": "Feeling down, depressed, or hopeless",
    "Sleep": "Trouble falling or staying asleep, or sleeping too much",
    "Tired": "Feeling tired or having little energy",
    "Appetite": "Poor appetite or overeating",
    "Failure": "Feeling bad about yourself - or that you are a failure or have let yourself or your family down",
    "Concentrating": "Trouble concentrating on things, such as reading the newspaper or watching television",
    "Moving": "Moving or speaking so slowly that other people could have noticed? Or the opposite - being so "
              "fidgety or restless that you have been moving around a lot more than usual",
    "SelfHarm": "Thoughts that you would be better off dead or of hurting yourself in some way",
}
#: What each item is about, in neutral words (no severity either way: see grounding.SEVERE_PHRASES),
#: for text that names the item without judging it ("no direct statement on sleep").
ITEM_TOPICS: dict[str, str] = {
    "NoInterest": "interest in activities", "Depressed": "mood", "Sleep": "sleep", "Tired": "energy",
    "Appetite": "appetite", "Failure": "how they see themselves", "Concentrating": "concentration",
    "Moving": "the pace of movement and speech", "SelfHarm": "thoughts of self-harm",
}
STEM = "Over the last 2 weeks, how often have you been bothered by any of the following problems?"
#: Answer options, by item score.
RESPONSES: tuple[str, ...] = ("Not at all", "Several days", "More than half the days", "Nearly every day")

MIN_ITEM, MAX_ITEM = 0, 3
BINARY_CUTOFF = 10  # the paper and AVEC: total >= 10 is depressed (the authors' code used 9; we do not)

BANDS: tuple[tuple[int, str], ...] = (
    (20, "severe"), (15, "moderately severe"), (10, "moderate"), (5, "mild"), (0, "none"),
)


def items_for(n_items: int) -> tuple[str, ...]:
    """The item tuple for a PHQ-8 or PHQ-9 corpus."""
    if n_items == 8:
        return PHQ8_ITEMS
    if n_items == 9:
        return PHQ9_ITEMS
    raise ValueError(f"PHQ has 8 or 9 items, not {n_items}")


def max_total(n_items: int) -> int:
    """24 for PHQ-8, 27 for PHQ-9."""
    return MAX_ITEM * len(items_for(n_items))


def band(total: int) -> str:
    """Severity band of a PHQ total (0-4 none, 5-9 mild, 10-14 moderate, 15-19 mod. severe, 20+ severe)."""
    for lower, name in BANDS:
        if total >= lower:
            return name
    raise ValueError(f"PHQ total cannot be negative: {total}")


def binary(total: int) -> int:
    """1 when the total reaches the clinical cut-off (>= 10)."""
    return int(total >= BINARY_CUTOFF)
