"""Session 46, a newcomer's read of the README and scripts: demo.sh's output folder, up-front numbers, step 5's
missing test participant and its summary; `audit head` over a broken log; pydantic's layout in one-line errors;
setup.sh's steps; `data synth`'s bar. The bash scripts are run from copies holding no kit, into their early
refusals (a script that went past its checks fails at once, on the missing .venv), never end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli

DEMO = ROOT / "scripts" / "demo.sh"


def _demo(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """demo.sh from a copy under tmp_path (no .venv there), with ``env`` over a clean environment."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(DEMO, tmp_path / "scripts" / "demo.sh")
    base = {k: v for k, v in os.environ.items() if k not in ("OUT", "DEMO_OUT", "DP", "SECAGG", "PARTICIPANTS",
                                                                "STAGE1_ROUNDS", "STAGE2_ROUNDS", "LOCAL_EPOCHS",
                                                                "BATCH_SIZE", "MAX_CONTEXT_TOKENS")}
    return subprocess.run(["bash", str(tmp_path / "scripts" / "demo.sh")], capture_output=True, text=True,
                          timeout=30, env={**base, "MLLMDR_CACHE": str(tmp_path / "cache"), **env}, cwd=tmp_path)


def _one_line_refusal(proc, *words):
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("demo.sh: "), proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- 1. the demo's output folder
def test_demo_never_deletes_a_folder_it_did_not_make(tmp_path):
    """DEMO_OUT naming a non-empty folder without the demo's marker: one line, exit 2, the folder as it was."""
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    proc = _demo(tmp_path, {"DEMO_OUT": str(mine)})
    _one_line_refusal(proc, f"DEMO_OUT={mine}", ".mllmdr-demo-output")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_the_callers_OUT_is_not_the_demos_folder_and_a_demo_folder_is_rewritten(tmp_path):
    """OUT, set by the caller's shell for something else, is left alone; the demo writes DEMO_OUT (default
    demo-out), marks it, and a later run may delete that folder (its marker) and start again."""
    theirs = tmp_path / "out"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    first = _demo(tmp_path, {"OUT": str(theirs)})
    assert first.returncode != 0 and "OUT=" in first.stderr and "is not read" in first.stderr   # no kit here
    assert (theirs / "keep.txt").read_text() == "x"
    made = tmp_path / "demo-out"
    assert (made / ".mllmdr-demo-output").is_file()
    (made / "synth").mkdir()                                         # what a run leaves
    second = _demo(tmp_path, {})
    assert second.returncode != 2 and "not deleting" not in second.stderr, second.stderr
    assert not (made / "synth").exists() and (made / ".mllmdr-demo-output").is_file()


def test_an_earlier_demos_output_without_the_marker_is_rewritten_but_not_with_anything_else_in_it(tmp_path):
    """Demos before session 46 wrote no marker: their folder (only what a demo writes) is still the demo's, so a
    plain `bash scripts/demo.sh` after an upgrade is not refused (a second read, session 46); one extra file and
    it is refused."""
    made = tmp_path / "demo-out"
    for name in ("synth", "center", "ws-site1", "ws-site2", "ws-site3"):
        (made / name).mkdir(parents=True)
    (made / "site1.request.json").write_text("{}")
    (made / "notes.txt").write_text("mine")
    _one_line_refusal(_demo(tmp_path, {}), "not deleting")
    assert (made / "notes.txt").read_text() == "mine"
    (made / "notes.txt").unlink()
    proc = _demo(tmp_path, {})
    assert proc.returncode != 2 and "not deleting" not in proc.stderr, proc.stderr
    assert not (made / "center").exists() and (made / ".mllmdr-demo-output").is_file()


def test_a_file_or_link_as_DEMO_OUT_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data").write_text("x")
    (tmp_path / "link").symlink_to(target)
    _one_line_refusal(_demo(tmp_path, {"DEMO_OUT": str(tmp_path / "link")}), "not a folder")
    (tmp_path / "afile").write_text("x")
    _one_line_refusal(_demo(tmp_path, {"DEMO_OUT": str(tmp_path / "afile")}), "not a folder")
    assert (target / "data").exists() and (tmp_path / "afile").read_text() == "x"


# ----------------------------------------------------------------------------- 2. the numbers, up front
@pytest.mark.parametrize("knob,value", [("PARTICIPANTS", "8"), ("PARTICIPANTS", "6"), ("PARTICIPANTS", "many"),
                                        ("PARTICIPANTS", "024"), ("STAGE1_ROUNDS", "-1"), ("STAGE2_ROUNDS", "2 "),
                                        ("LOCAL_EPOCHS", "0"), ("BATCH_SIZE", "1.5"), ("BATCH_SIZE", "9999999"),
                                        ("MAX_CONTEXT_TOKENS", "32")])
def test_demo_refuses_a_bad_number_before_any_work(tmp_path, knob, value):
    out = tmp_path / "demo-out"
    proc = _demo(tmp_path, {knob: value, "DEMO_OUT": str(out)})
    _one_line_refusal(proc, f"{knob}={value}: must be a whole number")
    assert not out.exists()


