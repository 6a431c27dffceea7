"""An audited reset of a privacy ledger (session 47, the gap of issue 13): a ledger voided by a round released
without DP, or with its budget spent, refused DP-budgeted training for good, and deleting or rolling it back is
(rightly) refused, the ledger being anchored to the signed audit log. `mllmdr-site policy reset-ledger` starts a
new privacy period (the DPO's decision): the ledger is archived beside itself, the reset signed into the audit
log (``dp_ledger_reset``) before an empty ledger replaces it, and the anchor counts each unit's entries after its
last reset only. Real ledgers, a real signed audit log, the real DP mod around a stand-in trainer."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest

from conftest import run_cli
from test_dp_ledger_s43 import ROOT, SITE_DP, _context, _message, _policy, _shown, _stub_app, _workspace
from mllm_dr.errors import InputError
from mllm_dr.privacy import PrivacyLedger, reset_ledger


def _dp_app(ws):
    from fl_client.egress import egress_guard
    from fl_client.privacy_mod import dp_mod

    return _stub_app([egress_guard, dp_mod]), _context(ws)


def _reset(ws, unit: str, reason: str = "DPO decision 47/1: new cohort, never in training", *more: str,
           check: bool = True):
    return run_cli("mllmdr-site", "policy", "reset-ledger", "--workspace", ws.root, "--unit", unit, "--reason", reason,
                   *more, check=check)


def _resets(ws, unit: str | None = None) -> list[dict]:
    from mllm_dr import audit

    return [e for e in audit.read(ws.audit_path) if e["event"] == "dp_ledger_reset" and unit in (None, e["unit"])]


def _files(ws) -> dict[str, bytes]:
    """The workspace's ledgers, their archives and its audit log, as bytes: what a refused reset must not change."""
    return {p.name: p.read_bytes() for p in [*ws.root.glob("privacy*.json"), ws.audit_path] if p.is_file()}


def test_a_void_ledger_refuses_dp_training_until_an_audited_reset_then_epsilon_starts_at_0(
        tmp_path, flower_task, synth_site):
    """Before: a round released without DP after DP rounds made epsilon infinite and DP training was refused for
    good (no command reset a ledger). Now a reset archives the ledger byte for byte, signs a dp_ledger_reset entry
    naming it (and the void), the log still verifies, DP training is accepted again from epsilon 0, and
    `policy show --json` and `status` say since when the epsilon counts."""
    from mllm_dr.privacy import PrivacyLedger, epsilon_after
    from mllm_dr.protocol import BUDGET_SPENT

    ws = _workspace(tmp_path, synth_site)                   # the site allows runs without DP
    app, ctx = _dp_app(ws)
    dp_run = SITE_DP.model_dump_json()
    assert not app(_message("dp", 1, dp_run), ctx).has_error()
    assert not app(_message("plain", 1), ctx).has_error()    # released without DP: the guarantee is void
    ledger = PrivacyLedger.of(ws.root, "site")
    assert ledger.spent(1e-5) == math.inf
    refused = app(_message("dp", 2, dp_run), ctx)
    assert refused.has_error() and refused.error.code == BUDGET_SPENT and "reset-ledger --unit both" in \
        refused.error.reason
    old = ledger.path.read_bytes()

    done = json.loads(_reset(ws, "both", "DPO decision 47/1: new cohort", "--yes", "--json").stdout)
    assert [one["unit"] for one in done["resets"]] == ["patient", "site"]     # a site ledger resets with the patient's
    done = done["resets"][-1]
    archive = ws.root / os.path.basename(done["archive"])
    assert archive.name.startswith("privacy.") and archive.name.endswith(".retired.json")
    assert archive.read_bytes() == old, "the archive is not the old ledger"
    entry = _resets(ws)[-1]
    at_reset = (entry["unit"], entry["void"], entry["epsilon_at_reset"], entry["rounds_at_reset"])
    assert at_reset == ("site", True, None, 1)
    assert entry["reason"] == "DPO decision 47/1: new cohort" and entry["archive"] == archive.name
    assert entry["archive_sha256"] == hashlib.sha256(old).hexdigest() == done["archive_sha256"]
    assert "guarantee void since" in entry["void_since"]
    verified = run_cli("mllmdr-site", "audit", "verify", "--workspace", ws.root)
    assert "intact" in verified.stdout, verified.stdout
    assert ledger.spent(1e-5) == 0.0 and ledger.own() == [] and ledger.unprotected() == []

    reply = app(_message("dp", 3, dp_run), ctx)               # DP training accepted again, from epsilon 0
    assert not reply.has_error(), reply.error.reason
    one = epsilon_after([(1.0, 1.0, 1)], 1e-5)
    assert reply.content["metrics"]["epsilon-total"] == pytest.approx(one) == pytest.approx(ledger.spent(1e-5))

    shown = _shown(ws)
    site = {led["unit"]: led for led in shown["ledgers"]}["site"]
    assert site["reset"]["reason"] == "DPO decision 47/1: new cohort" and site["reset"]["archive"] == archive.name
    assert site["reset"]["time"] == entry["time"] and "unfinished" not in site["reset"]
    assert shown["epsilon_spent"] == pytest.approx(one) and site["rounds"] == 1
    text = " ".join(run_cli("mllmdr-site", "status", "--workspace", ws.root).stdout.split())
    assert f"counted since the ledger's reset at {entry['time']}" in text, text


