"""Schemathesis against a live gateway: the OpenAPI document says what the
server accepts and answers (issue 14, item 5).

All checks on, three phases (examples, coverage, fuzzing), -n 30 cases per
operation for fuzzing, one worker (the cases share the engine and a
request_id may repeat): about 1,480 generated cases without a key and 1,150
with one (the /v1 operations only), both runs under 2 minutes together on a
loaded 2-core machine. The server runs SmolLM2 with a 128-token context so that
generation stays short; schemathesis_hooks.py bounds what a valid case may
ask for to that context and says why.
"""

import json
import os
import re
import subprocess
import sys

import requests

from conftest import API_KEY, start_server
from schemathesis_hooks import MAX_MODEL_LEN, VOCAB_SIZE

HOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemathesis_hooks.py")
CASES_PER_OPERATION = 30
RUN_TIMEOUT_S = 300


def small_context_server(extra=()):
    return start_server(args_for=lambda gguf, port: [
        gguf, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8", *extra])


def run_schemathesis(server, workdir, *extra):
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.root}/openapi.json",
           "--checks", "all", "-n", str(CASES_PER_OPERATION),
           "--phases", "examples,coverage,fuzzing", "--continue-on-failure", "-w", "1",
           "--suppress-health-check", "all", *extra]
    env = dict(os.environ, SCHEMATHESIS_HOOKS=HOOKS, NO_COLOR="1")
    # schemathesis keeps a cache in its working directory: not in the repository.
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S,
                          cwd=workdir)
    out = done.stdout + done.stderr
    generated = re.search(r"(\d+) generated", out)
    print(out[-3000:])
    assert generated, f"no case count in schemathesis' output:\n{out[-5000:]}"
    print(f"schemathesis generated {generated.group(1)} cases")
    assert done.returncode == 0, f"schemathesis found failures:\n{out[-20000:]}"
    assert "Server error" not in out, out[-20000:]
    return int(generated.group(1))


def test_schemathesis_finds_nothing(tmp_path):
    server = small_context_server()
    try:
        doc = requests.get(f"{server.root}/openapi.json", timeout=10).json()
        # The hooks' bounds are this server's: keep them in step with the document.
        tokens = doc["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]
        assert tokens["items"]["maximum"] == VOCAB_SIZE - 1
        assert "securitySchemes" not in doc["components"]
        assert "/v1/embeddings" not in doc["paths"]
        assert run_schemathesis(server, tmp_path) > 500
        code = server.stop()
        assert code == 0, f"gateway exited with {code}:\n{server.log_tail()}"
    finally:
        server.stop()


def test_schemathesis_with_an_api_key(tmp_path):
    server = small_context_server(["--api-key", API_KEY])
    try:
        doc = requests.get(f"{server.root}/openapi.json", timeout=10).json()
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        models = doc["paths"]["/v1/models"]["get"]
        assert models["security"] == [{"bearer": []}] and "401" in models["responses"]
        # Only the /v1 operations: the others are the same as without a key.
        assert run_schemathesis(server, tmp_path, "-H", f"Authorization: Bearer {API_KEY}",
                                "--include-path-regex", "^/v1/") > 100
    finally:
        server.stop()