def test_demo_refuses_zero_rounds_in_all(tmp_path):
    _one_line_refusal(_demo(tmp_path, {"STAGE1_ROUNDS": "0", "STAGE2_ROUNDS": "0"}), "at least one round")


def test_the_demos_participant_floor_is_where_every_site_gets_a_test_participant():
    """MIN_PARTICIPANTS in demo.sh is the corpus writer's rule (mllm_dr/synth.py: 3 sites, np.array_split,
    _splits): one fewer leaves a site without a test participant, the floor gives every site one."""
    from mllm_dr.synth import _splits

    floor = int(re.search(r"^MIN_PARTICIPANTS=(\d+)$", DEMO.read_text(), re.M).group(1))

    def every_site_has_test(n):
        return all("test" in _splits(len(site)) for site in np.array_split(np.arange(n), 3))

    assert every_site_has_test(floor) and not every_site_has_test(floor - 1)
    assert all(every_site_has_test(n) for n in range(floor, 60))


def _snippet(pattern: str) -> str:
    m = re.search(pattern, DEMO.read_text(), re.S)
    assert m, f"demo.sh no longer has {pattern!r}"
    return m.group(1)


def test_step5_names_a_site_without_a_test_participant_in_one_line(tmp_path):
    code = _snippet(r"ID=\$\(\.venv/bin/python -c '(.*?)' ")
    check = tmp_path / "site3.check.json"
    check.write_text(json.dumps({"participants": [{"id": "300", "split": "train", "total": 3},
                                                  {"id": "301", "split": "dev", "total": 5}]}))
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code, str(check), "site3", "8", "9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip() == ("demo.sh: site3 has no test participant to score (PARTICIPANTS=8; 9 or more "
                                   "give each site one)")
    check.write_text(json.dumps({"participants": [{"id": "300", "split": "train", "total": 3},
                                                  {"id": "600", "split": "test", "total": 5}]}))
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code, str(check), "site3", "8", "9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "600\n"


# ----------------------------------------------------------------------------- 3. the summary's n and baseline
def test_summary_states_n_point_estimate_and_the_site_mean_baseline(tmp_path):
    """On a real synthetic corpus (the demo's data check JSON per site): each test participant predicted as their
    site's mean training total; its CCC is printed beside the model's, with n and 'point estimate'."""
    code = _snippet(r"--json \| \.venv/bin/python -c '\n(.*?)' \\\n")
    run_cli("mllmdr-site", "data", "synth", tmp_path / "synth", "--participants", "12", "--sites", "3")
    true, pred = [], []
    for s in ("site1", "site2", "site3"):
        report = run_cli("mllmdr-site", "data", "check", tmp_path / "synth" / s, "--json").stdout
        (tmp_path / f"{s}.check.json").write_text(report)
        people = json.loads(report)["participants"]
        train = [p["total"] for p in people if p["split"] in ("train", "dev")]
        test = [p["total"] for p in people if p["split"] == "test"]
        true += test
        pred += [float(np.mean(train))] * len(test)
    t, p = np.array(true, float), np.array(pred, float)
    ccc = 2 * np.cov(t, p, bias=True)[0, 1] / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)
    status = {"evaluation": {"ccc": 0.31, "item_mae": 0.9, "n": len(true)}, "base_bytes": 1e8, "rounds": [],
              "bytes_up_per_stage": {"stage1": 1e6, "stage2": 2e6}}
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code, str(tmp_path), "site1", "site2",
                           "site3"], input=json.dumps(status), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "point estimate" in ln)
    assert f"n {len(true)} test participants" in line and "synthetic" in line and "NOT clinical data" in line
    assert "site-mean baseline" in line and f"CCC {ccc:.2f}, n {len(true)} (model CCC 0.31)" in line, line


# ----------------------------------------------------------------------------- 4. `audit head` verifies first
@pytest.fixture
def logged(tmp_path):
    from mllm_dr import audit
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    for i in range(5):
        audit.append(ws.audit_path, "score", actor="dr.x", participant=f"30{i}", adapter_version="abc")
    return ws


def test_audit_head_signs_an_intact_log(logged):
    from mllm_dr import audit

    h = json.loads(run_cli("mllmdr-site", "audit", "head", "--workspace", logged.root, "--json").stdout)
    n = len(audit.read(logged.audit_path))
    assert h["entries"] == n and audit.verify(logged.audit_path, None, h)[0]


@pytest.mark.parametrize("damage,line", [("edit", 3), ("garbage", 6)])
def test_audit_head_refuses_a_log_that_does_not_verify(logged, damage, line):
    lines = logged.audit_path.read_text().splitlines()
    if damage == "edit":
        lines[2] = lines[2].replace('"participant": "302"', '"participant": "309"')
    else:
        lines.append("this is not an entry")
    logged.audit_path.write_text("\n".join(lines) + "\n")
    for extra in ((), ("--json",)):
        proc = run_cli("mllmdr-site", "audit", "head", "--workspace", logged.root, *extra, check=False)
        assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
        assert f"line {line}" in proc.stderr and "not signing a head" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------------------- 5. one-line validation errors
