"""Visual features: OpenFace CSVs (selected by column name), ResNet .mat, or raw video.

OpenFace: every column but ``frame, face_id, timestamp, confidence, success`` (709-d for a
full OpenFace 2.x output, 49-d for E-DAIC's Pose_gaze_AUs file), in canonical column order
whatever the order in the file. Frames with ``success == 0`` carry no face: their values are missing
(NaN, pooled as missing and stored as 0), so the time axis keeps its length, and a note counts them
(session 45: they were dropped unsaid, squeezing the time axis).
DAIC's CLNF gaze and pose columns are read under OpenFace 2's names (``CLNF_NAMES``).

Raw video (no OpenFace at the site): OpenCV's bundled Haar frontal-face detector on frames
sampled at ``hz``; 71 columns per frame: ``face_present``, ``face_x, face_y, face_w, face_h``
(box, fractions of the frame), ``face_mean, face_std`` (grey level of the face crop, 0-1)
and ``face_px_0 .. face_px_63`` (the crop resized to 8x8 grey, 0-1). A frame without a
detected face is all zeros. Chosen because opencv-python-headless installs beside flwr
offline; mediapipe cannot (protobuf pin), see README.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mllm_dr.corpus.tables import DroppedRow, Problem, read_header, read_table
from mllm_dr.errors import InputError
from mllm_dr.features.audio import pool

OPENFACE_META = ("frame", "face_id", "timestamp", "confidence", "success")
_AU_R = ["01", "02", "04", "05", "06", "07", "09", "10", "12", "14", "15", "17", "20", "23", "25", "26", "45"]
_AU_C = _AU_R[:16] + ["28", "45"]


def canonical_openface_columns() -> list[str]:
    """OpenFace 2.x output order (709 feature columns)."""
    cols = [f"gaze_{e}_{a}" for e in (0, 1) for a in "xyz"] + ["gaze_angle_x", "gaze_angle_y"]
    cols += [f"eye_lmk_{a}_{i}" for a in "xy" for i in range(56)] + [f"eye_lmk_{a}_{i}" for a in "XYZ" for i in range(56)]
    cols += [f"pose_{a}" for a in ("Tx", "Ty", "Tz", "Rx", "Ry", "Rz")]
    cols += [f"{a}_{i}" for a in "xy" for i in range(68)] + [f"{a}_{i}" for a in "XYZ" for i in range(68)]
    cols += ["p_scale", "p_rx", "p_ry", "p_rz", "p_tx", "p_ty"] + [f"p_{i}" for i in range(34)]
    cols += [f"AU{a}_r" for a in _AU_R] + [f"AU{a}_c" for a in _AU_C]
    return cols


CANONICAL = canonical_openface_columns()
_RANK = {c: i for i, c in enumerate(CANONICAL)}

# DAIC-WOZ's CLNF files (OpenFace before 2.0) name eye gaze and head pose without OpenFace 2's prefixes:
# ``CLNF_gaze.txt`` x_0, y_0, z_0, x_1, y_1, z_1 (then x_h0 .. z_h1, the same in head coordinates, kept as
# they are), ``CLNF_pose.txt`` Tx, Ty, Tz, Rx, Ry, Rz. The same quantities in the same units as OpenFace 2's
# gaze_0_x .. gaze_1_z (unit vectors in camera space) and pose_Tx .. pose_Rz (mm, radians): read as those.
CLNF_NAMES = {
    "_CLNF_gaze.txt": {f"{a}_{e}": f"gaze_{e}_{a}" for e in (0, 1) for a in "xyz"},
    "_CLNF_pose.txt": {a: f"pose_{a}" for a in ("Tx", "Ty", "Tz", "Rx", "Ry", "Rz")},
}


def openface_names(path: Path) -> dict[str, str]:
    """How the columns of this OpenFace file are renamed to OpenFace 2's names ({} for most files)."""
    return next((names for end, names in CLNF_NAMES.items() if path.name.endswith(end)), {})


