"""Session 46's review of `train --local`: a zero-shot run never continues or leaves a resume point, a
resume continues only with the interrupted run's options, from the checkpoint its state.json names (a swap
cut short included) and on the run's own base; what stage 2 trained on (teacher or extractive rationales,
over-long answers replaced) is reported; a damaged state or teacher record is one error naming the file;
`evaluate`'s one-line summary says n/a for an undefined figure. In-process, on the tiny-random base: one
interrupted run (module fixture) that each test copies."""

import json
import shutil

import pytest

from mllm_dr import local_run
from mllm_dr.config import LQFormerConfig, ModelConfig, TrainConfig
from mllm_dr.errors import InputError
from mllm_dr.local_run import run_dir, train_local
from mllm_dr.workspace import Workspace
from test_training_s44 import _copy, _stop_when, extracted_ws, one_thread  # noqa: F401  (fixtures)

MODEL = ModelConfig(lq=LQFormerConfig(n_queries=4, n_layers=1))
RUN = TrainConfig(stage1_epochs=1, stage2_epochs=3, batch_size=4)       # interrupted after stage 2 epoch 1


@pytest.fixture(scope="module")
def interrupted(extracted_ws, tmp_path_factory):     # noqa: F811
    """A site whose local run (1 + 3 epochs) was interrupted as stage 2's second epoch began; no
    rationales.jsonl (the site never ran 'rationales')."""
    ws = _copy(extracted_ws, tmp_path_factory.mktemp("s46") / "ws")
    with pytest.raises(KeyboardInterrupt):
        train_local(ws, "tiny-random", MODEL, RUN, progress=_stop_when("stage 2 epoch 2"))
    assert (run_dir(ws) / "optimizer-stage2.pt").is_file()
    return ws.root


@pytest.fixture
def ws(interrupted, tmp_path) -> Workspace:
    return _copy(interrupted, tmp_path / "ws")


def _state(ws: Workspace) -> dict:
    return json.loads((run_dir(ws) / "state.json").read_text())


