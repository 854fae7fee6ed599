"""The official `openai` client against a real `gateway serve` on SmolLM2."""

import json

import openai
import pytest
import requests

from conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, start_server
from helpers import sse_events, tokenize

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_completion_greedy_paris(client, server):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.choices[0].text.startswith(" Paris"), r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")
    prompt_len = tokenize(server, prompt=PROMPT)["count"]
    assert r.usage.prompt_tokens == prompt_len
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_token_prompts_and_batch(client, server):
    ids = tokenize(server, prompt=PROMPT)["tokens"]
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=4, temperature=0)
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "1, 2, 3,"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text


def test_completion_echo(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith(PROMPT + " Paris")


def test_chat(client, server):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content.strip(), msg.content
    expected = tokenize(server, messages=CHAT, add_generation_prompt=True)["count"]
    assert r.usage.prompt_tokens == expected


def test_chat_max_completion_tokens_and_length(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_completion_tokens=3, temperature=0,
        extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


def test_max_tokens_length(client):
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_streaming_chat(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes and finishes[-1] in ("stop", "length")
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens >= 1
    full = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0)
    assert text == full.choices[0].message.content


def test_streaming_completion_raw_done(client, server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with requests.post(f"{server.base_url}/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text.startswith(" Paris")
    sdk = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in sdk if c.choices) == text


def test_n2(client, server):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, n=2, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.prompt_tokens == tokenize(server, prompt=PROMPT)["count"]
    c = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=7)
    assert sorted(ch.index for ch in c.choices) == [0, 1]
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=4, n=2, temperature=1.0, stream=True)
    seen = {ch.index for chunk in stream for ch in chunk.choices}
    assert seen == {0, 1}


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 4 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    # Greedy: the chosen token is the most likely one.
    assert lp.token_logprobs[0] == pytest.approx(max(lp.top_logprobs[0].values()), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    echo = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1, echo=True)
    elp = echo.choices[0].logprobs
    assert elp.token_logprobs[0] is None
    assert len(elp.tokens) == echo.usage.prompt_tokens + echo.usage.completion_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert bytes(entry.bytes).decode("utf-8", errors="replace") != "" or entry.token == ""
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_stop_string_and_token(client, server):
    base = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[3:6]
    assert stop.strip(), f"baseline too short to pick a stop string from: {text!r}"
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    assert r.choices[0].text == text[: text.index(stop)]

    prompt_ids = tokenize(server, prompt=PROMPT)["tokens"]
    full_ids = tokenize(server, prompt=PROMPT + text)["tokens"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    stop_id = full_ids[len(prompt_ids) + 2]
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"stop_token_ids": [stop_id]})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop_id
    assert r.usage.completion_tokens <= 3
    assert text.startswith(r.choices[0].text)


def test_seed_reproducible(client):
    def sample(seed):
        return client.completions.create(
            model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def error_body(exc):
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_400_bad_param(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=-1)
    err = error_body(e.value)
    assert err["param"] == "temperature" and err["code"] == 400 and err["type"] == "BadRequestError"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, top_logprobs=3)
    assert error_body(e.value)["param"] == "top_logprobs"

    r = requests.post(f"{server.base_url}/completions",
                      json={"model": MODEL_NAME, "prompt": PROMPT, "top_p": "high"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    r = requests.post(f"{server.base_url}/chat/completions", data="{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = requests.post(f"{server.base_url}/completions",
                      json={"model": MODEL_NAME, "prompt": PROMPT, "suffix": "x"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = requests.post(f"{server.base_url}/completions",
                      json={"model": MODEL_NAME, "prompt": PROMPT, "n": 2, "best_of": 3}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_400_prompt_too_long(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="hello " * (MAX_MODEL_LEN + 10), max_tokens=4)
    err = error_body(e.value)
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"]


def test_404_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    err = error_body(e.value)
    assert err["message"] == "The model `nope` does not exist."
    assert err["type"] == "NotFoundError" and err["code"] == 404


def test_401_wrong_key(auth_server):
    bad = openai.OpenAI(base_url=auth_server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert error_body(e.value)["code"] == 401
    good = openai.OpenAI(base_url=auth_server.base_url, api_key=API_KEY, max_retries=0)
    assert good.models.list().data[0].id == MODEL_NAME
    # Only /v1 is guarded, as in vLLM.
    assert requests.get(f"{auth_server.root}/health", timeout=10).status_code == 200
    assert requests.get(f"{auth_server.root}/metrics", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def reasoning_client():
    s = start_server(["--reasoning-parser", "deepseek_r1"])
    yield openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=120)
    s.stop()


def test_reasoning_parser_fields(reasoning_client, client):
    # SmolLM2 never closes a <think>, so under deepseek_r1 its plain answer is
    # all reasoning; the SDK keeps the fields it does not model in model_extra.
    plain = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0)
    r = reasoning_client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0)
    msg = r.choices[0].message
    assert msg.content is None
    assert msg.model_extra["reasoning"] == plain.choices[0].message.content
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"]
    assert "reasoning" not in (plain.choices[0].message.model_extra or {})
    chunks = list(reasoning_client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) == msg.model_extra["reasoning"]
    assert "".join(d.content or "" for d in deltas) == ""
