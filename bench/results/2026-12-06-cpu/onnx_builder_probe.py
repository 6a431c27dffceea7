"""Feasibility probe (session 31, issue 14.4; not a kit entry point): onnxruntime-genai's model builder graphs
(GroupQueryAttention, fused RMS norms, MatMulNBits) against torch fp32 on SmolLM2-135M, in one process.
Prefill of B x T random-token embeddings without padding (hidden states compared with torch's), then STEPS
decode steps with the KV cache. Padding was NOT checked (GQA's padding side differs from the kit's batches).

Build the graphs (the wheel unzipped, run with the kit's own onnxruntime 1.32):
  pip download --no-deps -d /tmp/ogenai onnxruntime-genai   # 0.18.0
  (cd /tmp/ogenai && mkdir x && cd x && unzip -q ../onnxruntime_genai-*.whl)
  for p in fp32 int8 int4; do PYTHONPATH=/tmp/ogenai/x python -m onnxruntime_genai.models.builder \
    -m ~/.cache/mllm-dr/smollm2-135m-instruct -i ~/.cache/mllm-dr/smollm2-135m-instruct -o /tmp/ogenai/$p \
    -p $p -e cpu -c /tmp/ogenai/cache --extra_options exclude_embeds=true exclude_lm_head=true; done
Run: python onnx_builder_probe.py THREADS fp32,int8,int4
"""
import json, sys, time
import numpy as np, torch, onnxruntime as ort
from transformers import AutoModelForCausalLM
T_THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(T_THREADS)
B, T, STEPS = 8, 340, 16
PRECS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["fp32", "int8"]
lm = AutoModelForCausalLM.from_pretrained("/root/.cache/mllm-dr/smollm2-135m-instruct", dtype=torch.float32).eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, 40000, (B, T), generator=g)
emb = lm.get_input_embeddings()(ids).detach()
head = lm.get_output_embeddings().weight.detach().numpy()
def sess(p):
    o = ort.SessionOptions(); o.intra_op_num_threads = T_THREADS; o.inter_op_num_threads = 1
    return ort.InferenceSession(p, o, providers=["CPUExecutionProvider"])
out = {}
def torch_run():
    with torch.no_grad():
        t0 = time.time()
        r = lm.model(inputs_embeds=emb, attention_mask=torch.ones(B, T, dtype=torch.long), use_cache=True)
        t1 = time.time()
        cache, h = r.past_key_values, r.last_hidden_state
        for k in range(STEPS):
            tok = torch.from_numpy((h[:, -1].numpy() @ head.T).argmax(-1))
            r = lm.model(inputs_embeds=lm.get_input_embeddings()(tok[:, None]), attention_mask=torch.ones(B, T + k + 1, dtype=torch.long),
                         past_key_values=cache, use_cache=True)
            cache, h = r.past_key_values, r.last_hidden_state
        t2 = time.time()
    return r, t1 - t0, (t2 - t1) / STEPS, None
with torch.no_grad():
    ref = lm.model(inputs_embeds=emb, attention_mask=torch.ones(B, T, dtype=torch.long)).last_hidden_state.numpy()
def ort_run(s):
    names = [i.name for i in s.get_inputs()]
    pk = [n for n in names if n.startswith("past")]
    feed = {"inputs_embeds": emb.numpy(), "attention_mask": np.ones((B, T), np.int64)}
    feed |= {n: np.zeros((B, 3, 0, 64), np.float32) for n in pk}
    t0 = time.time(); r = s.run(None, feed); t1 = time.time()
    onames = [o.name for o in s.get_outputs()]
    h = r[0]
    first = h
    for k in range(STEPS):
        tok = (h[:, -1] @ head.T).argmax(-1)
        feed = {"inputs_embeds": lm.get_input_embeddings()(torch.from_numpy(tok)[:, None]).detach().numpy(),
                "attention_mask": np.ones((B, T + k + 1), np.int64)}
        feed |= {n: r[onames.index(n.replace("past_key_values", "present"))] for n in pk}
        r = s.run(None, feed); h = r[0]
    t2 = time.time()
    return first, t1 - t0, (t2 - t1) / STEPS
for rep in range(2):
    _, tp, td, _ = torch_run(); out.setdefault("torch", []).append((round(tp, 2), round(td, 3)))
    for p in PRECS:
        s = sess(f"/tmp/ogenai/{p}/model.onnx")
        h, tp2, td2 = ort_run(s)
        err = float(np.abs(h - ref).max() / np.abs(ref).max())
        out.setdefault(p, []).append((round(tp2, 2), round(td2, 3), round(err, 5)))
print(json.dumps({"threads": T_THREADS, "B": B, "T": T, "prefill_s_decode_s_per_step(_relerr)": out}))
