"""Tool calling (issue 11, item 2) through the official openai client on
SmolLM2, served with a hermes-style tool template
(templates/hermes_tools.jinja), --enable-auto-tool-choice and
--tool-call-parser hermes. One server for the module.

The rendered prompts are checked against transformers' own renderer;
what SmolLM2 answers under `auto` is whatever it is, so those tests check
that the reply parses consistently (streamed equals non-streamed, calls are
well-formed, arguments are what json.dumps writes), not that it calls.
`required` and named choices are enforced through structured outputs (the
JSON schema vLLM builds from the tools), so their calls must validate."""

import json
import os

import jsonschema
import openai
import pytest
import requests

from conftest import MODEL_NAME, start_server

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "hermes_tools.jinja")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}
TOOLS = [WEATHER, TIME]

# A worked example first, so that a small model has the format in front of it.
FEW_SHOT = [
    {"role": "system", "content": "You are a helpful assistant that calls functions."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"sunny\"}"},
    {"role": "assistant", "content": "It is 21 degrees and sunny in Paris."},
    {"role": "user", "content": "What is the weather in London?"},
]



def worked_call(call_id, city):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function",
         "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}


# Two calls in a row: SmolLM2 (greedy) writes the third in the same format.
TWO_SHOT = [
    {"role": "user", "content": "Weather in Paris?"}, worked_call("call_1", "Paris"),
    {"role": "user", "content": "Weather in Berlin?"}, worked_call("call_2", "Berlin"),
    {"role": "user", "content": "Weather in London?"},
]


