"""The synthetic corpus's media signals (NOT clinical data): voice whose pitch, loudness and
pauses follow severity; OpenFace-style action units, gaze and head pose; E-DAIC's shipped
openSMILE table. Used by ``synth.py`` for every corpus layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

AU_R = ["AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12", "AU14", "AU15", "AU17",
        "AU20", "AU23", "AU25", "AU26", "AU45"]
AU_C = ["AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12", "AU14", "AU15", "AU17",
        "AU20", "AU23", "AU25", "AU26", "AU28", "AU45"]
GAZE = ["gaze_0_x", "gaze_0_y", "gaze_0_z", "gaze_1_x", "gaze_1_y", "gaze_1_z", "gaze_angle_x", "gaze_angle_y"]
POSE = ["pose_Tx", "pose_Ty", "pose_Tz", "pose_Rx", "pose_Ry", "pose_Rz"]
FPS = 30

def audio(sev: float, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Voiced segments: pitch and loudness fall, pitch variation shrinks, pauses grow with severity."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 210 - 80 * sev + (30 * (1 - sev) + 3) * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6.28))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllable = (np.sin(2 * np.pi * 3.0 * t) > (-0.6 + 1.2 * sev)).astype(float)  # more pause when severe
    env = np.convolve(syllable, np.ones(rate // 50) / (rate // 50), mode="same")
    loud = 0.5 - 0.3 * sev
    return (loud * voice * env + 0.003 * rng.normal(size=t.size)).astype(np.float32)


def openface_rows(sev: float, seconds: float, rng: np.random.Generator, with_face_id: bool) -> tuple[list[str], np.ndarray]:
    n = int(seconds * FPS)
    cols = ["frame"] + (["face_id"] if with_face_id else []) + ["timestamp", "confidence", "success"]
    meta = [np.arange(1, n + 1)] + ([np.zeros(n)] if with_face_id else []) + [np.arange(n) / FPS]
    success = (rng.uniform(size=n) > 0.05).astype(float)
    meta += [0.9 * success + 0.05, success]
    au_mean = {a: 0.3 for a in AU_R} | {"AU12": 2.0 * (1 - sev), "AU06": 1.5 * (1 - sev), "AU04": 2.0 * sev, "AU15": 1.5 * sev}
    au_r = [np.clip(au_mean[a] + rng.normal(0, 0.3, n), 0, 5) for a in AU_R]
    au_c = [(np.clip(au_mean.get(a, 0.3) + rng.normal(0, 0.3, n), 0, 5) > 1.0).astype(float) for a in AU_C]
    gaze = [rng.normal(0, 0.05, n) + (0.25 * sev if g.endswith("_y") else 0) for g in GAZE]
    pose = [rng.normal(0, 5, n) + 600 if p == "pose_Tz" else rng.normal(0, 0.05, n) + (0.2 * sev if p == "pose_Rx" else 0)
            for p in POSE]
    data = np.stack(meta + gaze + pose + au_r + au_c, axis=1)
    data[success == 0, len(meta):] = 0.0  # OpenFace writes zeros when no face was found
    return cols + GAZE + POSE + [f"{a}_r" for a in AU_R] + [f"{a}_c" for a in AU_C], data


def write_openface(path: Path, cols: list[str], data: np.ndarray) -> None:
    """OpenFace style: header and values separated by ', '."""
    lines = [", ".join(cols)] + [", ".join(fmt(v) for v in row) for row in data]
    path.write_text("\n".join(lines) + "\n")


def fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4f}"


def write_egemaps_table(path: Path, sev: float, seconds: float, rng: np.random.Generator) -> None:
    """E-DAIC's shipped openSMILE table: ';'-separated, name + frameTime + 23 descriptors at 100 Hz."""
    n = max(int(seconds * 100), 2)
    values = rng.normal(0.0, 1.0, (n, 23)) + sev * np.linspace(1.0, -1.0, 23)
    rows = ["name;frameTime;" + ";".join(f"egemaps_lld_{i}" for i in range(23))]
    rows += [f"'unknown';{t / 100:.2f};" + ";".join(f"{v:.4f}" for v in row) for t, row in enumerate(values)]
    path.write_text("\n".join(rows) + "\n")
