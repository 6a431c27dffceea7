"""The DP ledgers tell the truth (a privacy review, session 43): status and `policy show` report the
ledger a run's DP charged, at the delta of its charges; training without DP released after DP rounds
voids the guarantee; a round whose reply never leaves the site is refunded; clipping bounds non-finite
inputs; the trainer runs the mechanism charged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from policies.schema import SitePolicy, load_policy

ROOT = Path(__file__).resolve().parents[1]


def _policy(**dp) -> SitePolicy:
    pol = load_policy().model_dump()
    pol["dp"].update(dp)
    return SitePolicy.model_validate(pol)


SITE_DP = _policy(enabled=True, unit="site", noise_multiplier=1.0, clip_norm=1.0, epsilon_budget=10.0)


def _workspace(tmp_path, synth_site, policy: SitePolicy | None = None):
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(synth_site[0]), "edaic"      # PHQ-8: 8 items
    ws.save()
    if policy is not None:
        (ws.root / "policy.json").write_text(policy.model_dump_json())
    return ws


def _stub_app(mods, update: dict | None = None):
    """A ClientApp with these mods around a stand-in trainer that answers ``update`` (the real mods, a
    handler that trains nothing)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train(mods=mods)
    def train(msg, context):
        arrays = update if update is not None else {"lq.w": torch.full((5,), 2.0)}
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(arrays),
                                   "metrics": MetricRecord({"num-examples": 40, "lora-scaling": 2.0})}), reply_to=msg)

    return app


def _message(run: str, round_: int, run_policy: str = "", tensor: str = "lq.w"):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from mllm_dr.protocol import TrainInstruction

    cfg = ConfigRecord(TrainInstruction(context=json.dumps({"run": run, "round": round_ - 1}), signature="",
                                        policy=run_policy, round=round_, stage=2, local_epochs=1, batch_size=1,
                                        lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3).to_record())
    sent = ArrayRecord.from_torch_state_dict({tensor: torch.zeros(5)})
    return Message(RecordDict({"arrays": sent, "config": cfg}), dst_node_id=7, message_type="train")


def _context(ws):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})


def _shown(ws) -> dict:
    return json.loads(run_cli("mllmdr-site", "policy", "show", "--workspace", ws.root, "--json").stdout)


def test_status_and_policy_show_report_the_ledger_a_runs_dp_charged_at_the_delta_of_its_charges(
        tmp_path, flower_task, synth_site):
    """Defect 1: status and `policy show` read the ledger of the SITE's policy (unit site, DP off by default)
    at the site's delta, while dp_mod charges the ledger of the EFFECTIVE policy (a run imposing patient-level
    DP): status said "no DP round yet" and `policy show` epsilon 0 after a patient-level DP round."""
    from fl_client.privacy_mod import dp_mod
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.site_status import privacy_spent

    ws = _workspace(tmp_path, synth_site)                   # the default site policy: DP off, unit site, delta 1e-5
    run = json.loads((ROOT / "policies" / "demo-dp-patient.json").read_text())
    run["dp"]["delta"] = 1e-3
    reply = _stub_app([dp_mod])(_message("demo", 1, json.dumps(run)), _context(ws))
    assert not reply.has_error(), reply.error.reason
    patient = PrivacyLedger.of(ws.root, "patient")
    eps = patient.spent(1e-3)
    assert eps > 0 and patient.spent(1e-5) > eps + 0.1          # the delta matters
    shown = privacy_spent(ws)
    assert shown is not None, "status: no DP round yet (epsilon 0)"
    assert (shown["unit"], shown["delta"], shown["rounds"]) == ("patient", 1e-3, 1)
    assert shown["epsilon"] == pytest.approx(eps)
    cli = _shown(ws)
    assert cli["epsilon_unit"] == "patient" and cli["epsilon_spent"] == pytest.approx(eps)
    # both units' ledgers, each at its own delta
    PrivacyLedger.of(ws.root, "site").record("old", 1, 1.0, 1.0, 1e-4)
    both = {led["unit"]: led for led in privacy_spent(ws)["ledgers"]}
    assert both.keys() == {"site", "patient"} and both["site"]["delta"] == 1e-4 and both["patient"]["delta"] == 1e-3
    assert both["site"]["epsilon"] == pytest.approx(PrivacyLedger.of(ws.root, "site").spent(1e-4))
    # a ledger written without its delta stays readable: reported at the policy's, which the next charge records
    (ws.root / "privacy.json").write_text(json.dumps({"rounds": [{"run": "old", "round": 1, "noise_multiplier": 1.0}]}))
    site = {led["unit"]: led for led in privacy_spent(ws)["ledgers"]}["site"]
    assert site["delta"] == 1e-5 and not site["delta_recorded"] and "error" not in site
    PrivacyLedger.of(ws.root, "site").record("old", 2, 1.0, 1.0, 1e-4)
    assert json.loads((ws.root / "privacy.json").read_text())["delta"] == 1e-4


