"""The seams between the parts: one wire protocol the policy allows, one source of defaults, a
processor that works without an LLM, one adapter-state naming, and scoring that runs the prompt once."""

from __future__ import annotations

import copy
import tomllib

import pytest
import torch

from conftest import ROOT
from mllm_dr.aspects import AspectInstance
from mllm_dr.processor import Example


def test_the_default_policy_allows_every_key_the_protocol_emits():
    from mllm_dr.protocol import site_emitted_keys
    from policies.schema import load_policy

    egress = load_policy().egress
    for key in site_emitted_keys():
        probe = key.replace("*", "audio")          # a prefixed family, e.g. dim-* -> dim-audio
        assert egress.metric_allowed(probe), f"the protocol emits {key!r} but the default policy blocks it"


def test_pyproject_run_config_holds_the_plan_defaults():
    from fl_server.plan import RunPlan

    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {k: v for k, v in flwr.items() if k not in ("center-dir", "run-name")} == RunPlan.defaults()


def _example(answer=None, item="Sleep"):
    inst = AspectInstance("p1", item, 2, "Participant: i can't sleep at night", 1, 1, evidence="i can't sleep")
    return Example(inst, {"audio": torch.randn(9, 25), "visual": None}, answer, 2)


def test_collation_needs_no_llm(tiny):
    from mllm_dr.config import LQFormerConfig, ModelConfig
    from mllm_dr.processor import Processor

    _, tok, _ = tiny
    proc = Processor(tok, ModelConfig(lq=LQFormerConfig(n_queries=3)), {"audio": 25, "visual": 49})
    batch = proc.collate([_example(), _example("Evaluation Result: 2\nEvaluation Reason: no sleep.", "Tired")],
                         left_pad=True)
    assert batch.slots["audio"].sum(1).tolist() == [3, 3] and batch.slots["visual"].sum(1).tolist() == [3, 3]
    assert batch.feats["visual"].abs().sum() == 0                   # missing modality: zero frame
    first = batch.attention_mask.argmax(1)                          # left padding: positions restart at 0
    assert all(batch.position_ids[i, first[i]] == 0 for i in range(2))
    assert batch.position_ids[0, -1] == batch.attention_mask[0].sum() - 1
    # the answer's score digit is located (for the optional score-token weight); no answer, no position
    assert batch.score_positions[0] == -1 and tok.decode(batch.input_ids[1, batch.score_positions[1]]).strip() == "2"


def test_adapter_state_is_one_naming_and_carries_buffers(tiny):
    from mllm_dr.adapters import build_site_model, get_adapter_state, set_adapter_state
    from mllm_dr.config import LQFormerConfig, ModelConfig

    base, tok, info = tiny
    config = ModelConfig(lq=LQFormerConfig(n_queries=2, n_layers=1))
    a = build_site_model(copy.deepcopy(base), tok, info, {"audio": 25}, config, seed=1)
    b = build_site_model(copy.deepcopy(base), tok, info, {"audio": 25}, config, seed=2)
    for sm in (a, b):
        sm.model.lq["audio"].register_buffer("running_scale", torch.ones(3))
        sm.model.enable_lora()
    a.model.lq["audio"].running_scale.fill_(7.0)
    state = get_adapter_state(a.model)
    assert "lq.audio.running_scale" in state and {n.split(".")[0] for n in state} == {"lq", "maa", "lora"}
    set_adapter_state(b.model, state)
    assert all(torch.equal(t, get_adapter_state(b.model)[n]) for n, t in state.items())