def openface_header(path: Path, delimiter: str = ",") -> list[str]:
    """The column names of an OpenFace file, as OpenFace 2 names them (first line only)."""
    rename = openface_names(path)
    return [rename.get(c, c) for c in read_header(path, delimiter)]


def read_openface(files: list[Path], problems: list[Problem],
                  select: list[str] | None = None) -> tuple[np.ndarray, list[str], float]:
    """One time segment: files holding the same frames, joined column-wise -> ([T, D], names, fps).

    ``select``: exactly these feature columns (the corpus's schema, features.schema); a missing
    one is an error naming the file and the column, never a shifted table. Files that do not hold the
    same frames (one lost rows) are a DroppedRow naming it since session 44: strict extraction stops.
    """
    tables = []
    for path in files:
        rows = read_table(path, ",", ("success",), problems)
        if not rows:
            raise InputError("OpenFace file has no rows", path)
        if rename := openface_names(path):
            rows = [{rename.get(k, k): v for k, v in r.items()} for r in rows]
        tables.append((path, rows))
    if len(tables) > 1 and all("frame" in rows[0] for _, rows in tables):
        tables = _same_frames(tables, problems)       # DAIC's CLNF files: joined by frame number, never by row
    n = min(len(rows) for _, rows in tables)
    if any(len(rows) != n for _, rows in tables):        # rows lost: a media problem (strict extraction stops)
        short, longest = min(tables, key=lambda t: len(t[1])), max(tables, key=lambda t: len(t[1]))
        problems.append(DroppedRow(str(short[0]), f"{n} rows, where {longest[0].name} of the same segment has "
                                                  f"{len(longest[1])}: rows were lost; cut to {n} frames"))
    columns: dict[str, np.ndarray] = {}
    success = np.ones(n, dtype=bool)
    fps = 30.0
    for path, rows in tables:
        rows = rows[:n]
        try:
            success &= np.array([float(r["success"]) > 0 for r in rows])
            for name in rows[0]:
                if name not in OPENFACE_META and name not in columns and (select is None or name in select):
                    columns[name] = np.array([float(r[name]) for r in rows], dtype=np.float32)
            if "timestamp" in rows[0] and n > 1:
                dt = float(rows[1]["timestamp"]) - float(rows[0]["timestamp"])
                fps = 1.0 / dt if dt > 0 else fps
        except (TypeError, ValueError) as err:
            raise InputError(f"non-numeric OpenFace value ({err})", path) from None
    absent = [c for c in select or () if c not in columns]
    if absent:
        raise InputError(f"column(s) {', '.join(absent[:5])} absent", ", ".join(map(str, files)))
    names = sorted(columns, key=lambda c: (_RANK.get(c, len(_RANK)), c))
    data = np.stack([columns[c] for c in names], axis=1)
    if n and not success.any():     # OpenFace found no face in any frame: said, never a silent missing modality
        problems.append(Problem(str(files[0]), f"OpenFace tracked no face in any of its {n} frames (success = 0): "
                                               f"no visual features from it"))
        return data[:0], names, fps
    if not success.all():           # kept in place as missing values: the time axis stays the video's
        data[~success] = np.nan
        problems.append(Problem(str(files[0]), f"{int((~success).sum())} of {n} frames without a tracked face "
                                               f"(success = 0): missing values in their place"))
    return data, names, fps


def _same_frames(tables: list[tuple[Path, list[dict]]], problems: list[Problem]) -> list[tuple[Path, list[dict]]]:
    """The rows of the frames every file holds, in frame order: a row one file dropped (malformed, reported)
    no longer shifts every later frame of that file against the others'."""
    by_frame = []
    for path, rows in tables:
        try:
            by_frame.append({int(float(r["frame"])): r for r in rows})
        except (TypeError, ValueError) as err:
            raise InputError(f"non-numeric OpenFace frame number ({err})", path) from None
    common = sorted(set.intersection(*(set(b) for b in by_frame)))
    if not common:
        raise InputError("the segment's OpenFace files share no frame number", ", ".join(str(p) for p, _ in tables))
    dropped = max(len(b) for b in by_frame) - len(common)
    if dropped:     # since session 44 a DroppedRow (strict extraction stops), naming a file that lacks frames
        short = min(zip(tables, by_frame), key=lambda table: len(table[1]))[0][0]      # the fewest frames
        problems.append(DroppedRow(str(short), f"{dropped} frame(s) missing from some of the segment's OpenFace "
                                               f"files: joined on the {len(common)} frame numbers all hold"))
    return [(path, [b[f] for f in common]) for (path, _), b in zip(tables, by_frame)]


