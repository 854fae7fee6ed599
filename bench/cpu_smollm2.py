#!/usr/bin/env python3
"""CPU serving benchmark for issue 2: SmolLM2-135M-Instruct on this machine.

Measures, in one run and on the same GGUF file:
  * Flotilla: `gateway serve` (release build) through its OpenAI API:
    start-to-ready time, batch-1 decode tok/s, 32-concurrent output tok/s;
  * HF transformers (f32, torch on N threads), the peer: batch 1 and batch 32;
  * llama.cpp (llama-cpp-python) on the same GGUF: batch 1 (and 32 run one
    after another, as its Python API has no concurrent batch).
Every run generates exactly --new-tokens tokens per request (EOS ignored).

With `--model hf-bf16` both sides instead load the HF directory that
scripts/make-hf-smollm2.py writes (bf16 safetensors): Flotilla with
`--dtype auto` (which follows the checkpoint to bfloat16), HF transformers in
bfloat16; llama.cpp has no part in that run.

Run with the bench venv (scripts/bench-setup.sh prints its path):
  VENV/bin/python bench/cpu_smollm2.py [--model gguf|hf-bf16] [--threads 2] [--json out.json]
"""
import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "What is the boiling point of water?",
    "Describe a cat to someone who has never seen one.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
]


def prompts(n):
    return [f"{PROMPTS[i % len(PROMPTS)]} (request {i})" for i in range(n)]


def gguf_path():
    # The model package lives in the test environment (scripts/setup.sh), not the bench venv.
    return subprocess.check_output(["python3", os.path.join(ROOT, "scripts", "smollm2-path")], text=True).strip()


def hf_dir():
    root = os.environ.get("FLOTILLA_FIXTURES") or os.path.expanduser("~/.cache/flotilla/fixtures")
    d = os.path.join(root, "smollm2-hf")
    if not os.path.isfile(os.path.join(d, "config.json")):
        sys.exit(f"{d} is missing: run scripts/setup.sh")
    return d


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- Flotilla
def bench_flotilla(model, new_tokens, batch, gateway_bin):
    from openai import OpenAI

    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [gateway_bin, "serve", model, "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "smollm2", "--disable-log-requests"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("gateway did not become ready")
            time.sleep(0.02)
        ready_s = time.perf_counter() - t0
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

        def one(p):
            r = client.completions.create(model="smollm2", prompt=p, max_tokens=new_tokens,
                                          temperature=0, extra_body={"ignore_eos": True})
            return r.usage.completion_tokens

        one("warm up")
        t = time.perf_counter()
        n1 = one(PROMPTS[0])
        b1 = n1 / (time.perf_counter() - t)
        ps = prompts(batch)
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(batch) as ex:
            total = sum(ex.map(one, ps))
        bn = total / (time.perf_counter() - t)
        return {"ready_s": ready_s, "batch1_tok_s": b1, f"batch{batch}_tok_s": bn}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- HF transformers
def bench_hf(model, new_tokens, batch, threads):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    if os.path.isdir(model):
        tok = AutoTokenizer.from_pretrained(model)
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    else:
        d, f = os.path.dirname(model), os.path.basename(model)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def gen(ps):
        enc = tok(ps, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = m.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]

    gen(["warm up"])
    t = time.perf_counter()
    b1 = gen([PROMPTS[0]]) / (time.perf_counter() - t)
    t = time.perf_counter()
    bn = gen(prompts(batch)) / (time.perf_counter() - t)
    return {"batch1_tok_s": b1, f"batch{batch}_tok_s": bn}


# ---------------------------------------------------------------- llama.cpp
def bench_llama_cpp(model, new_tokens, batch, threads):
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=512, n_threads=threads, n_batch=512, verbose=False)

    def one(p):
        llm.reset()
        toks = llm.tokenize(p.encode())
        n = 0
        for _ in llm.generate(toks, temp=0.0, top_k=1, reset=True):
            n += 1
            if n >= new_tokens:
                break
        return n

    one("warm up")
    t = time.perf_counter()
    b1 = one(PROMPTS[0]) / (time.perf_counter() - t)
    t = time.perf_counter()
    total = sum(one(p) for p in prompts(batch))
    bn = total / (time.perf_counter() - t)
    return {"batch1_tok_s": b1, f"batch{batch}_sequential_tok_s": bn}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["gguf", "hf-bf16"], default="gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gateway-bin", default=os.path.join(ROOT, "target", "release", "gateway"))
    ap.add_argument("--skip", action="append", default=[], choices=["flotilla", "hf", "llama.cpp"])
    ap.add_argument("--json")
    a = ap.parse_args()
    model = gguf_path() if a.model == "gguf" else hf_dir()
    if a.model == "hf-bf16" and "llama.cpp" not in a.skip:
        a.skip.append("llama.cpp")
    res = {"machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}",
           "model": os.path.basename(model), "new_tokens": a.new_tokens, "threads": a.threads}
    if "flotilla" not in a.skip:
        res["flotilla"] = bench_flotilla(model, a.new_tokens, a.batch, a.gateway_bin)
        print("flotilla", res["flotilla"], flush=True)
    if "hf" not in a.skip:
        res["hf"] = bench_hf(model, a.new_tokens, a.batch, a.threads)
        print("hf", res["hf"], flush=True)
    if "llama.cpp" not in a.skip:
        res["llama.cpp"] = bench_llama_cpp(model, a.new_tokens, a.batch, a.threads)
        print("llama.cpp", res["llama.cpp"], flush=True)
    if "flotilla" in res and "hf" in res:
        k = f"batch{a.batch}_tok_s"
        res["ratio_vs_hf"] = {
            "batch1": res["flotilla"]["batch1_tok_s"] / res["hf"]["batch1_tok_s"],
            f"batch{a.batch}": res["flotilla"][k] / res["hf"][k],
        }
    if "flotilla" in res and "llama.cpp" in res:
        res["ratio_vs_llama_cpp"] = {
            "batch1": res["flotilla"]["batch1_tok_s"] / res["llama.cpp"]["batch1_tok_s"]}
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