def test_a_spent_budget_resets_and_the_new_ledger_is_still_anchored_to_the_log(tmp_path, flower_task, synth_site):
    """The anchor after a reset counts the unit's entries after it: deleting or rolling back the new ledger after
    a post-reset charge is refused, as before any reset; a missing ledger is not reset (restored first: the
    archive holds its history); a reset line that is not signed by the log's key resets nothing."""
    from mllm_dr.errors import InputError
    from mllm_dr.privacy import PrivacyLedger, reset_ledger
    from mllm_dr.protocol import BUDGET_SPENT

    ws = _workspace(tmp_path, synth_site, _policy(enabled=True, unit="site", noise_multiplier=1.0, clip_norm=1.0,
                                                  epsilon_budget=6.0))      # one round: 4.73, two: 7.08
    app, ctx = _dp_app(ws)
    ledger, path = PrivacyLedger.of(ws.root, "site"), ws.root / "privacy.json"
    assert not app(_message("dp", 1), ctx).has_error()
    spent = app(_message("dp", 2), ctx)
    assert spent.has_error() and spent.error.code == BUDGET_SPENT
    # a missing ledger is not reset: restore it first
    before = path.read_bytes()
    path.unlink()
    with pytest.raises(InputError, match="privacy ledger is missing"):
        reset_ledger(ws.root, "both", "new cohort", 1e-5)
    assert not _resets(ws) and not list(ws.root.glob("*.retired.json"))
    path.write_bytes(before)

    reset_ledger(ws.root, "both", "DPO decision 47/2: new cohort", 1e-5)
    fresh = path.read_bytes()
    assert not app(_message("dp", 2), ctx).has_error()        # the budget holds one round again
    assert app(_message("dp", 3), ctx).error.code == BUDGET_SPENT
    charged = path.read_bytes()
    path.write_bytes(fresh)                                    # rolled back to the ledger the reset started
    with pytest.raises(InputError, match="privacy ledger was rolled back: the audit log records 1 DP round"):
        ledger.spent(1e-5)
    assert app(_message("dp", 4), ctx).has_error() and json.loads(path.read_bytes()) == json.loads(fresh)
    path.unlink()                                              # deleted
    with pytest.raises(InputError, match="privacy ledger is missing"):
        ledger.spent(1e-5)
    assert "privacy ledger is missing" in json.dumps(_shown(ws))
    path.write_bytes(charged)                                  # restored: one round since the reset
    assert ledger.spent(1e-5) == pytest.approx(4.7285, abs=1e-3)
    # a reset line typed into the log gives nothing back: the log's own key and the genuine reset's signature,
    # copied onto a new line (a forged key field alone never reached the signature check: the second read's F9)
    from mllm_dr import audit

    resets = [e for e in audit.read(ws.audit_path) if e["event"] == "dp_ledger_reset"]
    genuine, patient_reset = resets[-1], resets[-2]
    assert (genuine["unit"], patient_reset["unit"]) == ("site", "patient")
    log = ws.audit_path.read_bytes()
    for forged in (genuine | {"seq": 999, "reason": "typed in"},          # a copied signature
                   genuine | {"seq": 999, "sig": "00" * 64},              # a wrong one
                   patient_reset | {"unit": "site", "seq": 999}):         # a genuine patient reset, edited to site
        assert forged["key"] == genuine["key"]                            # the log's real key field
        ws.audit_path.write_bytes(log + (json.dumps(forged) + "\n").encode())
        path.write_bytes(fresh)
        # refused, and the refusal names the reset line that does not verify (F6: a replaced key says so too)
        with pytest.raises(InputError, match="was rolled back.*the reset at seq 999 is not signed by the audit key "
                                             "keys/audit.pub"):
            ledger.spent(1e-5)
        path.write_bytes(charged)
        assert ledger.spent(1e-5) == pytest.approx(4.7285, abs=1e-3)


