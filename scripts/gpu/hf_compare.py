#!/usr/bin/env python3
"""End-to-end check of the CUDA backend against HF transformers, on the GPU
machine (PyTorch and transformers are installed there).

  hf_compare.py make KIND DIR          random bf16 weights at real shapes, saved as an HF dir
  hf_compare.py reference DIR PROMPTS STEPS OUT.json [DTYPE]  HF greedy generate (GPU if any)
  hf_compare.py compare OURS.json REF.json TOL         tokens and logprobs side by side

KIND: llama8b (Llama-3.1-8B's layer shapes, llama3 rope scaling, 128k vocab)
or qwen2 (Qwen2-7B's shapes: q/k/v bias, 152k vocab), each with 4 layers so
the weights fit a quick check; per-layer shapes are the real ones.
"""
import json
import sys


def make(kind, out):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if kind == "llama8b":
        cfg = LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
            rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        )
    elif kind == "qwen2":
        cfg = Qwen2Config(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944,
            num_hidden_layers=4, num_attention_heads=28, num_key_value_heads=4,
            rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
            tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
        )
    elif kind == "tiny":  # a quick local run of the same flow on the CPU
        cfg = LlamaConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=1536,
            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        )
    else:
        sys.exit(f"unknown kind {kind}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        # HF's init (std 0.02) gives near-flat logits; a larger head makes
        # greedy choices clear of rounding, as a trained model's are.
        model.lm_head.weight.mul_(5.0)
        if kind == "qwen2":
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    print(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params -> {out}")


def reference(d, prompts_path, steps, out, dtype="bfloat16"):
    import torch
    from transformers import AutoModelForCausalLM

    prompts = json.load(open(prompts_path))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dt).to(dev).eval()
    results = []
    for p in prompts:
        ids = torch.tensor([p], device=dev)
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=steps, do_sample=False, output_scores=True,
                               return_dict_in_generate=True, pad_token_id=0,
                               eos_token_id=None)
        steps_out = []
        for k, scores in enumerate(g.scores):
            lp = torch.log_softmax(scores[0].float(), dim=-1)
            tok = int(g.sequences[0, len(p) + k])
            top = torch.topk(lp, 5)
            steps_out.append({"token": tok, "logprob": float(lp[tok]),
                              "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices)]})
        results.append(steps_out)
    json.dump(results, open(out, "w"))


def compare(ours_path, ref_path, tol):
    ours, ref = json.load(open(ours_path)), json.load(open(ref_path))
    tol = float(tol)
    ok, rows, max_diff = True, [], 0.0
    for i, (a, b) in enumerate(zip(ours, ref)):
        same = 0
        status = "identical"
        for x, y in zip(a, b):
            if x["token"] != y["token"]:
                alt = dict((t, l) for t, l in y["top"]).get(x["token"])
                gap = None if alt is None else y["logprob"] - alt
                if gap is not None and gap <= tol:
                    status = f"near tie at step {same} (HF gap {gap:.3f})"
                else:
                    status = f"DIVERGED at step {same} (HF gap {gap})"
                    ok = False
                break
            max_diff = max(max_diff, abs(x["logprob"] - y["logprob"]))
            same += 1
        rows.append(f"prompt {i}: {same}/{len(b)} tokens equal, {status}")
    print("\n".join(rows))
    print(f"max |logprob diff| over equal steps: {max_diff:.4f} (tolerance {tol})")
    if max_diff > tol:
        ok = False
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make": make, "reference": lambda d, p, s, o, *dt: reference(d, p, int(s), o, *dt),
     "compare": compare}[cmd](*args)
