"""Structured outputs through the official `openai` client against the shared
`gateway serve` of SmolLM2: JSON-schema answers validated with `jsonschema`
(the reference validator), regex and choice outputs, a Lark grammar,
streaming and n=4, and the 400s (bad schema, regex or grammar; two
constraints at once) with the rest of the batch undisturbed.

SmolLM2-135M writes odd JSON; what is checked is that it is valid."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from conftest import MODEL_NAME

ASK = "Reply with a JSON object that describes a person."

# Small schemas (bounded strings and arrays) so answers fit in MAX_TOKENS.
STR = {"type": "string", "maxLength": 12}
MAX_TOKENS = 160

SCHEMAS = {
    "flat_object": {
        "type": "object",
        "properties": {"name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "booleans_and_null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["ok", "nothing"],
        "additionalProperties": False,
    },
    "string_enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    "mixed_enum": {"enum": ["a", 1, True, None]},
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "person"}, "name": STR},
        "required": ["kind", "name"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": STR,
                    "address": {
                        "type": "object",
                        "properties": {"city": STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    "array_of_integers": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 99},
        "minItems": 1,
        "maxItems": 4,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}, "tag": STR},
                    "required": ["id", "tag"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "array",
        "items": {"enum": ["x", "y", "z"]},
        "minItems": 2,
        "maxItems": 3,
    },
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": 0, "maximum": 9}],
        "items": False,
        "minItems": 2,
    },
    "ref_to_defs": {
        "$defs": {"point": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                           "y": {"type": "integer", "minimum": -9, "maximum": 9}},
            "required": ["x", "y"],
            "additionalProperties": False,
        }},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "ref_to_definitions": {
        "definitions": {"name": {"type": "string", "minLength": 1, "maxLength": 10}},
        "type": "object",
        "properties": {"first": {"$ref": "#/definitions/name"}, "last": {"$ref": "#/definitions/name"}},
        "required": ["first", "last"],
        "additionalProperties": False,
    },
    "ref_array_items": {
        "$defs": {"tag": {"enum": ["new", "old"]}},
        "type": "array",
        "items": {"$ref": "#/$defs/tag"},
        "minItems": 1,
        "maxItems": 3,
    },
    "nested_refs": {
        "$defs": {
            "leaf": {"type": "integer", "minimum": 0, "maximum": 5},
            "pair": {"type": "object", "properties": {"a": {"$ref": "#/$defs/leaf"}, "b": {"$ref": "#/$defs/leaf"}},
                     "required": ["a", "b"], "additionalProperties": False},
        },
        "type": "object",
        "properties": {"pair": {"$ref": "#/$defs/pair"}},
        "required": ["pair"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"enum": ["none"]}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "one_of_objects": {
        "oneOf": [
            {"type": "object", "properties": {"cat": STR}, "required": ["cat"], "additionalProperties": False},
            {"type": "object", "properties": {"dog": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["dog"], "additionalProperties": False},
        ]
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "string_lengths": {
        "type": "object",
        "properties": {"short": {"type": "string", "minLength": 2, "maxLength": 4}},
        "required": ["short"],
        "additionalProperties": False,
    },
    "integer_range": {"type": "integer", "minimum": 10, "maximum": 20},
    "bounded_number": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
        "additionalProperties": False,
    },
    "optional_properties": {
        "type": "object",
        "properties": {"name": STR, "nick": STR},
        "required": ["name"],
        "additionalProperties": False,
    },
    "multiple_types": {
        "type": "object",
        "properties": {"v": {"type": ["string", "null"], "maxLength": 6}},
        "required": ["v"],
        "additionalProperties": False,
    },
    "top_level_string": {"type": "string", "maxLength": 20},
    "all_of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ],
        "additionalProperties": False,
        "properties": {"a": {}, "b": {}},
    },
}


def _chat_json(client, schema, **kw):
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": ASK}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        **kw,
    )


def test_json_schemas_validate(client):
    """20+ schemas at once (one batch): each answer parses and validates."""
    assert len(SCHEMAS) >= 20
    with ThreadPoolExecutor(max_workers=len(SCHEMAS)) as pool:
        futures = {name: pool.submit(_chat_json, client, schema) for name, schema in SCHEMAS.items()}
        results = {name: f.result() for name, f in futures.items()}
    for name, r in results.items():
        choice = r.choices[0]
        assert choice.finish_reason == "stop", f"{name}: {choice.finish_reason}: {choice.message.content!r}"
        value = json.loads(choice.message.content)
        jsonschema.validate(value, SCHEMAS[name])


def test_json_object_and_guided_json_on_completions(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": ASK}], max_tokens=48,
        temperature=0, response_format={"type": "json_object"})
    # json_object: any JSON object. SmolLM2 may ramble inside it; parse when complete.
    content = r.choices[0].message.content
    assert content.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)

    schema = SCHEMAS["flat_object"]
    r = client.completions.create(model=MODEL_NAME, prompt="A person as JSON:", max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"guided_json": schema})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    # The schema as a string, as older clients send it; the current object form.
    r = client.completions.create(model=MODEL_NAME, prompt="A person as JSON:", max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"structured_outputs": {"json": json.dumps(schema)}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_regex_choice_and_grammar(client):
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    r = client.completions.create(model=MODEL_NAME, prompt="Call me at", max_tokens=20, temperature=0,
                                  extra_body={"guided_regex": phone})
    assert re.fullmatch(phone, r.choices[0].text), r.choices[0].text
    assert r.choices[0].finish_reason == "stop"

    choices = ["Paris", "London", "Berlin"]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=10, temperature=0, extra_body={"guided_choice": choices})
    assert r.choices[0].message.content in choices
    r = client.completions.create(model=MODEL_NAME, prompt="Pick one:", max_tokens=10, temperature=0.8, seed=1,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")

    # A Lark grammar (llguidance's syntax): "<number> <op> <number>".
    grammar = 'start: NUMBER " " OP " " NUMBER\nOP: "+" | "-" | "*"\nNUMBER: /[0-9]{1,3}/\n'
    r = client.completions.create(model=MODEL_NAME, prompt="An arithmetic expression:", max_tokens=20,
                                  temperature=0, extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"[0-9]{1,3} [+*-] [0-9]{1,3}", r.choices[0].text), r.choices[0].text


def test_streaming(client):
    schema = SCHEMAS["nested_object"]
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": ASK}], max_tokens=MAX_TOKENS, temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), schema)
    # The same request unstreamed gives the same greedy answer.
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": ASK}], max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    assert r.choices[0].message.content == text

    stream = client.completions.create(model=MODEL_NAME, prompt="Zip code:", max_tokens=10, temperature=0,
                                       stream=True, extra_body={"guided_regex": r"[0-9]{5}"})
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert re.fullmatch(r"[0-9]{5}", text), text


def test_n4_each_choice_follows_the_schema(client):
    schema = SCHEMAS["array_of_objects"]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": ASK}], max_tokens=MAX_TOKENS, n=4,
        temperature=1.0, seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), schema)
    # Streamed n=4 on completions: every choice reassembles to a valid value.
    stream = client.completions.create(model=MODEL_NAME, prompt="Colors:", max_tokens=MAX_TOKENS, n=4,
                                       temperature=1.0, seed=3, stream=True,
                                       extra_body={"guided_json": SCHEMAS["array_of_enums"]})
    texts = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1, 2, 3]
    for t in texts.values():
        jsonschema.validate(json.loads(t), SCHEMAS["array_of_enums"])


BAD = [
    ({"guided_json": {"type": "frobnicate"}}, "guided_json", "Invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
     "response_format", "Invalid JSON schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "Invalid regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "Invalid grammar"),
    ({"guided_grammar": 'root ::= "a"'}, "guided_grammar", "GBNF"),
    ({"guided_choice": []}, "guided_choice", "empty"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex", "only use one kind"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "response_format", "only use one kind"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema.schema"),
]


@pytest.mark.parametrize("body,param,text", BAD, ids=[b[2] + "-" + b[1] for b in BAD])
def test_bad_constraints_are_400s(client, body, param, text):
    extra = dict(body)
    rf = extra.pop("response_format", None)
    kw = {"response_format": rf} if rf is not None else {}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, extra_body=extra, **kw)
    err = e.value.response.json()["error"]
    assert e.value.status_code == 400
    assert err["type"] == "BadRequestError"
    assert err["param"] == param, err
    assert text in err["message"], err


def test_bad_constraints_leave_the_batch_alone(client):
    """A plain request and a constrained one run while bad ones are refused."""
    plain_kw = dict(model=MODEL_NAME, prompt="The capital of France is", max_tokens=24, temperature=0)
    alone = client.completions.create(**plain_kw).choices[0].text

    def bad(i):
        try:
            client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=4,
                                      extra_body={"guided_regex": "((" if i % 2 else "["})
        except openai.BadRequestError:
            return "400"
        return "accepted"

    with ThreadPoolExecutor(max_workers=8) as pool:
        plain = pool.submit(client.completions.create, **plain_kw)
        choice = pool.submit(client.completions.create, model=MODEL_NAME, prompt="Answer yes or no:", max_tokens=5,
                             temperature=0, extra_body={"guided_choice": ["yes", "no"]})
        bads = list(pool.map(bad, range(6)))
        assert bads == ["400"] * 6
        assert plain.result().choices[0].text == alone
        assert choice.result().choices[0].text in ("yes", "no")
