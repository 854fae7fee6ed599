"""Schemathesis hooks for test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

The OpenAPI document states every limit JSON Schema can express (types,
ranges, enums, the served model names, token ids below the vocabulary size,
max_tokens up to the context, stream_options only with stream). A few of the
server's checks are semantic and cannot be written in a schema; a
schema-valid body can still break them and get vLLM's 400, which
schemathesis would report as "schema-valid request rejected". For those, and
only for bodies generated as valid (negative cases are sent as generated),
this hook repairs the body to what the test server can serve:

- the prompt's length in tokens plus max_tokens must fit the context
  (vLLM's "This model's maximum context length is ..."): prompts are cut to
  a byte budget, since a byte-level BPE never makes more tokens than bytes;
- min_tokens may not exceed max_tokens;
- best_of must equal n (the only value this server supports);
- structured-output constraints must be one at most and compile
  (a regex, a grammar, a JSON schema): they are removed here and tested
  against the real engine in test_structured_outputs.py;
- a per-request chat_template (and chat_template_kwargs, which can rebind
  the template's variables) must render: removed, for the same reason;
- logit_bias keys must be token ids of the vocabulary: others are dropped.

It also bounds the work one case asks for (n, the number of prompts,
max_tokens) so that the run stays within minutes on a 2-core CI machine.
"""

import re

import schemathesis

# The test server (test_schemathesis.py starts it with this context); the
# vocabulary is SmolLM2's, which the test checks against the document.
MAX_MODEL_LEN = 128
VOCAB_SIZE = 49152
# What one case may generate at most, and what the chat template adds
# around the messages (SmolLM2's default system prompt and role markers).
MAX_NEW_TOKENS = 4
TEMPLATE_OVERHEAD = 48
MAX_ROLE_BYTES = 8
PER_MESSAGE_OVERHEAD = 8 + MAX_ROLE_BYTES
MAX_N = 2
MAX_PROMPTS = 2

STRUCTURED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
              "guided_whitespace_pattern", "structured_outputs", "response_format")
TEMPLATE = ("chat_template", "chat_template_kwargs")


def _cut(text, budget):
    """The longest prefix of `text` of at most `budget` UTF-8 bytes."""
    data = text.encode("utf-8", "surrogatepass")[:max(budget, 0)]
    return data.decode("utf-8", "ignore")


def _fit_prompt(prompt, budget):
    if isinstance(prompt, str):
        return _cut(prompt, budget) or "x"
    if isinstance(prompt, list):
        prompt = prompt[:MAX_PROMPTS]
        if prompt and isinstance(prompt[0], list):
            return [p[:budget] or [0] for p in prompt]
        if prompt and isinstance(prompt[0], str):
            return [_cut(p, budget) or "x" for p in prompt]
        return prompt[:budget]
    return prompt


def _fit_messages(messages, budget):
    messages = messages[-2:]
    room = budget - TEMPLATE_OVERHEAD - PER_MESSAGE_OVERHEAD * len(messages)
    share = max(room // max(len(messages), 1), 0)
    for m in messages:
        if isinstance(m.get("role"), str):
            m["role"] = _cut(m["role"], MAX_ROLE_BYTES)
        content = m.get("content")
        if isinstance(content, str):
            m["content"] = _cut(content, share)
        elif isinstance(content, list):
            parts = content[:1]
            m["content"] = [_cut(p, share) if isinstance(p, str) else p for p in parts]
            for p in m["content"]:
                for k in ("text", "refusal"):
                    if isinstance(p, dict) and isinstance(p.get(k), str):
                        p[k] = _cut(p[k], share)
    return messages


def _is_num(v):
    # Integers may come as integral floats (10.0), which the server reads as 10.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bound_generation(body, keys):
    limit = None
    for k in keys:
        if _is_num(body.get(k)):
            body[k] = min(body[k], MAX_NEW_TOKENS)
            limit = body[k] if limit is None else min(limit, body[k])
    if _is_num(body.get("min_tokens")):
        body["min_tokens"] = min(body["min_tokens"], limit if limit is not None else MAX_NEW_TOKENS)


@schemathesis.hook
def map_case(context, case):
    meta = getattr(case, "_meta", None)
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return case
    body = case.body
    path = case.operation.path
    if path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        for k in STRUCTURED + TEMPLATE:
            body.pop(k, None)
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {k: v for k, v in body["logit_bias"].items()
                              if re.fullmatch("[0-9]+", k.strip()) and int(k) < VOCAB_SIZE}
    if _is_num(body.get("n")):
        body["n"] = min(body["n"], MAX_N)
    if "best_of" in body and body["best_of"] is not None:
        body["best_of"] = body.get("n") or 1
    budget = MAX_MODEL_LEN - MAX_NEW_TOKENS - 1
    if path == "/v1/completions":
        # Completions default to 16 new tokens: make the bound explicit.
        if not _is_num(body.get("max_tokens")):
            body["max_tokens"] = MAX_NEW_TOKENS
        _bound_generation(body, ("max_tokens",))
        body["prompt"] = _fit_prompt(body["prompt"], budget)
    elif path == "/v1/chat/completions":
        # Chat defaults to the rest of the context: bound it too.
        if not _is_num(body.get("max_tokens")) and not _is_num(body.get("max_completion_tokens")):
            body["max_completion_tokens"] = MAX_NEW_TOKENS
        _bound_generation(body, ("max_tokens", "max_completion_tokens"))
        body["messages"] = _fit_messages(body["messages"], budget)
    return case