def test_scoring_runs_the_prompt_once_and_decodes_like_transformers(tiny):
    """One prefill feeds both MAA and the KV-cached greedy decoding; the tokens equal HF's greedy generate."""
    from mllm_dr.adapters import build_site_model
    from mllm_dr.config import LQFormerConfig, ModelConfig

    base, tok, info = tiny
    sm = build_site_model(copy.deepcopy(base), tok, info, {"audio": 25},
                          ModelConfig(use_visual=False, lq=LQFormerConfig(n_queries=2, n_layers=1)), seed=0)
    sm.model.eval()
    batch = sm.processor.collate([_example(), _example(item="Tired"), _example(item="Appetite")], left_pad=True)
    long_calls = []
    hook = sm.model._llm()[0].register_forward_pre_hook(
        lambda mod, args, kw: long_calls.append(1) if (kw.get("inputs_embeds") is not None) else None,
        with_kwargs=True)
    ids, reg = sm.model.generate(batch, 12, tok.eos_token_id, tok.pad_token_id)
    hook.remove()
    assert len(long_calls) == 1 and reg.shape == (3,)
    with torch.no_grad():
        emb = sm.model.embed(batch)
        ref = sm.model.base.generate(inputs_embeds=emb, attention_mask=batch.attention_mask, max_new_tokens=12,
                                     do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    n = min(ids.shape[1], ref.shape[1])
    assert n == 12                                                  # a random model never stops early
    assert torch.equal(ids[:, :n], ref[:, :n])
    # any of several end tokens ends an answer (a chat base's end-of-turn token beside the tokenizer's EOS, session
    # 46: scoring stopped only at the tokenizer's): each row's third greedy token taken as an end token
    third = ids[:, 2].tolist()
    short, _ = sm.model.generate(batch, 12, [tok.eos_token_id, *third], tok.pad_token_id)
    for row, t in zip(short, third):
        first = next(k for k, x in enumerate(row.tolist()) if x in third or x == tok.eos_token_id)
        assert first <= 2 and all(x == tok.pad_token_id for x in row[first + 1:].tolist())


def test_the_answer_only_loss_equals_the_models_own_loss(tiny):
    """The output head runs only on supervised positions; the loss is the LM's own, to float precision."""
    from mllm_dr.adapters import build_site_model
    from mllm_dr.config import LQFormerConfig, ModelConfig

    base, tok, info = tiny
    sm = build_site_model(copy.deepcopy(base), tok, info, {"audio": 25},
                          ModelConfig(use_visual=False, lq=LQFormerConfig(n_queries=2, n_layers=1)), seed=0)
    sm.model.enable_lora()
    sm.model.eval()
    batch = sm.processor.collate([_example("Evaluation Result: 2\nEvaluation Reason: no sleep."),
                                  _example("Evaluation Result: 1\nEvaluation Reason: tired on some days.", "Tired")])
    with torch.no_grad():
        ours = sm.model(batch)["lm_loss"]
        theirs = sm.model.base(inputs_embeds=sm.model.embed(batch), attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, labels=batch.labels).loss
    assert torch.allclose(ours, theirs, rtol=1e-5)


def test_a_shared_prompt_start_is_computed_once_with_the_same_result(tiny):
    """Rows that share their first tokens (same item: system prompt + instruction) run them once; the
    hidden states, losses and MAA scores equal the full computation."""
    from mllm_dr.adapters import build_site_model
    from mllm_dr.config import LQFormerConfig, ModelConfig

    base, tok, info = tiny
    sm = build_site_model(copy.deepcopy(base), tok, info, {"audio": 25},
                          ModelConfig(use_visual=False, lq=LQFormerConfig(n_queries=2, n_layers=1)), seed=0)
    sm.model.enable_lora()
    sm.model.eval()
    exs = [_example("Evaluation Result: 2\nEvaluation Reason: no sleep."),
           _example("Evaluation Result: 0\nEvaluation Reason: sleeps well, eight hours a night.")]
    batch = sm.processor.collate(exs)
    assert batch.prefix_len > 60          # system prompt and the Sleep instruction
    full = copy.copy(batch)
    full.prefix_len = 0
    with torch.no_grad():
        shared, once = sm.model(batch), sm.model(full)
    for k in ("lm_loss", "regression", "mse", "score_loss"):
        assert torch.allclose(shared[k], once[k], atol=1e-5), k
    # who decides: on a CPU the shared start runs once and then the rest (two passes); switched off
    # (a GPU's default) one pass, the same result
    passes = []
    hook = sm.model._llm()[0].register_forward_pre_hook(lambda *_: passes.append(1))
    with torch.no_grad():
        sm.model(batch)
        assert len(passes) == 2
        sm.model.share_prefix = False
        one_pass = sm.model(batch)
    hook.remove()
    assert len(passes) == 3
    assert torch.allclose(one_pass["regression"], shared["regression"], atol=1e-5)
    mixed = sm.processor.collate([exs[0], _example("Evaluation Result: 1\nEvaluation Reason: tired.", "Tired")])
    assert 0 < mixed.prefix_len < batch.prefix_len                      # other item: the system prompt only


def test_the_dialogue_first_prompt_shares_a_participants_media_and_dialogue_across_its_items(tiny):
    """ModelConfig.prompt_layout = "dialogue-first": the items of one participant share everything but
    the instruction and answer, slots included (same features); computed once, with the same losses and
    MAA scores as in full. Another participant's features stop the shared start before the first slot,
    and training batches hold one participant."""
    from mllm_dr.adapters import build_site_model
    from mllm_dr.config import LQFormerConfig, ModelConfig
    from mllm_dr.training import batches

    base, tok, info = tiny
    cfg = ModelConfig(use_visual=False, lq=LQFormerConfig(n_queries=2, n_layers=1), prompt_layout="dialogue-first")
    sm = build_site_model(copy.deepcopy(base), tok, info, {"audio": 25}, cfg, seed=0)
    sm.model.enable_lora()
    sm.model.eval()
    feats = {"audio": torch.randn(9, 25), "visual": None}
    dialogue = "Participant: i can't sleep at night\nParticipant: i'm worn out every single day"

    def ex(pid, item, answer, f):
        return Example(AspectInstance(pid, item, 2, dialogue, 2, 2, evidence="i can't sleep"), f, answer, 2)

    exs = [ex("p1", "Sleep", "Evaluation Reason: no sleep.\nEvaluation Result: 2", feats),
           ex("p1", "Tired", "Evaluation Reason: worn out, every day.\nEvaluation Result: 3", feats)]
    batch = sm.processor.collate(exs)
    start = batch.slots["audio"][0].nonzero().max().item()
    assert batch.prefix_len > start + 10                     # through the slots and into the dialogue
    shared_text = sm.processor.tok.decode(batch.input_ids[0, :batch.prefix_len])
    assert shared_text.index("Dialogue:") < shared_text.index("every single day") < shared_text.index("Please evaluate")
    full = copy.copy(batch)
    full.prefix_len = 0
    with torch.no_grad():
        shared, once = sm.model(batch), sm.model(full)
    for k in ("lm_loss", "regression", "mse"):
        assert torch.allclose(shared[k], once[k], atol=1e-5), k
    stranger = {"audio": torch.randn(9, 25), "visual": None}
    other = sm.processor.collate([exs[0], ex("p2", "Tired", exs[1].answer, stranger)])
    assert 0 < other.prefix_len <= batch.slots["audio"][0].nonzero().min().item()
    mixed = [ex(p, item, "Evaluation Reason: x.\nEvaluation Result: 1", feats)
             for p in ("p1", "p2", "p3") for item in ("Sleep", "Tired", "Appetite", "Moving")]
    got = batches(sm, mixed, 2, seed=0)
    assert len(got) == 6 and all(len({e.instance.participant for e in b}) == 1 for b in got)
    # the run plan signs it into the model config; a config stored before the key existed is read as
    # the paper's instruction-first prompt it was trained with
    from fl_server.plan import RunPlan

    plan = RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "prompt-layout": "dialogue-first"})
    assert ModelConfig.from_dict(plan.architecture().to_dict()).prompt_layout == "dialogue-first"
    stored = ModelConfig().to_dict()
    del stored["prompt_layout"]
    assert ModelConfig.from_dict(stored).prompt_layout == "instruction-first"
    with pytest.raises(ValueError, match="prompt-layout"):
        RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "prompt-layout": "dialogue-last"})


