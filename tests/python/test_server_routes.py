"""Non-OpenAI routes: tokenize/detokenize, health, ping, version, metrics,
OpenAPI, and freeing a disconnected client's KV blocks."""

import json
import time

import requests

from conftest import MAX_MODEL_LEN, MODEL_NAME
from helpers import metrics, tokenize


def test_tokenize_detokenize_round_trip(server):
    text = "Hello world, this is Flotilla."
    t = tokenize(server, prompt=text, add_special_tokens=False)
    assert t["count"] == len(t["tokens"]) > 0
    assert t["max_model_len"] == MAX_MODEL_LEN
    r = requests.post(f"{server.root}/detokenize", json={"model": MODEL_NAME, "tokens": t["tokens"]}, timeout=10)
    assert r.status_code == 200 and r.json()["prompt"] == text
    chat = tokenize(server, messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat["count"] > t["count"] // 4
    bad = requests.post(f"{server.root}/detokenize", json={"tokens": [10**9]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_health_ping_version_openapi(server):
    h = requests.get(f"{server.root}/health", timeout=10)
    assert h.status_code == 200 and h.content == b""
    assert requests.get(f"{server.root}/ping", timeout=10).status_code == 200
    assert requests.post(f"{server.root}/ping", timeout=10).status_code == 200
    v = requests.get(f"{server.root}/version", timeout=10).json()
    assert v["version"]
    doc = requests.get(f"{server.root}/openapi.json", timeout=10).json()
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/metrics"):
        assert path in doc["paths"]


def test_metrics_names(server, client):
    client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    values, text = metrics(server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:request_success_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total"):
        assert name in values, name
    for hist in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds"):
        assert f"{hist}_bucket" in values and f"{hist}_count" in values, hist
    assert f'model_name="{MODEL_NAME}"' in text
    assert values["vllm:generation_tokens_total"] >= 1


def test_client_disconnect_frees_blocks(server):
    body = {"model": MODEL_NAME, "prompt": "Tell me a very long story about the sea.", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True}
    before, _ = metrics(server)
    r = requests.post(f"{server.base_url}/completions", json=body, stream=True, timeout=60)
    assert r.status_code == 200
    # One iterator kept alive: dropping a urllib3 chunk generator closes the socket.
    lines = r.iter_lines()
    got = 0
    while got < 3:
        line = next(lines)
        if line.startswith(b"data: ") and json.loads(line[6:])["choices"]:
            got += 1
    values, _ = metrics(server)
    assert values["vllm:num_requests_running"] == 1
    assert values["vllm:kv_cache_usage_perc"] > 0
    # Close the socket under the stream: the server must abort the request.
    r.close()
    del lines
    deadline = time.monotonic() + 15
    while True:
        values, _ = metrics(server)
        if values["vllm:num_requests_running"] == 0 and values["vllm:kv_cache_usage_perc"] == 0:
            break
        assert time.monotonic() < deadline, f"blocks not freed: {values}"
        time.sleep(0.2)
    # Finished as an abort, not by running to max_tokens.
    generated = values["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < 1500