def test_a_reset_of_one_unit_leaves_the_other_ledger_and_its_anchor_alone(tmp_path, flower_task, synth_site):
    """Both units charged (a site-level round, then a run imposing patient-level DP); resetting the patient ledger
    leaves privacy.json as it was, byte for byte, and still anchored (deleted, it is refused); the patient ledger
    starts empty and counts the site-level rounds it always counted (inherited)."""
    from mllm_dr.errors import InputError
    from mllm_dr.privacy import PrivacyLedger

    ws = _workspace(tmp_path, synth_site)
    app, ctx = _dp_app(ws)
    patient_run = json.loads((ROOT / "policies" / "demo-dp-patient.json").read_text())
    patient_run["dp"]["epsilon_budget"] = 100.0
    assert not app(_message("a", 1, SITE_DP.model_dump_json()), ctx).has_error()
    assert not app(_message("b", 1, json.dumps(patient_run)), ctx).has_error()
    site, patient = PrivacyLedger.of(ws.root, "site"), PrivacyLedger.of(ws.root, "patient")
    site_bytes, site_report = site.path.read_bytes(), site.report(1e-5)
    assert len(patient.own()) == 1

    _reset(ws, "patient", "DPO decision 47/3", "--yes")
    assert site.path.read_bytes() == site_bytes and site.report(1e-5) == site_report
    assert [e["unit"] for e in _resets(ws)] == ["patient"]
    rep = patient.report(1e-5)
    assert (rep["rounds"], rep["site_level_rounds_counted"]) == (0, 1) and rep["reset"]["reason"] == "DPO decision 47/3"
    assert "reset" not in site_report
    site.path.unlink()                                       # the site ledger's anchor is its own, unreset
    with pytest.raises(InputError, match="privacy ledger is missing: the audit log records 1 DP round"):
        site.spent(1e-5)
    site.path.write_bytes(site_bytes)
    assert not app(_message("b", 2, json.dumps(patient_run)), ctx).has_error()
    assert len(patient.own()) == 1 and len(site.own()) == 1


def test_the_cli_refuses_a_reset_without_yes_or_reason_or_while_the_site_trains_and_changes_nothing(
        tmp_path, flower_task, synth_site):
    """Without --yes, with an empty or no reason, while the site's SuperNode runs or another command holds the
    workspace: one line saying why (and, without --yes, what the reset does), exit 2 (the kit's refusals), and
    not a byte of the ledgers, archives or audit log changed."""
    from fl_client.supernode import pidfile
    from mllm_dr.privacy import PrivacyLedger

    ws = _workspace(tmp_path, synth_site)
    PrivacyLedger.of(ws.root, "patient").record("r", 1, 1.0, 1.0, 1e-5, 0.5, 4)
    PrivacyLedger.of(ws.root, "patient").mark_unprotected("plain", 1, 1e-5)
    before = _files(ws)

    def refused(*args: str, why: str) -> str:
        proc = run_cli("mllmdr-site", "policy", "reset-ledger", "--workspace", ws.root, "--unit", "patient", *args,
                       check=False)
        assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and why in lines[0], proc.stderr
        assert _files(ws) == before, "a refused reset changed something"
        return lines[0]

    line = refused("--reason", "DPO decision 47/4", why="add --yes to confirm")
    assert "archives privacy-patient.json" in line and "this ledger's own rounds count from 0" in line
    refused("--reason", "  ", "--yes", why="a reset needs a reason")
    refused("--yes", why="a reset needs a reason")
    pid = pidfile(ws)
    pid.parent.mkdir(parents=True, exist_ok=True)
    pid.write_text(f"{os.getpid()}\n")                       # a live process: this test's
    refused("--reason", "DPO decision 47/4", "--yes", why="SuperNode is running")
    pid.unlink()
    with ws.lock("train"):                                    # a local training holds the workspace
        refused("--reason", "DPO decision 47/4", "--yes", why="in use by")
    assert PrivacyLedger.of(ws.root, "patient").spent(1e-5) == math.inf
    _reset(ws, "patient", "DPO decision 47/4", "--yes")        # and once the site is quiet, it resets
    assert PrivacyLedger.of(ws.root, "patient").spent(1e-5) == 0.0
    from cli.site_policy import policy_reset_ledger

    assert "Example: mllmdr-site policy reset-ledger --workspace" in policy_reset_ledger.__doc__