def test_training_without_dp_after_dp_rounds_voids_the_guarantee(tmp_path, flower_task, synth_site):
    """Defect 2: a round trained without DP after DP rounds was not recorded (dp_mod just called the handler),
    so the ledger kept a finite epsilon for patients trained on unprotected. Now it is an "unprotected round"
    record, written when the round's reply is released: epsilon is infinite, said with when and which round,
    and DP-budgeted training is refused."""
    from fl_client.egress import egress_guard
    from fl_client.privacy_mod import dp_mod
    from mllm_dr import audit
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.protocol import BUDGET_SPENT
    from mllm_dr.site_status import privacy_spent

    ws = _workspace(tmp_path, synth_site)                   # the site allows runs without DP
    app, ctx, dp_run = _stub_app([egress_guard, dp_mod]), _context(ws), SITE_DP.model_dump_json()
    assert not app(_message("plain-before", 1), ctx).has_error()
    assert not (ws.root / "privacy.json").exists()           # before any DP round: nothing to void
    assert not app(_message("dp", 1, dp_run), ctx).has_error()
    blocked = _stub_app([egress_guard, dp_mod], {"secret.w": torch.ones(5)})(_message("plain", 1, tensor="secret.w"), ctx)
    assert blocked.has_error() and PrivacyLedger.of(ws.root, "site").spent(1e-5) < math.inf   # nothing released
    assert not app(_message("plain", 1), ctx).has_error()    # allowed, and recorded when released
    shown = privacy_spent(ws)
    assert shown["epsilon"] == math.inf, shown
    assert "guarantee void since" in shown["void"] and "run plain round 1" in shown["void"]
    assert PrivacyLedger.of(ws.root, "site").spent(1e-5) == math.inf
    refused = app(_message("dp", 2, dp_run), ctx)
    assert refused.has_error() and refused.error.code == BUDGET_SPENT and "void" in refused.error.reason
    cli = _shown(ws)
    assert cli["epsilon_spent"] is None and "guarantee void since" in cli["ledgers"][0]["void"]   # inf: null in JSON
    text = run_cli("mllmdr-site", "status", "--workspace", ws.root).stdout      # the operator's screen says it too
    assert "privacy: epsilon spent so far for the site's whole contribution: infinite: guarantee void since" in \
        " ".join(text.split())
    assert "dp_unprotected_round" in [e["event"] for e in audit.read(ws.audit_path)]