def test_validation_errors_carry_no_pydantic_layout(tmp_path):
    from fl_server.plan import validated_plan
    from mllm_dr.enrollment import EnrollmentBundle
    from mllm_dr.errors import InputError, read_model
    from policies.schema import load_policy

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError) as policy:
        load_policy(bad)
    with pytest.raises(InputError) as bundle:
        read_model(bad, EnrollmentBundle, "enrollment bundle")
    with pytest.raises(InputError) as plan:        # a model validator's own words (demo-dp's federated norms)
        validated_plan({"center-dir": str(tmp_path), "run-name": "r",
                        "policy": (ROOT / "policies" / "demo-dp.json").read_text()})
    with pytest.raises(InputError) as field:
        validated_plan({"center-dir": str(tmp_path), "run-name": "r", "stage1-rounds": -1})
    assert str(policy.value).startswith(f"{bad}: invalid policy: Invalid JSON: "), policy.value
    assert str(bundle.value).startswith(f"{bad}: not a valid enrollment bundle: Invalid JSON: "), bundle.value
    assert str(plan.value).startswith("invalid run plan: differential privacy"), plan.value
    assert str(field.value).startswith("invalid run plan: stage1-rounds: "), field.value
    for err in (policy, bundle, plan, field):
        assert ": :" not in str(err.value) and "  " not in str(err.value) and "Value error" not in str(err.value)


# ----------------------------------------------------------------------------- 6. setup.sh announces each step
def test_setup_announces_each_step_before_it_runs(tmp_path):
    """setup.sh from a copy, with stand-ins for .venv's python and apt-get on a PATH without chromium: every
    install is preceded by its own '== setup N/6' line, and the Chromium line (what, why) comes before apt-get."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    log = tmp_path / "log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("dirname", "timeout"):
        os.symlink(shutil.which(tool), bindir / tool)
    (bindir / "id").write_text("#!/bin/bash\necho 0\n")            # as root, where setup.sh installs Chromium
    (bindir / "apt-get").write_text(f'#!/bin/bash\necho "RAN apt-get $*" >> {log}\n')
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/bash\necho "RAN python $*" >> {log}\n')
    for f in (bindir / "apt-get", bindir / "id", venv / "python"):
        f.chmod(0o755)
    with open(log, "a") as fh:
        proc = subprocess.run(["/bin/bash", str(tmp_path / "scripts" / "setup.sh")], stdout=fh, stderr=subprocess.PIPE,
                              text=True, timeout=60, env={"PATH": str(bindir), "HOME": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    runs = [i for i, ln in enumerate(lines) if ln.startswith("RAN ")]
    steps = [i for i, ln in enumerate(lines) if ln.startswith("== setup ")]
    installs = [i for i in runs if "pip install" in lines[i] and "--upgrade pip" not in lines[i]]
    assert len(installs) == 4 and len(steps) == 6, lines
    for i in installs + [next(i for i in runs if "apt-get" in lines[i])]:    # each run right after its own step line
        assert lines[i - 1].startswith("== setup ") or lines[i - 1].startswith("RAN apt-get"), lines
    chromium = next(ln for ln in lines if ln.startswith("== setup 6/6"))
    assert "Chromium" in chromium and "apt-get" in chromium and "browser test" in chromium
    assert lines.index(chromium) < next(i for i in runs if "apt-get" in lines[i])
    assert [int(lines[i].split()[2].split("/")[0]) for i in steps] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- 7. `data synth`'s bar
def test_synth_bar_counts_sites_and_a_refusal_draws_none(tmp_path):
    proc = run_cli("mllmdr-site", "data", "synth", tmp_path / "s", "--participants", "9", "--sites", "3")
    assert "writing sites: 3/3" in proc.stderr and "1/1" not in proc.stderr, proc.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    proc = run_cli("mllmdr-site", "data", "synth", foreign, check=False)
    assert proc.returncode == 2 and "writing sites" not in proc.stderr and "notes.txt" in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_a_reply_the_kit_cannot_read_is_named_without_pydantics_layout():
    """protocol.malformed used pydantic's raw location and prefix (': : Invalid JSON', 'Value error, ...'), which
    the rest of the kit's messages no longer carry (errors.first_problem; a second read, session 46)."""
    from pydantic import BaseModel, ValidationError, field_validator

    from mllm_dr.protocol import malformed

    class M(BaseModel):
        x: int

        @field_validator("x")
        @classmethod
        def _small(cls, v):
            if v > 3:
                raise ValueError("bad x")
            return v

    for bad in ("{not json", '{"x": 9}'):
        try:
            M.model_validate_json(bad)
        except ValidationError as err:
            text = malformed("reply", err)
            assert ": :" not in text and "Value error" not in text and text.startswith("malformed reply ("), text