def test_a_rehearsals_virtual_site_is_not_reset_while_a_simulate_holds_its_folder(tmp_path):
    """A virtual site of a rehearsal (``<folder>/sites/<name>``) trains under `mllmdr-center simulate`, which holds
    the folder's lock: its ledgers are not reset meanwhile."""
    from mllm_dr.atomic import held_or_busy
    from mllm_dr.errors import InputError
    from mllm_dr.privacy import PrivacyLedger, reset_ledger
    from mllm_dr.rehearsal import LOCK_FILE, REHEARSAL_FILE
    from mllm_dr.workspace import Workspace

    folder = tmp_path / "rehearsal"
    ws = Workspace.init(folder / "sites" / "site-001", "site-001")
    (folder / REHEARSAL_FILE).write_text("{}")
    PrivacyLedger.of(ws.root, "site").record("r", 1, 1.0, 1.0, 1e-5)
    with held_or_busy(folder / LOCK_FILE):
        with pytest.raises(InputError, match="simulate'.* is training this rehearsal's virtual sites"):
            reset_ledger(ws.root, "both", "DPO decision 47/6", 1e-5)
    assert len(PrivacyLedger.of(ws.root, "site").own()) == 1
    reset_ledger(ws.root, "both", "DPO decision 47/6", 1e-5)
    assert PrivacyLedger.of(ws.root, "site").own() == []


def test_an_interrupted_reset_leaves_the_old_ledger_in_force_never_a_fresh_budget(
        tmp_path, flower_task, synth_site, monkeypatch):
    """The reset is audited before the empty ledger replaces the old one. A crash between the two (fault
    injected at the write of the empty ledger) leaves the old ledger, which the anchor accepts (it holds more
    than the log since the reset) with its old epsilon, and `policy show` says the reset was interrupted; run
    again, it completes."""
    import mllm_dr.privacy as privacy

    ws = _workspace(tmp_path, synth_site, SITE_DP)
    app, ctx = _dp_app(ws)
    assert not app(_message("dp", 1), ctx).has_error()
    ledger = privacy.PrivacyLedger.of(ws.root, "site")
    old, eps = ledger.path.read_bytes(), ledger.spent(1e-5)
    write = privacy.atomic_write_text

    def crash(path, text):
        if path == ledger.path:
            raise OSError("simulated crash before the empty ledger was written")
        write(path, text)

    monkeypatch.setattr(privacy, "atomic_write_text", crash)
    with pytest.raises(OSError, match="simulated crash"):
        privacy.reset_ledger(ws.root, "both", "DPO decision 47/5", 1e-5)
    monkeypatch.setattr(privacy, "atomic_write_text", write)
    assert len(_resets(ws, "site")) == 1 and ledger.path.read_bytes() == old      # audited, the old ledger in force
    assert eps > 0 and ledger.spent(1e-5) == pytest.approx(eps)
    assert not app(_message("dp", 2), ctx).has_error()         # charged on the old ledger: over-counted
    assert len(ledger.own()) == 2
    shown = {led["unit"]: led for led in _shown(ws)["ledgers"]}["site"]
    assert "interrupted" in shown["reset"]["unfinished"] and shown["epsilon"] > eps
    privacy.reset_ledger(ws.root, "both", "DPO decision 47/5, again", 1e-5)
    assert len(_resets(ws, "site")) == 2 and len(list(ws.root.glob("privacy.*.retired.json"))) == 2
    assert ledger.spent(1e-5) == 0.0 and "unfinished" not in ledger.report(1e-5)["reset"]


