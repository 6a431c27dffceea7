"""Acoustic features: the corpus's own when shipped, else computed from wav.

Default extractor: openSMILE eGeMAPSv02 low-level descriptors (25-d, 100 Hz), offline.
HuBERT (768-d, 50 Hz) when a site names a local checkpoint. Everything is average-pooled
to ``hz`` frames per second so a 15-minute interview stays a few thousand frames.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np

from mllm_dr.corpus.tables import Problem, read_table
from mllm_dr.errors import InputError

TARGET_RATE = 16000


def load_wav(path: Path, notes: list[Problem]) -> np.ndarray:
    """Mono float32 at 16 kHz. Other rates are resampled and stereo is downmixed; both are noted."""
    import soundfile as sf
    from scipy.signal import resample_poly

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises its own LibsndfileError and RuntimeError
        raise InputError(f"cannot read audio: {err}", path) from None
    if data.shape[0] == 0:
        raise InputError("audio file holds no samples", path)
    if data.shape[1] > 1:
        notes.append(Problem(str(path), f"{data.shape[1]} channels downmixed to mono"))
        data = data.mean(axis=1, keepdims=True)
    mono = data[:, 0]
    if rate != TARGET_RATE:
        notes.append(Problem(str(path), f"resampled {rate} Hz -> {TARGET_RATE} Hz"))
        g = np.gcd(int(rate), TARGET_RATE)
        mono = resample_poly(mono, TARGET_RATE // g, int(rate) // g).astype(np.float32)
    return mono


def pool(frames: np.ndarray, src_hz: float, dst_hz: float) -> np.ndarray:
    """Average-pool a [T, D] sequence from src_hz to dst_hz (no-op when already slower).

    A value that is not finite (NaN, and since session 44 also +-inf) counts as missing: the window is the
    mean of its other frames (an inf made the whole pooled value inf, stored as 0), NaN when it has none.
    The caller counts them before pooling (features.extract).
    """
    k = int(round(src_hz / dst_hz))
    if k <= 1 or frames.shape[0] == 0:
        return frames.astype(np.float32)
    t = (frames.shape[0] + k - 1) // k
    padded = np.full((t * k, frames.shape[1]), np.nan, dtype=np.float64)
    padded[: frames.shape[0]] = frames
    padded[np.isinf(padded)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # a window with no finite value: NaN, said by the caller
        return np.nanmean(padded.reshape(t, k, -1), axis=1).astype(np.float32)


class OpenSmileExtractor:
    """eGeMAPSv02 LLDs. One instance is reused: building the openSMILE graph costs time."""

    name = "opensmile-eGeMAPSv02-LLD"
    native_hz = 100.0

    def __init__(self):
        import opensmile

        self._smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                      feature_level=opensmile.FeatureLevel.LowLevelDescriptors)
        self.columns = list(self._smile.feature_names)

    def __call__(self, signal: np.ndarray) -> np.ndarray:
        return self._smile.process_signal(signal, TARGET_RATE).to_numpy(dtype=np.float32)


HUBERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                  "pytorch_model.bin.index.json")


def check_hubert_folder(path: Path) -> None:
    """InputError naming the folder unless it looks like a local HuBERT checkpoint (``save_pretrained``'s
    config.json of model_type hubert, and weights). Cheap, no model loaded: ``extract`` checks --hubert this
    way before it writes anything (session 44: a wrong folder was saved into workspace.json first)."""
    path = Path(path)
    if not path.exists():
        raise InputError("HuBERT checkpoint folder does not exist", path)
    if not path.is_dir():
        raise InputError("is not a folder (--hubert wants a local HuBERT checkpoint folder)", path)
    want = "--hubert wants a local HuBERT checkpoint folder, as save_pretrained writes it"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"not a HuBERT checkpoint: no config.json ({want})", path) from None
    except (OSError, ValueError) as err:
        raise InputError(f"not a HuBERT checkpoint: config.json cannot be read ({err})", path) from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "hubert":
        raise InputError(f"not a HuBERT checkpoint: config.json says model_type {kind!r} ({want})", path)
    if not any((path / name).is_file() for name in HUBERT_WEIGHTS):
        raise InputError(f"not a HuBERT checkpoint: no weights ({' or '.join(HUBERT_WEIGHTS[:2])})", path)


class HubertExtractor:
    """HuBERT last hidden state (768-d for base), 50 Hz, from a local checkpoint folder."""

    native_hz = 50.0

    def __init__(self, path: Path):
        import torch
        from transformers import AutoFeatureExtractor, HubertModel

        check_hubert_folder(path)
        self.name = f"hubert:{Path(path).name}"
        self._torch = torch
        try:
            self._model = HubertModel.from_pretrained(str(path)).eval()
        except (OSError, ValueError) as err:   # no config/weights, or another architecture
            raise InputError(f"not a loadable HuBERT checkpoint ({str(err).splitlines()[0]})", path) from None
        try:
            self._fe = AutoFeatureExtractor.from_pretrained(str(path))
        except OSError:
            self._fe = None
        self.columns = [f"hubert_{i}" for i in range(self._model.config.hidden_size)]

    def __call__(self, signal: np.ndarray) -> np.ndarray:
        x = signal
        if self._fe is not None:
            x = self._fe(signal, sampling_rate=TARGET_RATE, return_tensors="np")["input_values"][0]
        with self._torch.no_grad():
            out = self._model(self._torch.from_numpy(np.asarray(x, dtype=np.float32))[None]).last_hidden_state
        return out[0].numpy()


def read_corpus_audio_features(path: Path, problems: list[Problem],
                               select: list[str] | None = None) -> tuple[np.ndarray, list[str], float]:
    """Shipped acoustic features -> ([T, D], column names, frames per second).

    ``select``: the corpus's column schema (features.schema), taken by name in that order.
    """
    name = path.name
    if name.endswith("_COVAREP.csv"):  # DAIC: no header, 74 columns, 100 Hz
        try:
            rows = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
        except ValueError as err:
            raise InputError(f"not a numeric table ({err})", path) from None
        if select is not None and rows.shape[1] != len(select):
            raise InputError(f"{rows.shape[1]} columns, the corpus's other COVAREP files have {len(select)}", path)
        return rows, [f"covarep_{i}" for i in range(rows.shape[1])], 100.0
    if name.endswith(".pkl"):  # CMDC VGGish, ~1 frame/0.96 s
        arr = _safe_unpickle_array(path)
        return arr.reshape(arr.shape[0], -1), [f"vggish_{i}" for i in range(int(np.prod(arr.shape[1:])))], 1 / 0.96
    # E-DAIC openSMILE 2.3 CSVs: semicolon-separated, 'name' and 'frameTime' then descriptors
    rows = read_table(path, ";", ("frameTime",), problems)
    if not rows:
        raise InputError("feature file has no rows", path)
    cols = [c for c in rows[0] if c not in ("name", "frameTime")] if select is None else list(select)
    absent = [c for c in cols if c not in rows[0]]
    if absent:
        raise InputError(f"column(s) {', '.join(absent[:5])} absent", path)
    try:
        data = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float32)
        times = [float(r["frameTime"]) for r in rows[:2]]
    except (TypeError, ValueError) as err:
        raise InputError(f"non-numeric feature value ({err})", path) from None
    hz = 1.0 / (times[1] - times[0]) if len(times) == 2 and times[1] > times[0] else 100.0
    return data, cols, hz


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Corpus pickles are untrusted: allow numpy array reconstruction and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a corpus pickle")


def _safe_unpickle_array(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            obj = _NumpyOnlyUnpickler(fh).load()
    except Exception as err:
        raise InputError(f"cannot read feature pickle safely: {err}", path) from None
    try:
        arr = np.asarray(obj, dtype=np.float32)
    except (TypeError, ValueError) as err:      # a dict, a ragged list: not one array of frames
        raise InputError(f"feature pickle does not hold one numeric array ({type(obj).__name__}: {err})",
                         path) from None
    if arr.ndim == 0:           # session 44: arr.shape[0] was an IndexError, an internal error (exit 3)
        raise InputError("feature pickle holds a single value, not frames", path)
    if arr.ndim == 1:
        arr = arr[None]
    return arr
