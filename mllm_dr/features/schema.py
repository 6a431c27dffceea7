"""Checks of a corpus's media before anything is extracted: readable files, one column schema.

Run by ``data check`` and ``extract``. Each finding is a Problem naming the file, and the file
is left out of that participant's media, so nothing is zero-filled or column-shifted silently:

- a wav that is empty, is not audio, or holds no samples; a video that is empty or unreadable;
- a feature table (OpenFace CSV/TXT, E-DAIC openSMILE CSV, DAIC COVAREP) cut mid-row (its last row
  has fewer fields than its header) or just after a delimiter (its last row ends in an empty field), with
  a header but no rows, or with a NUL byte (session 44: strict extraction refused these, data check
  passed them); files of one segment (DAIC's CLNF files) whose row counts differ (session 44: rows one
  of them lost); or a table whose columns are not those of the rest of the corpus. The
  reference is the column set most files share (ties: the larger set); a file lacking one of its
  columns makes that modality missing for the participant (the problem names the column). Extra
  columns are ignored: extraction selects the reference columns by name. DAIC's CLNF gaze and pose
  columns count under OpenFace 2's names (``visual.CLNF_NAMES``).

Since session 45 also: a wav whose header declares more audio than the file holds (truncated); a ResNet
``.mat`` without a numeric 2-D ``feature`` array (read from its header only); CMDC's VGGish pickles of
another width than most of the corpus's (the reference is the width most pickles have, ties: the larger),
so that one odd participant no longer decides the width for everyone.

Every file left out is recorded (``MediaCheck.left_out``): extraction records it among the participant's
sources, so ``dataset.examples`` does not take it for a recording that came since extraction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mllm_dr.corpus.model import Corpus, Participant
from mllm_dr.corpus.tables import Problem, TableScan, read_header, scan_table
from mllm_dr.errors import InputError
from mllm_dr.features.visual import OPENFACE_META, openface_header

AUDIO_META = ("name", "frameTime")


@dataclass
class MediaCheck:
    by_participant: dict[str, list[Problem]] = field(default_factory=dict)
    # reference feature columns per shipped-feature kind ("openface", "audio_features"), in file order
    columns: dict[str, list[str]] = field(default_factory=dict)
    # every media file the check took out of a participant's media (session 44: only problem paths that
    # were plain files were known, so DAIC's other CLNF files or CMDC's good Q*.csv blocked training)
    left_out: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def problems(self) -> list[Problem]:
        return [pr for found in self.by_participant.values() for pr in found]


def check_media(corpus: Corpus) -> MediaCheck:
    """Validate every participant's media; drop what cannot be used; return the problems and schemas."""
    check = MediaCheck()
    before = {p.id: media_files(p) for p in corpus.participants}
    found: dict[str, dict[str, list]] = {"openface": {}, "audio_features": {}, "audio_pickle": {}}
    for p in corpus.participants:
        probs = check.by_participant.setdefault(p.id, [])
        p.media.wav = [w for w in p.media.wav if _audio_ok(w, probs)]
        p.media.video = [v for v in p.media.video if _video_ok(v, probs)]
        p.media.resnet = [m for m in p.media.resnet if _mat_ok(m, probs)]
        found["openface"][p.id] = [_segment_columns(seg, ",", OPENFACE_META, probs, openface_header)
                                   for seg in p.media.openface]
        found["audio_features"][p.id] = [_audio_feature_columns(f, probs) for f in p.media.audio_features
                                         if f.suffix != ".pkl"]
        found["audio_pickle"][p.id] = [_pickle_columns(f, probs) for f in p.media.audio_features if f.suffix == ".pkl"]
    for kind, columns in found.items():
        reference = _reference(columns)
        if reference is not None:
            check.columns[kind] = reference
        for p in corpus.participants:       # an unreadable file is left out even when no other one is readable
            _drop_if_short(p, kind, columns[p.id], set(reference or ()), check.by_participant[p.id],
                           exact=kind == "audio_pickle")
    for p in corpus.participants:
        kept = set(media_files(p))
        check.left_out[p.id] = [f for f in before[p.id] if f not in kept]
    return check


def media_files(p: Participant) -> list[Path]:
    """Every media file of a participant, of every kind (what ``check_media`` may leave out)."""
    m = p.media
    return [*m.wav, *m.audio_features, *(f for segment in m.openface for f in segment), *m.resnet, *m.video]