def test_a_charge_reads_the_audit_log_once(tmp_path, flower_task, synth_site, monkeypatch):
    """A charge anchors every ledger it reads (its own; both units' for a void; the site's for a patient's
    inherited rounds) to the audit log, and each read read the whole log again (three reads per patient-level
    charge). Now one read per ledger operation; what it counts is unchanged."""
    from mllm_dr import audit
    from mllm_dr.errors import InputError
    from mllm_dr.privacy import PrivacyLedger

    ws = _workspace(tmp_path, synth_site)
    PrivacyLedger.of(ws.root, "site").record("a", 1, 1.0, 1.0, 1e-5)
    patient = PrivacyLedger.of(ws.root, "patient")
    patient.record("b", 1, 1.0, 1.0, 1e-5, 0.5, 4)
    audit.append(ws.audit_path, "dp_round", unit="patient", run="b", round=1)
    reads = []
    entries = audit.event_entries
    monkeypatch.setattr(audit, "event_entries", lambda *a, **k: reads.append(a) or entries(*a, **k))
    patient.spend("b", 2, 1.0, 1.0, 1e-5, 100.0, 0.5, 4)
    assert len(reads) == 1, f"{len(reads)} reads of the audit log for one charge"
    reads.clear()
    patient.report(1e-5)
    assert len(reads) == 1
    audit.append(ws.audit_path, "dp_round", unit="patient", run="b", round=2)
    audit.append(ws.audit_path, "dp_round", unit="patient", run="b", round=3)    # a round the ledger lost
    with pytest.raises(InputError, match="rolled back"):
        patient.spend("b", 4, 1.0, 1.0, 1e-5, 100.0, 0.5, 4)


def _site_rounds(ws, ledger, rounds) -> None:
    from mllm_dr import audit

    for r in rounds:
        ledger.record("r", r, 1.0, 1.0, 1e-5)
        audit.append(ws.audit_path, "dp_round", unit=ledger.unit, run="r", round=r)


def test_a_site_reset_alone_cannot_lower_the_per_patient_epsilon(tmp_path):
    """The per-patient ledger counts the site-level ledger's rounds: a site reset alone took them out of its
    epsilon (23.19 -> 7.41 in the second read of session 47) with no patient-level reset. Now it is refused while
    a per-patient ledger exists; `--unit both` resets both, each audited."""
    from mllm_dr import audit
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site-a")
    site, patient = PrivacyLedger.of(ws.root, "site"), PrivacyLedger.of(ws.root, "patient")
    _site_rounds(ws, site, (1, 2, 3))
    patient.record("p", 1, 1.0, 1.0, 1e-5, 0.5, 4)
    audit.append(ws.audit_path, "dp_round", unit="patient", run="p", round=1)
    before = patient.spent(1e-5)
    with pytest.raises(InputError, match="--unit both"):
        reset_ledger(ws.root, "site", "site-level period", 1e-5)
    assert patient.spent(1e-5) == pytest.approx(before) and len(site.own()) == 3
    done = reset_ledger(ws.root, "both", "new cohort for both", 1e-5)
    assert [d["unit"] for d in done["resets"]] == ["patient", "site"]
    assert [e["unit"] for e in audit.read(ws.audit_path) if e["event"] == "dp_ledger_reset"] == ["patient", "site"]
    assert patient.spent(1e-5) == 0.0 and site.spent(1e-5) == 0.0


def test_a_ledger_restored_from_before_a_reset_is_refused_not_an_interrupted_reset(tmp_path):
    """A backup from before a completed reset was taken for an interrupted reset, and the advised rerun erased the
    new period's rounds (the second read of session 47): it is refused as rolled back."""
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site-a")
    site = PrivacyLedger.of(ws.root, "site")
    _site_rounds(ws, site, (1, 2))
    backup = site.path.read_bytes()
    _site_rounds(ws, site, (3,))
    archived = site.path.read_bytes()
    reset_ledger(ws.root, "both", "DPO decision: new period", 1e-5)
    _site_rounds(ws, site, (4, 5))
    for restored in (backup, archived):      # older than the archive, or the archive itself: rounds 4-5 missing
        site.path.write_bytes(restored)
        with pytest.raises(InputError, match="rolled back to before its reset"):
            site.spent(1e-5)
        assert "error" in site.report(1e-5)