def read_resnet_mat(path: Path) -> tuple[np.ndarray, list[str]]:
    """E-DAIC ``*_CNN_ResNet.mat``: key ``feature``, N x 2048."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as err:  # scipy raises ValueError / NotImplementedError (v7.3 HDF5) etc.
        raise InputError(f"cannot read MATLAB file: {err}", path) from None
    if "feature" not in mat:
        raise InputError(f"no 'feature' array (keys: {[k for k in mat if not k.startswith('__')]})", path)
    raw = mat["feature"]
    if not isinstance(raw, np.ndarray) or raw.dtype.kind not in "biuf" or raw.ndim != 2:
        kind = getattr(raw, "dtype", type(raw))
        raise InputError(f"'feature' is not a numeric 2-D array (frames x 2048) but {kind} of shape "
                         f"{getattr(raw, 'shape', '?')}", path)
    arr = np.asarray(raw, dtype=np.float32)
    return arr, [f"resnet_{i}" for i in range(arr.shape[1])]


class OpenCvFaceExtractor:
    """Face box + 8x8 grey crop from raw video with OpenCV's bundled Haar cascade."""

    name = "opencv-haar-face-71"
    columns = (["face_present", "face_x", "face_y", "face_w", "face_h", "face_mean", "face_std"]
               + [f"face_px_{i}" for i in range(64)])

    def __init__(self):
        import cv2

        self._cv2 = cv2
        self._detector = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))
        if self._detector.empty():
            raise InputError("OpenCV's bundled face detector could not be loaded (opencv-python-headless 4.x needed)")

    def frame_features(self, frame_bgr: np.ndarray) -> np.ndarray:
        cv2 = self._cv2
        grey = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY) if frame_bgr.ndim == 3 else frame_bgr
        h, w = grey.shape
        faces = self._detector.detectMultiScale(grey, scaleFactor=1.2, minNeighbors=5, minSize=(max(24, w // 16),) * 2)
        out = np.zeros(len(self.columns), dtype=np.float32)
        if len(faces):
            x, y, fw, fh = max(faces, key=lambda f: f[2] * f[3])
            crop = grey[y:y + fh, x:x + fw].astype(np.float32) / 255.0
            out[:7] = [1.0, x / w, y / h, fw / w, fh / h, crop.mean(), crop.std()]
            out[7:] = cv2.resize(crop, (8, 8), interpolation=cv2.INTER_AREA).reshape(-1)
        return out

    def __call__(self, path: Path, hz: float) -> np.ndarray:
        cap = self._cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise InputError("cannot open video", path)
        fps = cap.get(self._cv2.CAP_PROP_FPS) or 25.0
        declared = int(cap.get(self._cv2.CAP_PROP_FRAME_COUNT) or 0)
        step = max(int(round(fps / hz)), 1)
        feats, i = [], 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % step == 0:
                feats.append(self.frame_features(frame))
            i += 1
        cap.release()
        if not feats:
            raise InputError("video has no readable frames", path)
        self.last_short = None
        if declared > 0 and i < declared * 0.9 and declared - i > 1:      # clearly short: cut, not rounding
            self.last_short = (f"video truncated or damaged: its header declares {declared} frames, "
                               f"{i} could be read")
        return np.stack(feats)


__all__ = ["read_openface", "read_resnet_mat", "OpenCvFaceExtractor", "pool", "CANONICAL"]