def test_a_dp_round_whose_reply_the_egress_guard_blocks_is_refunded(site_ws, flower_task, tmp_path):
    """Defect 3 (the reported repro, through the real ClientApp): site-level DP, a site policy without the
    `.absmax` tensor patterns, a run asking for an int8 uplink. The egress guard blocked every reply (4031)
    after dp_mod had charged the round: the budget ran out though nothing was released. Now the outermost
    mod refunds the charge of a round whose final reply is an error, and audits it."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr import audit
    from mllm_dr.base_model import base_info
    from mllm_dr.federated import RunSpec, initial_state, site_dims
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.protocol import BLOCKED, TrainInstruction
    from mllm_dr.signing import load_private, sign_state

    pol = SITE_DP.model_dump() | {"min_participants": 2}
    pol["egress"]["tensor_patterns"] = [p for p in pol["egress"]["tensor_patterns"] if not p.endswith(".absmax")]
    (site_ws.root / "policy.json").write_text(json.dumps(pol))
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})

    def train(run: str, uplink: str):
        spec = RunSpec(run, "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws))
        state, ctx = initial_state(spec), spec.context(0, 0)
        t = TrainInstruction(context=json.dumps(ctx), signature=sign_state(load_private(tmp_path / "center.key"),
                                                                          state, ctx),
                             policy=json.dumps(pol), round=1, stage=2, local_epochs=1, batch_size=4,
                             lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3, uplink=uplink)
        return app(Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(t.to_record())}),
                           dst_node_id=7, message_type="train"), context)

    ledger = PrivacyLedger.of(site_ws.root, "site")
    blocked = train("int8", "int8")
    assert blocked.has_error() and blocked.error.code == BLOCKED, blocked.error
    assert ledger.own() == [], "charged for a round whose reply never left the site"
    refund = [e for e in audit.read(site_ws.audit_path) if e["event"] == "dp_refund"]
    assert len(refund) == 1 and refund[0]["epsilon_total"] == 0.0 and refund[0]["unit"] == "site"
    assert len(context.state) == 0                           # nothing of the round kept for the next message
    # a blocked round between two released ones: its charge taken back, the next one charged as usual
    from fl_client.egress import egress_guard
    from fl_client.privacy_mod import dp_mod

    sent, stub_ctx = _stub_app([egress_guard, dp_mod]), _context(site_ws)
    stub_blocked = _stub_app([egress_guard, dp_mod], {"secret.w": torch.ones(5)})   # a name the policy does not allow
    assert not sent(_message("stub", 1), stub_ctx).has_error()
    assert stub_blocked(_message("stub", 2, tensor="secret.w"), stub_ctx).error.code == BLOCKED
    reply = sent(_message("stub", 3), stub_ctx)
    assert not reply.has_error(), reply.error.reason
    assert len(ledger.own()) == 2 and reply.content["metrics"]["epsilon-total"] == pytest.approx(ledger.spent(1e-5))


def test_clipping_drops_a_contribution_whose_norm_is_not_finite(tmp_path, flower_task, synth_site):
    """Defect 4: a NaN norm failed `norm > 0`, so the scale stayed 1 (unclipped); an infinite norm gave scale 0
    and inf * 0 = NaN. Now such a patient's gradient is dropped from the DP-SGD sum, and a site-level update
    that is not finite is refused before noise (and its charge refunded)."""
    from types import SimpleNamespace

    from fl_client.privacy_mod import dp_mod
    from mllm_dr.privacy import PrivacyLedger, PrivateRandom, clip_and_noise, clipped_delta
    from mllm_dr.training import PatientDP, private_gradient

    # patient-level: one forward and backward per patient; the model here is a linear loss w . x of their x
    w = torch.zeros(3, requires_grad=True)
    sm = SimpleNamespace(model=lambda x: x, processor=SimpleNamespace(collate=lambda exs: torch.tensor(exs[0])))
    patients = [[[2.0, 2.0, 1.0]], [[math.nan, 1.0, 1.0]], [[math.inf, 1.0, 1.0]]]
    total, norms = private_gradient(sm, patients, [w], lambda x: (w * x).sum(), PatientDP(1.0, 0.0, 1.0), 1.0,
                                    PrivateRandom(0))
    assert norms[0] == pytest.approx(3.0) and not math.isfinite(norms[1]) and not math.isfinite(norms[2])
    assert torch.allclose(total[0], torch.tensor([2.0, 2.0, 1.0]) / 3.0), total   # the first patient alone, clipped
    for bad in (math.nan, math.inf):
        deltas, norm = clipped_delta({"w": torch.tensor([bad, 3.0])}, {"w": torch.zeros(2)}, 1.0)
        assert not math.isfinite(norm) and torch.equal(deltas["w"], torch.zeros(2, dtype=torch.float64)), deltas
    from mllm_dr.privacy import NonFiniteUpdate

    with pytest.raises(NonFiniteUpdate, match="not finite"):
        clip_and_noise({"w": torch.tensor([math.nan, 3.0])}, {"w": torch.zeros(2)}, 1.0, 1.0)
    # site-level DP through dp_mod: refused before noise, nothing charged
    ws = _workspace(tmp_path, synth_site, SITE_DP)
    app = _stub_app([dp_mod], {"lq.w": torch.full((5,), math.nan)})
    with pytest.raises(NonFiniteUpdate):
        app(_message("nan", 1), _context(ws))
    assert PrivacyLedger.of(ws.root, "site").own() == []


def test_a_blocked_round_at_a_site_with_both_ledgers_charged_leaves_both_usable_and_json_strict(
        tmp_path, flower_task, synth_site):
    """A second read of session 43's change: a round without DP marked every charged ledger before its reply
    was released, and a blocked reply refunded the marks one ledger at a time, leaving the site ledger below
    an audit entry of inf, refused for good. Marks are now written only when a reply is released, and an
    infinite epsilon is stored as null (strict JSON), never a bare Infinity."""
    from fl_client.egress import egress_guard
    from fl_client.privacy_mod import dp_mod
    from mllm_dr.privacy import PrivacyLedger

    ws = _workspace(tmp_path, synth_site)                        # the site's own policy: DP off
    app, ctx = _stub_app([egress_guard, dp_mod]), _context(ws)
    patient_run = json.loads((ROOT / "policies" / "demo-dp-patient.json").read_text())
    patient_run["dp"]["epsilon_budget"] = 100.0              # it also counts the site-level round
    assert not app(_message("a", 1, SITE_DP.model_dump_json()), ctx).has_error()       # site-level DP round
    assert not app(_message("b", 1, json.dumps(patient_run)), ctx).has_error()         # patient-level DP round
    blocked = _stub_app([egress_guard, dp_mod], {"secret.w": torch.ones(5)})(_message("c", 1, tensor="secret.w"), ctx)
    assert blocked.has_error()
    site, patient = PrivacyLedger.of(ws.root, "site"), PrivacyLedger.of(ws.root, "patient")
    assert site.unprotected() == [] and patient.unprotected() == []
    again = app(_message("a", 2, SITE_DP.model_dump_json()), ctx)                     # still usable
    assert not again.has_error(), again.error.reason
    assert math.isfinite(site.spent(1e-5)) and len(site.own()) == 2
    assert not app(_message("c", 2), ctx).has_error()                                   # released without DP
    for path in (site.path, patient.path, ws.audit_path):                              # strict JSON throughout
        for line in [path.read_text()] if path.suffix == ".json" else path.read_text().splitlines():
            json.loads(line, parse_constant=lambda c: pytest.fail(f"{path.name} holds a bare {c}"))
    assert json.loads(site.path.read_text())["epsilon"] is None and site.spent(1e-5) == math.inf


def test_the_trainer_runs_the_mechanism_the_round_was_charged_for_whatever_the_policy_became(
        tmp_path, flower_task, synth_site):
    """The handler rebuilt its DP-SGD settings from the site's policy after loading the model, while dp_mod
    had charged the ledger from the policy as it was at the charge: a policy edited in between (step item ->
    patient, or another rate) trained another mechanism than the one charged (a DP-path review, session 43).
    Now dp_mod hands the trainer the mechanism it charged (``charged_dp``), and nothing of it outlives the
    message."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_client.privacy_mod import MECHANISM, charged_dp, dp_mod
    from mllm_dr.privacy import PrivacyLedger

    charged = _policy(enabled=True, unit="patient", noise_multiplier=1.0, sample_rate=0.5, step="item",
                      epsilon_budget=50.0)
    ws = _workspace(tmp_path, synth_site, charged)
    app, seen = ClientApp(), []

    @app.train(mods=[dp_mod])
    def train(msg, context):
        edited = _policy(enabled=True, unit="patient", noise_multiplier=1.0, sample_rate=0.25, step="patient",
                         epsilon_budget=50.0)
        (ws.root / "policy.json").write_text(edited.model_dump_json())    # edited while the model loads
        seen.append(charged_dp(context))
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict({"lq.w": torch.full((5,), 2.0)}),
                                   "metrics": MetricRecord({"num-examples": 40, "lora-scaling": 2.0})}), reply_to=msg)

    ctx = _context(ws)
    assert not app(_message("r", 1), ctx).has_error()
    dp, steps = seen[0]
    assert (dp.sample_rate, len(dp.items or ())) == (0.5, 8)                # the charged policy's, not the edit's
    assert steps == dp.steps_per_epoch and PrivacyLedger.of(ws.root, "patient").own()[0] == (1.0, 0.5, steps)
    ctx.state.pop("dp-charge", None)                # (the egress guard would clear it; this app has no guard)
    (ws.root / "policy.json").write_text(load_policy().model_dump_json())   # DP off now: nothing charged is handed
    assert not app(_message("plain", 1), ctx).has_error()
    assert seen[1] == (None, None) and MECHANISM not in ctx.state


