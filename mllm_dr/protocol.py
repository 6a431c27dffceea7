"""The wire protocol between the center and the sites: every key of every message, in one place.

Flower carries three kinds of message (``query`` handshake, ``train``, ``evaluate``; with secure
aggregation also ``query.secagg``, the per-round key exchange), each with a
config record (center -> site instructions, small site -> center strings) and a metric record
(site -> center numbers). Each is a pydantic model whose field aliases are the wire keys;
``to_record`` / ``from_record`` encode and decode plain dicts (the apps wrap them in Flower
records). ``site_emitted_keys`` lists every key a site can send: the default site policy must
allow all of them (tested), so a new metric cannot be silently blocked by the egress guard.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from mllm_dr.config import FEATURE_NORMS
from mllm_dr.metrics import SufficientStats

QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"
SECAGG_KEYS = "query.secagg"     # the key exchange before a masked training round (mllm_dr/secagg.py)

# error codes a site answers with instead of content (the reason is in the error message)
BLOCKED = 4031          # the site's egress guard stopped the reply
BUDGET_SPENT = 4032     # the site's differential-privacy budget is spent
REFUSED = 4033          # the site's policy forbids taking part in this run
SECAGG_FAILED = 4034    # the site cannot mask its reply (no key for the round, or an inconsistent roster)
HEAD_REFUSED = 4035     # the center's signed audit head does not verify or goes backwards
SITE_ERROR = 4036       # a handler failed at the site; its text (a path, a participant id) stays in the site's audit log
AUDIT_HEAD = "audit-head-"   # a signed audit head spread over short keys (mllm_dr.audit_heads)
UPLINK_ENCODINGS = ("fp32", "fp16", "int8")   # how a training reply's tensors travel (mllm_dr/uplink.py)
PACKED = "safetensors"   # the one array of a message's "arrays" record: every tensor in one blob (pack_tensors)


def pack_tensors(tensors: dict) -> bytes:
    """Every tensor of a message in one safetensors blob (why one: ``fl_server/wire.py``). Names,
    dtypes and shapes travel unchanged."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in tensors.items()})


def unpack_tensors(blob: bytes, what: str) -> dict:
    """The tensors of a packed message; InputError naming ``what`` when the blob is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from mllm_dr.errors import InputError

    try:
        return load(bytes(blob))
    except (SafetensorError, ValueError) as err:   # truncated, bad header, unknown dtype: SafetensorError
        raise InputError(f"{what}: the tensors are not a valid safetensors blob ({err})") from None


FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")     # run names (as fl_server.plan.RunPlan.run_name), site ids


def _file_name(value: str, what: str) -> str:
    """``value`` when it may name a file: never a path (``../x``), a glob (``*``) or ``.``/``..``."""
    if not isinstance(value, str) or not FILE_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what} {str(value)[:80]!r} is not letters, digits, '_', '.', '-' (at most 64)")
    return value


def run_name(run: str) -> str:
    """``run`` when a site may use it in a file name (its key, residual and report files are named by the run):
    a center's name like ``../x`` or ``*`` never reaches a path or a glob. Raises ValueError."""
    return _file_name(run, "run name")


def site_name(site: str) -> str:
    """``site`` when the center may use it in a file name (``sites/<id>.json``, its heads record): a reply's
    self-declared ``../center`` never names another file; also a workspace's and a request's id. Raises ValueError."""
    return _file_name(site, "site id")


RunName = Annotated[str, AfterValidator(run_name)]
SiteName = Annotated[str, AfterValidator(site_name)]


def malformed(what: str, err: Exception) -> str:
    """One line on a reply this kit cannot read: what, and why (pydantic's messages, not its layout)."""
    from pydantic import ValidationError

    from mllm_dr.errors import first_problem

    why = first_problem(err) if isinstance(err, ValidationError) else (str(err).splitlines() or [""])[0]
    return f"malformed {what} ({type(err).__name__}: {why[:300]})"