# ----------------------------------------------------------------------------- 1. --zero-shot
def test_zero_shot_never_resumes_and_leaves_no_resume_point(ws, monkeypatch, capsys):
    """`--zero-shot --resume` loaded the trained adapters and saved them as zero-shot ('not in the training
    data' for a train patient); `--zero-shot` alone left state.json and the optimizer, so a later --resume
    went on mid-stage from the untrained adapters."""
    import sys

    from cli.site import main

    with pytest.raises(InputError, match="--zero-shot and --resume"):
        train_local(ws, "tiny-random", MODEL, RUN, resume=True, zero_shot=True)
    assert _state(ws)["epoch"] == 1 and "zero_shot" not in json.loads(
        (run_dir(ws) / "latest" / "adapter_meta.json").read_text())
    monkeypatch.setattr(sys, "argv", ["mllmdr-site", "train", "--local", "--zero-shot", "--resume", "-w", str(ws.root)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--zero-shot and --resume" in err and len(err.strip().splitlines()) == 1, err

    result = train_local(ws, "tiny-random", MODEL, RUN, zero_shot=True)
    assert result["zero_shot"] is True and result["rationale_sources"] is None
    assert not (run_dir(ws) / "state.json").exists() and not list(run_dir(ws).glob("optimizer-stage*.pt"))
    with pytest.raises(InputError, match="no interrupted local run here.*zero-shot") as err:
        train_local(ws, "tiny-random", MODEL, RUN, resume=True)
    assert err.value.path == str(run_dir(ws) / "state.json")


def test_a_run_with_nothing_to_train_is_refused_and_keeps_the_resume_point(ws):
    """0 + 0 epochs (not --zero-shot) trained nothing and read a `latest` that was not its own."""
    with pytest.raises(InputError, match="nothing to train"):
        train_local(ws, "tiny-random", MODEL, TrainConfig(stage1_epochs=0, stage2_epochs=0))
    assert _state(ws)["epoch"] == 1 and (run_dir(ws) / "optimizer-stage2.pt").is_file()


# ----------------------------------------------------------------------------- 2. the run's options
@pytest.mark.parametrize("config, cfg, says", [
    (MODEL, TrainConfig(stage1_epochs=1, stage2_epochs=2, batch_size=4),      # the CLI's default 2 of 5: nothing ran
     r"train\.stage2_epochs \(--stage2-epochs\) 3, this run asks for 2"),
    (MODEL, TrainConfig(stage1_epochs=1, stage2_epochs=3, batch_size=2), r"train\.batch_size \(--batch-size\) 4, .* 2"),
    (MODEL, TrainConfig(stage1_epochs=1, stage2_epochs=3, batch_size=4, lr_lora=1e-4), r"train\.lr_lora 0\.0005, .* 0\.0001"),
    (ModelConfig(lq=LQFormerConfig(n_queries=4, n_layers=1), use_audio=False), RUN,
     r"model\.use_audio \(--no-audio/--no-lq\) True, .* False"),
])
def test_a_resume_with_other_options_is_refused_naming_both_values(ws, config, cfg, says):
    """state.json held only {stage, epoch}: a run interrupted at stage 2 epoch 2 of 5 and resumed with the
    default 2 epochs trained nothing, exit 0, 'trained in 0 s'."""
    with pytest.raises(InputError, match=says) as err:
        train_local(ws, "tiny-random", config, cfg, resume=True)
    assert err.value.path == str(run_dir(ws) / "state.json") and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- 3. state.json and its checkpoint
def test_a_missing_damaged_or_foreign_state_is_one_error_naming_it(ws):
    state = run_dir(ws) / "state.json"
    kept = state.read_text()
    for text, says in (("{not json", "state is damaged"), ('["stage", 2]', "not a local run's state"),
                       ('{"stage": "2", "epoch": 0}', "not a local run's state")):
        state.write_text(text)
        with pytest.raises(InputError, match=says) as err:
            train_local(ws, "tiny-random", MODEL, RUN, resume=True)
        assert err.value.path == str(state)
    state.unlink()                                      # latest without state.json: was a raw ENOENT
    with pytest.raises(InputError, match="no interrupted local run here") as err:
        train_local(ws, "tiny-random", MODEL, RUN, resume=True)
    assert err.value.path == str(state)
    state.write_text(kept)
    checkpoint = run_dir(ws) / json.loads(kept)["checkpoint"]
    shutil.rmtree(checkpoint)                          # the folder state.json names is another epoch's adapters
    shutil.copytree(run_dir(ws) / "stage1-epoch1", checkpoint)
    with pytest.raises(InputError, match="not the checkpoint it belongs to") as err:
        train_local(ws, "tiny-random", MODEL, RUN, resume=True)
    assert err.value.path == str(checkpoint)
    shutil.rmtree(checkpoint)
    with pytest.raises(InputError, match="is missing") as err:
        train_local(ws, "tiny-random", MODEL, RUN, resume=True)


def test_a_state_of_an_older_kit_resumes_from_latest_and_says_its_options_went_unchecked(ws, monkeypatch, capsys):
    """A state.json of a kit before session 46 ({stage, epoch}) resumes from latest with this run's options
    (unknown, so unchecked: other epochs than the run's are not refused), and the result and the CLI say so."""
    import sys

    from cli.site import main

    (run_dir(ws) / "state.json").write_text('{"stage": 2, "epoch": 1}')
    state = local_run.read_state(run_dir(ws))
    assert state["checkpoint"] == "latest" and state["legacy"] is True
    local_run.check_resume(state, MODEL, TrainConfig(stage2_epochs=7), run_dir(ws) / "state.json")   # unknown: none
    loaded = []
    real = local_run.load_adapters
    monkeypatch.setattr(local_run, "load_adapters", lambda *a: loaded.append(a[3]) or real(*a))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")         # the CLI sets torch's threads from it
    # 2 stage-2 epochs where the run had 3: one epoch left (the options are not checked); no --base-model
    monkeypatch.setattr(sys, "argv", ["mllmdr-site", "train", "--local", "--resume", "--stage1-epochs", "1",
                                      "--stage2-epochs", "2", "--batch-size", "4", "--json", "-w", str(ws.root)])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    result = json.loads(out)
    assert loaded == [run_dir(ws) / "latest"] and result["base_model"] == "tiny-random"
    assert [(h["stage"], h["epoch"]) for h in result["history"]] == [(2, 2)]
    assert "written by a kit before session 46" in result["resume_unchecked"] and "unchecked" in result["resume_unchecked"]
    said = " ".join(err.split())                        # rich wraps the line at the console's width
    assert "warning: " in said and "written by a kit before session 46" in said and "options, unchecked" in said
    assert _state(ws)["checkpoint"] == "stage2-epoch2"       # a state of this kit now, its options recorded


def test_a_state_lacking_an_option_a_later_kit_added_still_resumes(ws):
    """Every option a later kit adds made each resume of a state of this kit refused ('(unset)' against the
    option's default): only the options both sides name are compared."""
    path = run_dir(ws) / "state.json"
    state = _state(ws)
    del state["train"]["seed"]                          # as if "seed" were added after this state was written
    local_run.check_resume(state, MODEL, RUN, path)
    state["model"]["dropped_since"] = 1                 # and an option a later kit dropped
    local_run.check_resume(state, MODEL, RUN, path)
    path.write_text(json.dumps(state))
    assert local_run.resume_point(run_dir(ws), MODEL, RUN)[0]["checkpoint"] == "stage2-epoch1"
    state["train"]["batch_size"] = 2                    # an option both name still has to agree
    with pytest.raises(InputError, match=r"train\.batch_size \(--batch-size\) 2, this run asks for 4"):
        local_run.check_resume(state, MODEL, RUN, path)


def test_a_resume_goes_on_from_its_checkpoint_on_its_base_and_reports_what_stage_2_trained_on(ws, monkeypatch):
    """The checkpoint state.json names, taken as ``settled`` takes it (a swap cut short leaves only
    ``<folder>.old``: the resume trained from scratch, silently), never ``latest`` (written first, it can be an
    epoch ahead); no --base-model: the run's base (it loaded smollm2); no rationales.jsonl: every answer
    extractive, reported (only stale records were counted)."""
    from cli.site_model import train_summary

    state = _state(ws)
    assert state["checkpoint"] == "stage2-epoch1" and state["train"]["stage2_epochs"] == 3
    out = run_dir(ws)
    (out / "stage2-epoch1").rename(out / "stage2-epoch1.old")        # a swap cut short between its renames
    shutil.rmtree(out / "latest")                                     # latest ahead of (here: other than) the state
    shutil.copytree(out / "stage1-epoch1", out / "latest")
    loaded = []
    real = local_run.load_adapters
    monkeypatch.setattr(local_run, "load_adapters", lambda *a: loaded.append(a[3]) or real(*a))
    result = train_local(ws, None, MODEL, RUN, resume=True)
    assert loaded == [out / "stage2-epoch1.old"]
    assert result["base_model"] == "tiny-random" and result["optimizer_restored"] is True
    assert [(h["stage"], h["epoch"]) for h in result["history"]] == [(2, 2), (2, 3)]
    assert result["model"] == MODEL.to_dict() and result["config"]["stage2_epochs"] == 3
    src = result["rationale_sources"]
    assert src["teacher"] == 0 and src["extractive"] == result["train_instances"] > 0
    assert 0 <= src["over_budget_replaced"] <= src["extractive"]
    line = train_summary(result, out / "latest")
    assert f"0 on a teacher rationale, {src['extractive']} on the extractive one" in line
    with pytest.raises(InputError, match="the run finished"):                     # nothing left: said, not "0 s"
        train_local(ws, None, MODEL, RUN, resume=True)


def test_no_base_model_option_means_the_runs_base_on_resume(ws, monkeypatch, capsys):
    """The CLI's --base-model defaulted to smollm2, so `train --local --resume` loaded it whatever the run's.
    Through the CLI up to the base's loading (stopped there: nothing trains)."""
    import inspect
    import sys

    from cli.site import main
    from cli.site_model import train

    assert inspect.signature(train).parameters["base_model"].default.default is None
    state = _state(ws)
    assert state["base_model"] == "tiny-random"
    # the run's model options as the CLI's defaults build them (the module's run has a smaller LQ-former), so
    # that this resume passes check_resume
    state["model"] = local_run.run_options(ModelConfig(), RUN)["model"]
    (run_dir(ws) / "state.json").write_text(json.dumps(state))
    asked = []

    def load_base(spec, *a, **k):
        asked.append(spec)
        raise InputError("stop: the base is chosen")

    monkeypatch.setattr(local_run, "load_base", load_base)
    monkeypatch.setattr(sys, "argv", ["mllmdr-site", "train", "--local", "--resume", "--stage1-epochs", "1",
                                      "--stage2-epochs", "3", "--batch-size", "4", "-w", str(ws.root)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "stop: the base is chosen" in capsys.readouterr().err
    assert asked == ["tiny-random"]                     # the run's base (its checkpoint's metadata), not smollm2


# ----------------------------------------------------------------------------- 6. the over-long answers
def test_over_budget_answers_are_counted_as_the_processor_replaces_them(ws, tiny):
    """A teacher rationale longer than the scorer's budget trains as the extractive one (processor); it was
    not counted anywhere."""
    from mllm_dr.adapters import build_site_model
    from mllm_dr.dataset import examples, labelled_training_instances, rationale_sources, teacher_record_of
    from mllm_dr.features.store import FeatureStore

    insts = labelled_training_instances(ws)[:2]
    long, short = insts
    ws.rationales_path.parent.mkdir(parents=True, exist_ok=True)
    ws.rationales_path.write_text("".join(json.dumps(teacher_record_of(i) | {"rationale": text}) + "\n" for i, text in (
        (long, "The participant said " + "very " * 120 + "little."), (short, "Says they sleep well."))))
    sm = build_site_model(*tiny, FeatureStore(ws.features_dir).dims(), MODEL)
    assert rationale_sources(ws, insts, sm.processor) == {"teacher": 1, "extractive": 1, "over_budget_replaced": 1}
    encoded = [sm.processor.encode(ex) for ex in examples(ws, insts, 2)]
    trained = [sm.processor.tok.decode([t for t in e["labels"] if t != -100]) for e in encoded]
    assert "very very" not in trained[0] and "sleep well" in trained[1]


# ----------------------------------------------------------------------------- 7. rationales.jsonl
@pytest.mark.parametrize("line, says", [('{"participant": "300", "item": "Sleep"}', "line 2: .*no rationale"),
                                        ('["300", "Sleep", "r"]', "line 2 is not a teacher record"),
                                        ('{"participant": 300, "item": "Sleep", "rationale": "r"}', "no participant"),
                                        ("{oops", "line 2 is not JSON")])
@pytest.mark.parametrize("reader", ["training", "rationales"])
def test_a_hand_edited_teacher_record_is_one_error_naming_file_and_line(tmp_path, line, says, reader, monkeypatch):
    """Training reads the records, and so does 'mllmdr-site rationales' before asking the teacher again."""
    from mllm_dr import dataset
    from mllm_dr.rationales import run_rationales

    ws = Workspace.init(tmp_path / "ws", "site1")
    ws.rationales_path.parent.mkdir(parents=True, exist_ok=True)
    ws.rationales_path.write_text('{"participant": "301", "item": "Sleep", "rationale": "ok"}\n' + line + "\n")
    monkeypatch.setattr(dataset, "labelled_training_instances", lambda ws: [])     # no corpus needed to read them
    with pytest.raises(InputError, match=says) as err:
        dataset.teacher_rationales(ws, []) if reader == "training" else run_rationales(ws, teacher=None)
    assert err.value.path == str(ws.rationales_path)


# ----------------------------------------------------------------------------- 5. evaluate's summary
def test_evaluate_summary_says_n_a_for_an_undefined_figure():
    import numpy as np

    from cli.site_model import metrics_line

    line = metrics_line({"n": 3, "ccc": 0.51234, "precision": float("nan"), "recall": None, "f1": np.float64("nan"),
                         "mae": np.float32(1.5), "k": np.int64(2)})
    assert line == "n=3 ccc=0.512 precision=n/a recall=n/a f1=n/a mae=1.500 k=2"


# ----------------------------------------------------------------------------- a federated site's count
def test_a_federated_site_reports_what_its_rounds_trained_on_counted_once_with_its_examples(monkeypatch):
    """SiteSession.rationale_sources() read the corpus and rationales.jsonl again every stage-2 round while
    the rounds trained on the examples built in the first: 'rationales' run between rounds was misreported,
    and a line since written that does not parse made an already trained round a site error. Fakes for the
    corpus, the examples and the count: a unit test of the session's caching."""
    from types import SimpleNamespace

    from mllm_dr import federated
    from mllm_dr.federated import SiteSession

    insts = ["inst-a", "inst-b"]
    calls = {"instances": 0, "examples": [], "sources": []}

    def labelled(ws):
        calls["instances"] += 1
        return insts

    def examples(ws, instances, stage):
        calls["examples"].append((stage, instances))
        return [f"ex-{stage}-{i}" for i in instances]

    counts = iter([{"teacher": 1, "extractive": 1, "over_budget_replaced": 0}])

    def sources(ws, instances, processor):
        calls["sources"].append(instances)
        try:
            return next(counts)
        except StopIteration:              # read again after the examples were built: a line written since
            raise InputError("rationales.jsonl line 3 is not JSON") from None

    monkeypatch.setattr(federated, "labelled_training_instances", labelled)
    monkeypatch.setattr(federated, "examples", examples)
    monkeypatch.setattr(federated, "rationale_sources", sources)
    session = SiteSession.__new__(SiteSession)          # no base model: only the examples' bookkeeping
    session.ws, session.sm, session._train_exs = SimpleNamespace(root="ws"), SimpleNamespace(processor="p"), {}
    exs = session._examples(2)
    assert calls["sources"] == [insts] and calls["examples"] == [(2, insts)]     # the same instances, once
    first = session.rationale_sources()
    for _ in range(3):                                  # every later round: the same count, nothing read again
        assert session.rationale_sources() == first == {"teacher": 1, "extractive": 1, "over_budget_replaced": 0}
    assert session._examples(2) is exs and calls["instances"] == 1 and len(calls["sources"]) == 1
    fresh = SiteSession.__new__(SiteSession)            # asked before any stage-2 round: the examples are built
    fresh.ws, fresh.sm, fresh._train_exs = session.ws, session.sm, {}
    counts = iter([{"teacher": 0, "extractive": 2, "over_budget_replaced": 1}])
    assert fresh.rationale_sources()["extractive"] == 2 and 2 in fresh._train_exs
    session._examples(1)                                # stage 1's examples count nothing
    assert len(calls["sources"]) == 2


def test_an_option_left_out_at_its_default_is_still_compared_on_resume(tmp_path):
    """ModelConfig.to_dict leaves feature_norm out at its default: comparing only keys both sides record let a run
    interrupted with feature_norm "participant" resume with the default norms (a second read, session 46)."""
    state = local_run.run_options(ModelConfig(feature_norm="participant"), TrainConfig()) | {
        "stage": 1, "epoch": 0, "checkpoint": "x"}
    with pytest.raises(InputError, match="model.feature_norm"):
        local_run.check_resume(state, ModelConfig(), TrainConfig(), tmp_path / "state.json")