def test_a_deleted_or_rolled_back_ledger_is_refused_not_a_fresh_budget(tmp_path, flower_task, synth_site):
    """Session 44 (open since session 41): deleting ``privacy.json`` (or putting back an older copy) gave the
    site its whole budget again. The signed audit log is the ledger's anchor: a ledger holding fewer charged
    rounds than the log's dp_round less dp_refund entries (or fewer unprotected rounds than it records) is
    refused, named, on site (the round's error, its audit entry, `policy show`); refunds and a restored copy
    stay usable."""
    from fl_client.egress import egress_guard
    from fl_client.privacy_mod import dp_mod
    from mllm_dr import audit
    from mllm_dr.errors import InputError
    from mllm_dr.privacy import PrivacyLedger

    ws = _workspace(tmp_path, synth_site, SITE_DP)
    app, ctx = _stub_app([egress_guard, dp_mod]), _context(ws)
    blocked = _stub_app([egress_guard, dp_mod], {"secret.w": torch.ones(5)})
    ledger, path = PrivacyLedger.of(ws.root, "site"), ws.root / "privacy.json"

    def refused(round_: int, why: str) -> None:
        reply = app(_message("dp", round_), ctx)
        assert reply.has_error(), "a DP round trained on a ledger that lost rounds"
        last = audit.read(ws.audit_path)[-1]
        assert last["event"] == "handler_error" and why in json.dumps(last), last

    assert not app(_message("dp", 1), ctx).has_error()
    assert blocked(_message("dp", 2, tensor="secret.w"), ctx).has_error()      # refunded: no lockout after it
    after_one = path.read_bytes()
    assert not app(_message("dp", 3), ctx).has_error()
    after_two, two = path.read_bytes(), ledger.spent(1e-5)
    assert len(ledger.own()) == 2
    # rolled back to the copy after one round: refused, nothing trained or charged
    path.write_bytes(after_one)
    with pytest.raises(InputError, match="privacy ledger was rolled back: the audit log records 2 DP round"):
        ledger.spent(1e-5)
    refused(4, "rolled back")
    assert path.read_bytes() == after_one
    # deleted: the same, and `policy show` says so
    path.unlink()
    refused(4, "privacy ledger is missing")
    assert not path.exists()
    assert "privacy ledger is missing" in json.dumps(_shown(ws))
    # restored from a backup holding every round: DP rounds go on from the epsilon they had
    path.write_bytes(after_two)
    assert ledger.spent(1e-5) == pytest.approx(two)
    assert not app(_message("dp", 4), ctx).has_error()
    assert len(ledger.own()) == 3
    # each unit counts its own entries: the site-level history does not lock a fresh patient ledger (which
    # counts those rounds as inherited ones, at half their noise multiplier)
    patient = PrivacyLedger.of(ws.root, "patient").report(1e-5)
    assert "error" not in patient and patient["rounds"] == 0 and patient["site_level_rounds_counted"] == 3