class Wire(BaseModel):
    """A message part; field aliases are the wire keys."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)
    prefixed: ClassVar[dict[str, str]] = {}       # dict-valued field -> key prefix on the wire

    def to_record(self) -> dict:
        out = self.model_dump(by_alias=True, exclude_none=True, exclude=set(self.prefixed))
        for name, prefix in self.prefixed.items():
            out |= {f"{prefix}{k}": v for k, v in getattr(self, name).items()}
        return out

    @classmethod
    def from_record(cls, record) -> "Wire":
        data = dict(record)
        for name, prefix in sorted(cls.prefixed.items(), key=lambda kv: -len(kv[1])):   # "ss-maa-is-" before "ss-"
            data[name] = {k[len(prefix):]: data.pop(k) for k in [k for k in data if k.startswith(prefix)]}
        return cls.model_validate(data)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.alias or n for n, f in cls.model_fields.items() if n not in cls.prefixed] + \
            [f"{p}*" for p in cls.prefixed.values()]


# ----------------------------------------------------------------------------- center -> site
class Signed(Wire):
    """The global adapters' signed context and the center's signature (every train/evaluate message),
    with the center's signed audit head, which the site keeps (truncation of the center's log shows)."""

    prefixed: ClassVar[dict[str, str]] = {"audit_head": AUDIT_HEAD}
    context: str                                   # JSON of the fields signing.SIGNED_FIELDS covers
    signature: str
    policy: str = ""                               # the run's policy (JSON); '' = the default policy
    audit_head: dict[str, int | str] = Field(default_factory=dict)


class HandshakeQuery(Wire):
    run: RunName
    base_model: str = Field(alias="base-model")
    base_sha256: str = Field(alias="base-sha256")
    policy: str = ""
    feature_recipe: str = Field("", alias="feature-recipe")   # the site checks its features follow it
    feature_norms: Literal[FEATURE_NORMS] = Field("site", alias="feature-norms")   # the run's (mllm_dr/config.py)

    @property
    def send_moments(self) -> bool:
        """Reply with the site's frame moments: the run normalises features over every site."""
        return self.feature_norms == "federated"


class TrainInstruction(Signed):
    round: int = Field(alias="train-round", ge=1)
    stage: int = Field(alias="train-stage", ge=1, le=2)
    local_epochs: int = Field(alias="local-epochs", ge=0)     # never negative: the DP ledger charges
    batch_size: int = Field(alias="batch-size", ge=1)         # local-epochs x steps (a negative count refunded)
    lr_lq: float = Field(alias="lr-lq")
    lr_lora: float = Field(alias="lr-lora")
    lr_maa: float = Field(alias="lr-maa")
    lr_factor: float = Field(1.0, alias="lr-factor")
    score_weight: float = Field(0.0, alias="score-weight")
    proximal_mu: float = Field(0.0, alias="proximal-mu")     # FedProx: pull the local weights toward the global
    local_steps: int = Field(0, alias="local-steps", ge=0)   # > 0: this many steps instead of local-epochs,
    first_step: int = Field(0, alias="first-step", ge=0)           # from this step of the stage's stream (training.step_window)
    round_validation: bool = Field(False, alias="validate")   # also send the cheap held-out check for learning curves
    secagg_roster: str = Field("", alias="secagg-roster")   # 'site=<X25519 public hex>;...': mask the reply
    uplink: Literal[UPLINK_ENCODINGS] = "fp32"              # how the reply's tensors are encoded


class SecAggKeysQuery(Wire):
    """Before a masked round: make a key pair for (run, round) and send the public key."""

    run: RunName
    round: int = Field(alias="secagg-round", ge=1)    # as a training round: a key of round -1 was never deleted
    base_sha256: str = Field(alias="base-sha256")
    policy: str = ""
    # the round's local epochs, so a site under DP can tell whether its budget covers the round before it
    # joins the roster; sent only when not 1 (a site of an older kit reads the rest unchanged)
    local_epochs: int | None = Field(None, alias="local-epochs", ge=1)


class EvaluateInstruction(Signed):
    # only the held-out split: train/dev statistics would release the training patients' scores outside
    # any DP accounting, and the split names a report file at the site (no free string may reach a path)
    split: Literal["test"] = "test"
    max_new_tokens: int = Field(alias="max-new-tokens")
    evaluate: bool = True                          # False: only deliver the final global for local scoring


