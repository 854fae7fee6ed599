#!/usr/bin/env python3
"""Cost of tool-call parsing on streamed chat (issue 11, item 2).

One `gateway serve` of SmolLM2 with the hermes-style test template,
--enable-auto-tool-choice and --tool-call-parser hermes. The same prompt (a
conversation that makes SmolLM2 write a <tool_call> block, tools in the
template) is streamed greedily with EOS ignored, once with `tool_choice:
"auto"` (every delta goes through the hermes parser) and once with
`tool_choice: "none"` (the peer: identical prompt and tokens, no parsing).
Requests alternate between the two so that machine noise hits both alike.

  python3 bench/tool_calls.py [--gateway target/release/gateway] [--requests 8] [--new-tokens 128]
"""
import argparse
import json
import os
import statistics
import sys
import time

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

from conftest import MODEL_NAME, start_server  # noqa: E402
from test_tool_calls import TEMPLATE, TOOLS, TWO_SHOT  # noqa: E402


def timed(client, choice, new_tokens):
    t0 = time.perf_counter()
    calls = 0
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=TWO_SHOT, tools=TOOLS, tool_choice=choice, stream=True,
        max_tokens=new_tokens, temperature=0, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True})
    tokens = 0
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            calls += sum(1 for d in (c.delta.tool_calls or []) if d.id)
    return time.perf_counter() - t0, tokens, calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", default=os.path.join(ROOT, "target", "release", "gateway"))
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    os.environ["FLOTILLA_GATEWAY_BIN"] = args.gateway
    server = start_server(["--chat-template", TEMPLATE, "--enable-auto-tool-choice",
                           "--tool-call-parser", "hermes", "--disable-log-requests"])
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
        timed(client, "auto", 8)  # warm-up
        runs = {"auto": [], "none": []}
        for _ in range(args.requests):
            for choice in ("auto", "none"):
                secs, tokens, calls = timed(client, choice, args.new_tokens)
                assert tokens == args.new_tokens, tokens
                assert (calls >= 1) == (choice == "auto"), (choice, calls)
                runs[choice].append(secs / tokens * 1000)
        auto, none = statistics.median(runs["auto"]), statistics.median(runs["none"])
        print(json.dumps({
            "gateway": args.gateway, "requests": args.requests, "new_tokens": args.new_tokens,
            "ms_per_token_auto_parsed": round(auto, 3), "ms_per_token_none_peer": round(none, 3),
            "ratio_auto_over_none": round(auto / none, 4),
        }, indent=1))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