def test_a_round_whose_dp_sgd_steps_differ_from_the_charged_ones_sends_nothing_and_is_refunded(
        site_ws, flower_task, tmp_path, monkeypatch):
    """Session 43 made the trainer run the mechanism dp_mod charged (``charged_dp``) and the train handler
    refuse a round whose DP-SGD took another number of steps than the ledger was charged for; nothing tested
    that guard (session 43's note). Here the charge is made one step short (fault injection at the charge):
    the round answers an error with no tensors, the charge is taken back, and the audit log names the
    mismatch. The same round charged right trains and is charged once."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    import fl_client.privacy_mod as privacy_mod
    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr import audit
    from mllm_dr.base_model import base_info
    from mllm_dr.config import ModelConfig
    from mllm_dr.federated import RunSpec, initial_state, site_dims
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.protocol import TrainInstruction
    from mllm_dr.signing import load_private, sign_state

    pol = json.loads((ROOT / "policies" / "demo-dp-patient.json").read_text()) | {"min_participants": 2}
    pol["dp"] |= {"epsilon_budget": 1000.0, "sample_rate": 0.5}
    (site_ws.root / "policy.json").write_text(json.dumps(pol))
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    spec = RunSpec("steps", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws),
                   ModelConfig(feature_norm="participant"))      # what patient-level DP requires
    state, ctx = initial_state(spec), spec.context(0, 0)

    def train():
        t = TrainInstruction(context=json.dumps(ctx), signature=sign_state(load_private(tmp_path / "center.key"),
                                                                          state, ctx),
                             policy=json.dumps(pol), round=1, stage=2, local_epochs=1, batch_size=4,
                             lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3)
        return app(Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(t.to_record())}),
                           dst_node_id=7, message_type="train"), context)

    ledger = PrivacyLedger.of(site_ws.root, "patient")
    charge = privacy_mod._charge_mechanism
    monkeypatch.setattr(privacy_mod, "_charge_mechanism", lambda c, dp, steps: charge(c, dp, steps - 1))
    reply = train()
    assert reply.has_error() and not reply.has_content(), "a round trained other steps than charged was sent"
    assert ledger.own() == [], "the charge of a round that sent nothing was kept"
    errors = [e for e in audit.read(site_ws.audit_path) if e["event"] == "handler_error"]
    assert errors and "were charged to the privacy ledger" in json.dumps(errors[-1]), errors
    monkeypatch.setattr(privacy_mod, "_charge_mechanism", charge)
    reply = train()
    assert not reply.has_error(), reply.error
    assert len(ledger.own()) == 1 and ledger.own()[0][2] > 0
