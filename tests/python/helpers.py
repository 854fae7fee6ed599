"""Small helpers shared by the OpenAI-client tests."""

import re

import requests

from conftest import MODEL_NAME

_METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def metrics(server):
    """{metric name: summed value over label sets} from /metrics."""
    text = requests.get(f"{server.root}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _METRIC.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out, text


def tokenize(server, **body):
    r = requests.post(f"{server.root}/tokenize", json={"model": MODEL_NAME, **body}, timeout=30)
    r.raise_for_status()
    return r.json()


def sse_events(response):
    """The `data:` payloads of an SSE response, in order."""
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            out.append(line[len("data: "):])
    return out
