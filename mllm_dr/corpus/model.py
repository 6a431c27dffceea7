"""What a corpus reader returns: participants with labels, dialogue and media paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mllm_dr.corpus.tables import Problem

FORMATS = ("edaic", "daic", "cmdc")
PARTICIPANT_SPEAKER = "Participant"
INTERVIEWER_SPEAKER = "Ellie"


@dataclass
class Turn:
    """One utterance. ``question`` is the CMDC question id (``Q4``) when known."""

    speaker: str
    text: str
    start: float | None = None
    end: float | None = None
    question: str | None = None


@dataclass
class Media:
    """Paths of a participant's media and shipped features (lists: CMDC has one per question)."""

    wav: list[Path] = field(default_factory=list)
    audio_features: list[Path] = field(default_factory=list)   # corpus-shipped acoustic features (eGeMAPS csv, VGGish pkl)
    # OpenFace 2.x CSVs: outer list = time segments (CMDC questions), inner = files joined
    # column-wise for the same frames (DAIC's CLNF_AUs / gaze / pose).
    openface: list[list[Path]] = field(default_factory=list)
    resnet: list[Path] = field(default_factory=list)           # E-DAIC CNN_ResNet .mat
    video: list[Path] = field(default_factory=list)            # raw video files, when a site has them


@dataclass
class Participant:
    id: str
    split: str | None
    items: dict[str, int | None]
    total: int | None
    binary: int | None
    turns: list[Turn] = field(default_factory=list)
    media: Media = field(default_factory=Media)
    folder: Path | None = None

    @property
    def participant_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.speaker == PARTICIPANT_SPEAKER]

    def modalities(self) -> dict[str, bool]:
        return {
            "text": bool(self.participant_turns),
            "audio": bool(self.media.wav or self.media.audio_features),
            "visual": bool(self.media.openface or self.media.resnet or self.media.video),
        }

    def to_report(self) -> dict:
        """The participant entry of ``data check --json``."""
        return {
            "id": self.id, "split": self.split, "items": dict(self.items), "total": self.total,
            "binary": self.binary, "modalities": self.modalities(), "turns": len(self.participant_turns),
        }


@dataclass
class Corpus:
    format: str
    root: Path
    item_names: tuple[str, ...]
    participants: list[Participant]
    problems: list[Problem]

    def get(self, participant_id: str) -> Participant:
        for p in self.participants:
            if p.id == participant_id:
                return p
        raise KeyError(participant_id)

    def to_report(self) -> dict:
        return {
            "format": self.format,
            "root": str(self.root),
            "participants": [p.to_report() for p in self.participants],
            "problems": [p.to_dict() for p in self.problems],
        }
