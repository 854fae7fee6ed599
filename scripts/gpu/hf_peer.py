#!/usr/bin/env python3
"""The peer for the CUDA throughput benchmark: HF transformers `generate`
(bf16, eager, on the GPU) on Llama-3.1-8B's shapes with random weights.

  hf_peer.py CONFIG_DIR BATCH INPUT_LEN OUTPUT_LEN
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

cfg_dir, batch, inp, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = LlamaConfig(**json.load(open(f"{cfg_dir}/config.json")))
torch.set_default_device("cuda")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
ids = torch.randint(1000, 100000, (batch, inp))
with torch.no_grad():
    model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    torch.cuda.synchronize()
    t = time.time()
    g = model.generate(ids, max_new_tokens=out, min_new_tokens=out, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    dt = time.time() - t
n = (g.shape[1] - inp) * batch
print(f"HF transformers generate: batch {batch}, {inp} in / {out} out: {n / dt:.0f} output tok/s ({dt:.1f} s)")