@pytest.fixture(scope="module")
def tool_server():
    s = start_server(["--chat-template", TEMPLATE, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    yield s
    code = s.stop()
    assert code == 0, f"gateway exited with {code}:\n{s.log_tail()}"


@pytest.fixture(scope="module")
def tc(tool_server):
    return openai.OpenAI(base_url=tool_server.base_url, api_key="unused", max_retries=0, timeout=120)


def reference_prompt(messages, tools):
    """transformers' rendering, with tool-call arguments parsed as vLLM passes them."""
    from transformers.utils.chat_template_utils import render_jinja_template

    msgs = json.loads(json.dumps(messages))
    for m in msgs:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    with open(TEMPLATE) as f:
        template = f.read()
    rendered, _ = render_jinja_template([msgs], tools=tools, chat_template=template, add_generation_prompt=True)
    return rendered[0]


def served_prompt(server, messages, tools):
    body = {"model": MODEL_NAME, "messages": messages}
    if tools is not None:
        body["tools"] = tools
    r = requests.post(f"{server.root}/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    r = requests.post(f"{server.root}/detokenize", json={"model": MODEL_NAME, "tokens": tokens}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["prompt"], len(tokens)


def test_tools_and_tool_results_reach_the_template(tool_server):
    prompt, _ = served_prompt(tool_server, FEW_SHOT, TOOLS)
    assert prompt == reference_prompt(FEW_SHOT, TOOLS)
    assert '"name": "get_time"' in prompt and "<tool_response id=\"call_1\">" in prompt
    plain, _ = served_prompt(tool_server, FEW_SHOT[-1:], None)
    assert plain == reference_prompt(FEW_SHOT[-1:], None) and "<tools>" not in plain


def test_tool_choice_none_shows_tools_but_does_not_parse(tc, tool_server):
    _, n_prompt = served_prompt(tool_server, FEW_SHOT, TOOLS)
    r = tc.chat.completions.create(model=MODEL_NAME, messages=FEW_SHOT, tools=TOOLS, tool_choice="none",
                                   max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert r.usage.prompt_tokens == n_prompt
    assert not choice.message.tool_calls
    assert choice.message.content is not None
    assert choice.finish_reason in ("stop", "length")


def check_call(call):
    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
    assert call.function.name in {t["function"]["name"] for t in TOOLS}
    args = json.loads(call.function.arguments)
    # Re-serialized the way vLLM's json.dumps writes arguments.
    assert call.function.arguments == json.dumps(args, ensure_ascii=False)


def reassemble(stream):
    """(content, [(id, name, arguments)], finish_reason) from streamed chunks,
    checking vLLM's delta shape on the way."""
    content, calls, finish = "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        for d in c.delta.tool_calls or []:
            if d.index == len(calls):
                # A new call: the name whole, with id and type, before any arguments.
                assert d.id and d.id.startswith("chatcmpl-tool-") and d.type == "function", d
                assert d.function.name and not d.function.arguments, d
                calls.append([d.id, d.function.name, ""])
            else:
                assert d.index == len(calls) - 1 and d.id is None and d.function.name is None, d
                calls[d.index][2] += d.function.arguments
        finish = c.finish_reason or finish
    return content, [tuple(c) for c in calls], finish


@pytest.mark.parametrize("messages", [TWO_SHOT, FEW_SHOT, FEW_SHOT[-1:]], ids=["two-shot", "few-shot", "plain"])
def test_auto_parses_whatever_the_model_writes(tc, messages):
    kw = dict(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=48, temperature=0)
    r = tc.chat.completions.create(**kw)
    choice = r.choices[0]
    calls = choice.message.tool_calls or []
    if messages is TWO_SHOT:
        # Makes sure the call path runs end to end; should a different
        # SmolLM2 build stop copying the format, pick another prompt.
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
            [("get_weather", {"city": "London"})], choice
    for call in calls:
        check_call(call)
    if calls:
        assert choice.finish_reason == "tool_calls"
        assert "<tool_call>" not in (choice.message.content or "")
    else:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content is not None
    content, streamed_calls, finish = reassemble(tc.chat.completions.create(stream=True, **kw))
    assert finish == choice.finish_reason
    assert [(n, a) for _, n, a in streamed_calls] == [(c.function.name, c.function.arguments) for c in calls]
    assert content == (choice.message.content or "")


def test_tool_result_round_trip(tc, tool_server):
    messages = FEW_SHOT[:4]
    prompt, _ = served_prompt(tool_server, messages, TOOLS)
    assert prompt == reference_prompt(messages, TOOLS)
    r = tc.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=16, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def bad_request(client, **kw):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=FEW_SHOT[-1:], max_tokens=4, **kw)
    body = e.value.body
    err = body.get("error", body) if isinstance(body, dict) else {}
    return err.get("message", str(e.value)), err.get("param")


def test_400_cases(tc, client):
    # The default server has no --enable-auto-tool-choice: vLLM's answer.
    msg, param = bad_request(client, tools=TOOLS)
    assert msg == '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
    assert param == "tool_choice"
    msg, _ = bad_request(tc, tool_choice="auto")
    assert msg == "When using `tool_choice`, `tools` must be set."
    msg, _ = bad_request(tc, tools=TOOLS, tool_choice="always")
    assert msg.startswith("Invalid value for `tool_choice`: always!")
    msg, _ = bad_request(tc, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert msg == "The tool specified in `tool_choice` does not match any of the specified `tools`"
    msg, param = bad_request(tc, tools=[{"type": "function", "function": {"description": "no name"}}])
    assert "tools[0]" in msg and param == "tools"
    # A tool choice enforced by structured outputs takes no second constraint.
    msg, param = bad_request(tc, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert msg == "tool_choice 'required' cannot be combined with response_format: both constrain the output"
    assert param == "tool_choice"
    # The server keeps serving.
    r = tc.chat.completions.create(model=MODEL_NAME, messages=FEW_SHOT[-1:], max_tokens=2)
    assert r.choices[0].message.content is not None


def test_required_yields_valid_calls(tc):
    kw = dict(model=MODEL_NAME, messages=FEW_SHOT, tools=TOOLS, tool_choice="required", max_tokens=64, temperature=0)
    r = tc.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in choice.message.tool_calls:
        check_call(call)
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    _, streamed, finish = reassemble(tc.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls"
    assert [(n, a) for _, n, a in streamed] == [(c.function.name, c.function.arguments)
                                                for c in choice.message.tool_calls]


def test_named_choice_yields_that_call(tc):
    kw = dict(model=MODEL_NAME, messages=FEW_SHOT, tools=TOOLS, max_tokens=64, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_time"}})
    r = tc.chat.completions.create(**kw)
    choice = r.choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])
    # vLLM: a named call finishes with "stop".
    assert choice.finish_reason == "stop"
    _, streamed, _ = reassemble(tc.chat.completions.create(stream=True, **kw))
    assert [(n, a) for _, n, a in streamed] == [("get_time", call.function.arguments)]