def checked_corpus(root: str | Path, fmt: str = "auto") -> tuple[Corpus, MediaCheck]:
    """``read_corpus`` plus the media check; the media problems are added to the corpus's problems."""
    from mllm_dr.corpus import read_corpus

    corpus = read_corpus(root, fmt)
    check = check_media(corpus)
    corpus.problems.extend(check.problems)
    return corpus, check


def _audio_ok(path: Path, problems: list[Problem]) -> bool:
    import soundfile as sf

    try:
        frames = sf.info(str(path)).frames
    except Exception as err:  # libsndfile raises its own error types for non-audio files
        reason = "the file is empty (0 bytes)" if _size(path) == 0 else f"not readable as audio ({err})"
        problems.append(Problem(str(path), f"audio left out: {reason}"))
        return False
    if frames == 0:
        problems.append(Problem(str(path), "audio left out: the file holds no samples"))
        return False
    if (cut := _wav_truncated(path)) is not None:
        declared, held = cut
        problems.append(Problem(str(path), f"audio left out: truncated: header declares {declared} bytes of audio, "
                                           f"file holds {held}"))
        return False
    return True


def _wav_truncated(path: Path) -> tuple[int, int] | None:
    """(declared, held) bytes of a RIFF/WAVE file's data chunk when the file ends before it does, else None
    (session 45: libsndfile reads such a file up to where it stops, and the rest of the interview was lost
    unsaid). Reads the chunk headers only."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
                return None
            order = "<" if head[:4] == b"RIFF" else ">"
            pos = 12
            while pos + 8 <= size:
                fh.seek(pos)
                chunk = fh.read(8)
                if len(chunk) < 8:
                    return None
                cid, length = chunk[:4], struct.unpack(order + "I", chunk[4:])[0]
                if cid == b"data":
                    held = size - pos - 8
                    if length != 0xFFFFFFFF and length > held:        # 0xFFFFFFFF: a stream of unknown length
                        return length, held
                    return None
                pos += 8 + length + (length & 1)
    except OSError:
        return None
    return None


def _mat_ok(path: Path, problems: list[Problem]) -> bool:
    """A ResNet .mat whose 'feature' variable is a numeric 2-D array, from the file's variable headers only."""
    from scipy.io import whosmat

    try:
        variables = {name: (shape, cls) for name, shape, cls in whosmat(str(path))}
    except Exception as err:  # scipy: ValueError, NotImplementedError (v7.3 HDF5), ...
        reason = "the file is empty (0 bytes)" if _size(path) == 0 else f"not readable as a MATLAB file ({err})"
        problems.append(Problem(str(path), f"visual left out: {reason}"))
        return False
    if "feature" not in variables:
        problems.append(Problem(str(path), f"visual left out: no 'feature' array (variables: {sorted(variables)})"))
        return False
    shape, cls = variables["feature"]
    if cls not in ("double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64") \
            or len(shape) != 2:
        problems.append(Problem(str(path), f"visual left out: 'feature' is not a numeric 2-D array (frames x 2048) "
                                           f"but {cls} of shape {tuple(shape)}"))
        return False
    return True


def _pickle_columns(path: Path, problems: list[Problem]):
    """A CMDC VGGish pickle's columns (its width), read with the numpy-only unpickler; None when unreadable."""
    import numpy as np

    from mllm_dr.features.audio import _safe_unpickle_array

    try:
        arr = _safe_unpickle_array(path)
    except InputError as err:
        problems.append(Problem(str(path), err.message))
        return None
    return [path], [f"vggish_{i}" for i in range(int(np.prod(arr.shape[1:])))]