# ----------------------------------------------------------------------------- site -> center
class SiteId(Wire):
    """Config record of every reply: which site answers, and the site's signed audit head (the center
    keeps it, so a site log cut or rolled back later shows against the center's record)."""

    prefixed: ClassVar[dict[str, str]] = {"audit_head": AUDIT_HEAD}
    site_id: SiteName = Field(alias="site-id")
    audit_head: dict[str, int | str] = Field(default_factory=dict)


class HandshakeReply(Wire):
    """With ``moments``: the frame count, per-dimension sum and sum of squares of the site's training
    features (``moments_record``), from which the center makes the run's feature norms."""

    prefixed: ClassVar[dict[str, str]] = {"dims": "dim-", "moments": "fm-"}
    num_examples: int = Field(alias="num-examples")
    dims: dict[str, int] = Field(default_factory=dict)
    moments: dict[str, float] = Field(default_factory=dict)


def moments_record(moments) -> dict[str, float]:
    """``processor.Moments`` as flat numbers: '<modality>-n', '<modality>-sum-<i>', '<modality>-sumsq-<i>'."""
    out = {}
    for m, (n, total, squares) in moments.items():
        out[f"{m}-n"] = float(n)
        out |= {f"{m}-sum-{i}": float(v) for i, v in enumerate(total.tolist())}
        out |= {f"{m}-sumsq-{i}": float(v) for i, v in enumerate(squares.tolist())}
    return out


def moments_from_record(record: dict[str, float], dims: dict[str, int]):
    """The inverse of ``moments_record`` for the run's widths; a part missing or extra is an error."""
    import torch

    out, expected = {}, set()
    for m, d in dims.items():
        if f"{m}-n" not in record:
            continue
        keys = [f"{m}-n"] + [f"{m}-{part}-{i}" for part in ("sum", "sumsq") for i in range(d)]
        expected |= set(keys)
        if any(k not in record for k in keys):
            raise ValueError(f"feature moments of {m} are incomplete for width {d}")
        n = float(record[f"{m}-n"])
        total = torch.tensor([record[f"{m}-sum-{i}"] for i in range(d)], dtype=torch.float64)
        squares = torch.tensor([record[f"{m}-sumsq-{i}"] for i in range(d)], dtype=torch.float64)
        # what real frames give (a NaN sum or a count of 1e12 became every site's norms for the run: a review,
        # session 42): a whole count, finite sums, and n * sum of squares >= sum^2 per dimension
        if not (math.isfinite(n) and n >= 0 and n == int(n)):
            raise ValueError(f"feature moments of {m}: frame count {n:g} is not a whole number >= 0")
        if not (torch.isfinite(total).all() and torch.isfinite(squares).all()):
            raise ValueError(f"feature moments of {m}: a sum is not finite")
        if (n * squares < total * total - 1e-9 * (n * squares).abs() - 1e-9).any() or (squares < 0).any():
            raise ValueError(f"feature moments of {m}: no {int(n)} frames give these sums")
        out[m] = (int(n), total, squares)
    if set(record) - expected:
        raise ValueError(f"feature moments for widths other than {dims}: {sorted(set(record) - expected)[:3]}")
    return out


class SecAggKeysReply(Wire):
    """Config record of the key-exchange reply (with ``SiteId``)."""

    public_key: str = Field(alias="secagg-public-key")


class TrainReply(Wire):
    prefixed: ClassVar[dict[str, str]] = {"validation": "val-ss-"}
    num_examples: int = Field(alias="num-examples")
    train_loss: float = Field(0.0, alias="train-loss")
    lm_loss: float = Field(0.0, alias="lm-loss")
    mse: float = 0.0
    lora_scaling: float = Field(alias="lora-scaling")
    bytes_out: int = Field(0, alias="bytes-out")
    train_seconds: float = Field(0.0, alias="train-seconds")   # local training wall time (round overhead)
    epsilon: float | None = None                   # set by the site's DP mod
    epsilon_total: float | None = Field(None, alias="epsilon-total")
    clip_norm: float | None = Field(None, alias="clip-norm")
    secagg_clip: float | None = Field(None, alias="secagg-clip")   # the L2 bound the site enforced before masking
    validation: dict[str, float] = Field(default_factory=dict)   # regression-head sufficient statistics of the
    #                                                              global the round started from (before training)