def test_item_and_rationale_figures_travel_as_statistics_and_pool_exactly():
    """A site's evaluation crosses the wire as counts and sums; the center's pooled figures equal the
    figures computed over both sites' participants at once."""
    from mllm_dr.evaluation import Evaluation
    from mllm_dr.protocol import EvaluateReply

    def site(people):
        e = Evaluation()
        for true, pred in people:
            e.stats.add(sum(true), sum(pred))
            e.item_stats.add(true, pred)
            head = [min(3, p + 1) for p in pred]                 # the MAA head scores differently
            e.head_stats.add(sum(true), sum(head))
            e.head_item_stats.add(true, head)
            e.rationale_stats.add({"Sleep": "I can't sleep at night, every night."}, {"Sleep": pred[0]},
                                  ["I can't sleep at night"], {"Sleep": [0]})
            e.items += len(true)
        return e

    a_people, b_people = [([3, 2, 1], [3, 2, 2]), ([0, 0, 1], [1, 1, 1])], [([2, 2, 3], [2, 2, 3])]
    a, b = site(a_people), site(b_people)
    pooled = Evaluation()
    for e in (a, b):
        pooled.merge(EvaluateReply.from_record(EvaluateReply.of(e).to_record()).evaluation())
    assert pooled.metrics() == pytest.approx(site(a_people + b_people).metrics(), nan_ok=True)
    assert pooled.metrics()["item_mae"] == pytest.approx(3 / 9) and pooled.metrics()["flat_pred_share"] == pytest.approx(1 / 3)
    # the MAA head's own figures on the same participants travel too, under ss-* (old site policies allow it)
    assert pooled.metrics()["maa_item_mae"] == pytest.approx(10 / 9) and pooled.metrics()["maa_mae"] == pytest.approx(10 / 3)
    assert pooled.metrics()["maa_ccc"] != pooled.metrics()["ccc"]
    assert any(k.startswith("ss-maa-is-") for k in EvaluateReply.of(a).to_record())
    assert all(k.startswith(("ss-", "is-", "rs-")) or k in ("num-examples", "format-violations", "items")
               for k in EvaluateReply.of(a).to_record())
    assert not any(isinstance(v, (list, dict)) for v in EvaluateReply.of(a).to_record().values())