def test_a_site_ledger_holding_rounds_resets_only_with_the_patient_one_even_before_any_patient_round(tmp_path):
    """No per-patient ledger yet, but a per-patient epsilon (a policy switched to dp.unit = patient) counts the
    site-level rounds: a site reset alone would lower it with no patient-level reset (F2 of the second read). It is
    refused, naming --unit both; --unit both writes one audit entry per unit (the per-patient ledger started empty
    and reset, so its report says since when it counts), and the voided site's hint names --unit both."""
    from mllm_dr import audit
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site-a")
    site, patient = PrivacyLedger.of(ws.root, "site"), PrivacyLedger.of(ws.root, "patient")
    _site_rounds(ws, site, (1, 2))
    inherited = patient.spent(1e-5)
    assert inherited > 0 and not patient.path.exists()
    with pytest.raises(InputError, match=r"lower the per-patient epsilon .*reset both \(--unit both\)"):
        reset_ledger(ws.root, "site", "site-level period", 1e-5)
    assert patient.spent(1e-5) == pytest.approx(inherited) and len(site.own()) == 2
    assert not list(ws.root.glob("*.retired.json"))
    done = reset_ledger(ws.root, "both", "new cohort", 1e-5)
    assert [d["unit"] for d in done["resets"]] == ["patient", "site"]
    assert [e["unit"] for e in audit.read(ws.audit_path) if e["event"] == "dp_ledger_reset"] == ["patient", "site"]
    assert done["resets"][0]["epsilon_at_reset"] == pytest.approx(inherited)
    assert done["resets"][0]["now"]["epsilon"] == 0.0 and patient.report(1e-5)["reset"]["reason"] == "new cohort"


def test_a_void_in_both_ledgers_names_both_and_a_replaced_audit_key_is_named(tmp_path):
    """An unprotected round marks every charged ledger: the hint named the site ledger only, then, after that
    reset, the patient one (F10); it names both and one command. A lost audit key (a new pair made silently)
    fails every earlier reset entry: the refusal blamed the ledger only (F6); it names the reset and the key."""
    from mllm_dr import audit
    from mllm_dr.privacy import BudgetSpent
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site-a")
    site, patient = PrivacyLedger.of(ws.root, "site"), PrivacyLedger.of(ws.root, "patient")
    site.record("a", 1, 1.0, 1.0, 1e-5)
    patient.record("b", 1, 1.0, 1.0, 1e-5, 0.5, 4)
    for led in (site, patient):
        led.mark_unprotected("plain", 1, 1e-5)
    with pytest.raises(BudgetSpent, match="recorded in the site-level and patient-level ledgers: only a new privacy "
                                          "period, 'mllmdr-site policy reset-ledger --unit both'"):
        patient.check(1.0, 1e-5, 100.0, 0.5, 4)
    reset_ledger(ws.root, "both", "new cohort", 1e-5)
    assert patient.check(1.0, 1e-5, 100.0, 0.5, 4) > 0
    _site_rounds(ws, site, (2,))
    key = audit.key_path(ws.audit_path)
    key.unlink()
    key.with_suffix(".pub").unlink()
    audit.append(ws.audit_path, "note")                    # a new key pair, made silently
    seqs = {e["seq"] for e in audit.read(ws.audit_path) if e["event"] == "dp_ledger_reset"}
    for call in (lambda: site.spent(1e-5), lambda: reset_ledger(ws.root, "both", "again", 1e-5)):
        with pytest.raises(InputError, match=f"the reset at seq ({'|'.join(map(str, seqs))}) is not signed by the audit key keys/audit.pub "
                                             r"\(fingerprint [0-9a-f]+\): was the audit key replaced\? restore "
                                             r"keys/audit.\* from a backup"):
            call()


def test_the_supernode_check_is_made_under_the_ledgers_locks(tmp_path, monkeypatch):
    """A SuperNode started between the check and the ledgers' locks could charge a round audited after the reset
    (F7): the check is now made with the locks held, so a later charge waits for the reset."""
    import mllm_dr.privacy as privacy
    import mllm_dr.processes as processes
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site-a")
    PrivacyLedger.of(ws.root, "patient").record("b", 1, 1.0, 1.0, 1e-5, 0.5, 4)
    seen = []
    monkeypatch.setattr(processes, "running_from_pidfile",
                        lambda path: seen.append(str(ws.root.resolve()) in privacy._LOCKS_HELD.get()) or None)
    reset_ledger(ws.root, "patient", "new cohort", 1e-5)
    assert seen == [True]