def stats_record(stats: SufficientStats) -> dict[str, float]:
    return {k: float(v) for k, v in stats.to_dict().items()}


def stats_from_record(record: dict[str, float]) -> SufficientStats:
    """A site's statistics from its reply; ValueError naming what is missing or impossible (the center
    leaves such a reply out, named, instead of pooling it or stopping the run)."""
    proto = SufficientStats()
    missing = [k for k in proto.to_dict() if k not in record]
    if missing:
        raise ValueError(f"statistics without {', '.join(missing)}")
    values = {k: float(record[k]) for k in proto.to_dict()}
    whole = {k: int(v) if isinstance(getattr(proto, k), int) and math.isfinite(v) and v == int(v) else v
             for k, v in values.items()}
    stats = SufficientStats(**whole)
    why = stats.problem()
    if why:
        raise ValueError(f"impossible statistics: {why}")
    return stats


class EvaluateReply(Wire):
    """Sufficient statistics of the site's held-out totals: never a per-patient value. The MAA head's
    own figures travel under ``ss-maa-`` (so a site policy allowing ``ss-*`` already allows them)."""

    prefixed: ClassVar[dict[str, str]] = {"stats": "ss-", "item_stats": "is-", "rationale_stats": "rs-",
                                          "head_stats": "ss-maa-", "head_item_stats": "ss-maa-is-"}
    num_examples: int = Field(alias="num-examples")
    stats: dict[str, float] = Field(default_factory=dict)
    item_stats: dict[str, float] = Field(default_factory=dict)
    rationale_stats: dict[str, float] = Field(default_factory=dict)
    head_stats: dict[str, float] = Field(default_factory=dict)
    head_item_stats: dict[str, float] = Field(default_factory=dict)
    format_violations: int = Field(0, alias="format-violations")
    items: int = 0

    @classmethod
    def of(cls, e) -> "EvaluateReply":
        """From an ``evaluation.Evaluation``: its sufficient statistics only (never its rows)."""
        return cls(num_examples=e.stats.n, stats=stats_record(e.stats), item_stats=e.item_stats.to_dict(),
                   rationale_stats=e.rationale_stats.to_dict(), head_stats=stats_record(e.head_stats),
                   head_item_stats=e.head_item_stats.to_dict(), format_violations=e.violations, items=e.items)

    def evaluation(self):
        from mllm_dr.evaluation import Evaluation
        from mllm_dr.grounding import RationaleStats
        from mllm_dr.metrics import ItemStats

        stats = stats_from_record(self.stats)
        if stats.n != self.num_examples:
            raise ValueError(f"statistics over {stats.n} participant(s), num-examples {self.num_examples}")
        if not 0 <= self.format_violations <= self.items:
            raise ValueError(f"{self.format_violations} format violations in {self.items} items")
        e = Evaluation(stats, self.format_violations, self.items,
                       ItemStats.from_record(self.item_stats) if self.item_stats else ItemStats(),
                       RationaleStats.from_record(self.rationale_stats) if self.rationale_stats else RationaleStats(),
                       stats_from_record(self.head_stats) if self.head_stats else SufficientStats(),
                       ItemStats.from_record(self.head_item_stats) if self.head_item_stats else ItemStats())
        # the item-level counts describe the same participants and items as the totals
        if e.head_stats.n not in (0, stats.n):
            raise ValueError(f"head statistics over {e.head_stats.n} participant(s), totals over {stats.n}")
        for name, counts in (("item", e.item_stats), ("head item", e.head_item_stats), ("rationale", e.rationale_stats)):
            if counts.n_items > self.items:
                raise ValueError(f"{name} statistics over {counts.n_items} items, {self.items} scored")
        for name, counts in (("item", e.item_stats), ("head item", e.head_item_stats)):
            if counts.n_participants > stats.n:
                raise ValueError(f"{name} statistics over {counts.n_participants} participants, totals over {stats.n}")
        return e


SITE_REPLIES = (SiteId, HandshakeReply, SecAggKeysReply, TrainReply, EvaluateReply)


def site_emitted_keys() -> list[str]:
    """Every metric/config key (or ``prefix*`` pattern) a site's reply can carry."""
    return sorted({k for part in SITE_REPLIES for k in part.keys()})