def _video_ok(path: Path, problems: list[Problem]) -> bool:
    if _size(path) == 0:
        problems.append(Problem(str(path), "video left out: the file is empty (0 bytes)"))
        return False
    import cv2

    cap = cv2.VideoCapture(str(path))
    ok = cap.isOpened()
    cap.release()
    if not ok:
        problems.append(Problem(str(path), "video left out: not readable as video"))
    return ok


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _segment_columns(files: list[Path], delimiter: str, meta: tuple[str, ...], problems: list[Problem],
                     header=read_header):
    """Feature columns of one time segment (files joined column-wise), or None when unreadable, damaged, or
    when its files hold different numbers of rows."""
    cols: list[str] = []
    rows: dict[Path, int] = {}
    for path in files:
        try:
            names = header(path, delimiter)
        except (InputError, OSError) as err:
            problems.append(Problem(str(path), f"cannot read the header: {getattr(err, 'message', err)}"))
            return None
        scan = _whole(path, delimiter, problems)
        if scan is None:
            return None
        rows[path] = scan.rows
        cols += [c for c in names if c not in meta and c not in cols]
    return (files, cols) if _same_length(rows, problems) else None


def _same_length(rows: dict[Path, int], problems: list[Problem]) -> bool:
    """Whether the files of one segment (DAIC's CLNF AUs, gaze and pose: one row per video frame each) hold
    as many rows each; if not, a problem naming the shortest. Session 44: a pose file that lost rows passed,
    and extraction joined the files on the frames all held, saying so in a note only."""
    if len(set(rows.values())) <= 1:
        return True
    short = min(rows, key=rows.get)
    longest = max(rows, key=rows.get)
    problems.append(Problem(str(short), f"{rows[short]} rows, where {longest.name} of the same segment has "
                                        f"{rows[longest]}: rows were lost (the files of one segment hold the same "
                                        f"frames)"))
    return False


def _whole(path: Path, delimiter: str, problems: list[Problem], header: bool = True) -> TableScan | None:
    """The table's scan, or None with a problem when it cannot be used whole (``tables.scan_table``: cut,
    header only, a NUL byte): a copy or export that stopped or was damaged."""
    try:
        scan = scan_table(path, delimiter, header)
    except OSError as err:
        problems.append(Problem(str(path), f"cannot read: {err.strerror}"))
        return None
    if scan.damage:
        problems.append(Problem(str(path), scan.damage))
        return None
    return scan


def _audio_feature_columns(path: Path, problems: list[Problem]):
    if path.name.endswith("_COVAREP.csv"):          # no header: the width of the first row
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                width = len(fh.readline().split(","))
        except OSError as err:
            problems.append(Problem(str(path), f"cannot read: {err.strerror}"))
            return None
        if _whole(path, ",", problems, header=False) is None:
            return None
        return [path], [f"covarep_{i}" for i in range(width)]
    return _segment_columns([path], ";", AUDIO_META, problems)


def _reference(found: dict[str, list]) -> list[str] | None:
    """The column list most segments share (ties: the larger one), in the order its first file has them."""
    segments = [s for segs in found.values() for s in segs if s is not None]
    if not segments:
        return None
    counts = Counter(frozenset(cols) for _, cols in segments)
    best = max(counts, key=lambda k: (counts[k], len(k), sorted(k)))
    return next(cols for _, cols in segments if frozenset(cols) == best)


def _drop_if_short(p: Participant, kind: str, segments: list, reference: set[str], problems: list[Problem],
                   exact: bool = False) -> None:
    """Leave out this participant's files of one kind when any segment is unreadable or lacks a column
    (``exact``: or has another number of columns, as for feature pickles, which are not selected by name)."""
    bad = None
    for seg in segments:
        if seg is None:
            bad = (None, "one of its feature files is unreadable, truncated or damaged")
            break
        files, cols = seg
        if exact and reference and len(cols) != len(reference):
            like = next((s[0][0].name for s in segments if s is not None and len(s[1]) == len(reference)), None)
            bad = (files, f"audio missing: {len(cols)} feature columns per frame, where most of the corpus's feature "
                          f"pickles{f' ({like} among them)' if like else ''} have {len(reference)}")
            break
        missing = sorted(reference - set(cols))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            bad = (files, f"column(s) {shown} absent (the other participants' files have them)")
            break
    if bad is None:
        return
    files, why = bad
    path = ", ".join(map(str, files)) if files else str(p.folder)
    if kind == "openface":
        # no other visual source for this participant either: one corpus, one visual schema
        p.media.openface, p.media.resnet, p.media.video = [], [], []
        problems.append(Problem(str(path), f"visual missing for participant {p.id}: {why}"))
    else:
        p.media.audio_features = []
        problems.append(Problem(str(path), f"corpus audio features missing for participant {p.id}: {why}"))
