"""`gateway serve --config FILE.yaml` (vLLM's `--config`): a real server on
SmolLM2 set up from a YAML file, answering through the official `openai`
client, with command-line flags over the file's."""

import os
import subprocess
import tempfile

import openai
import pytest

from conftest import REPO, start_server

PROMPT = "The capital of France is"


def write_config(text):
    f = tempfile.NamedTemporaryFile("w", prefix="gateway-config-", suffix=".yaml", delete=False)
    f.write(text)
    f.close()
    return f.name


@pytest.fixture(scope="module")
def config_server():
    paths = []

    def args_for(gguf, port):
        # The model, the listening address, a list, a default-true switch
        # turned off and the engine sizes all come from the file; the command
        # line overrides max-model-len.
        path = write_config(
            f"model: {gguf}\n"
            "host: 127.0.0.1\n"
            f"port: {port}\n"
            "served_model_name: [smol-from-file, smol-alias]\n"
            "max-model-len: 512\n"
            "num-gpu-blocks-override: 128\n"
            "enable-prefix-caching: false\n"
            "hf-overrides: {}\n"
        )
        paths.append(path)
        return ["--config", path, "--max-model-len", "1024"]

    server = start_server(args_for=args_for)
    yield server
    code = server.stop()
    for p in paths:
        os.unlink(p)
    assert code == 0, f"gateway exited with {code} on SIGTERM:\n{server.log_tail()}"


def test_openai_client_against_a_server_from_a_config_file(config_server):
    client = openai.OpenAI(base_url=config_server.base_url, api_key="unused", max_retries=0, timeout=120)
    models = client.models.list()
    assert [m.id for m in models.data] == ["smol-from-file", "smol-alias"]
    # The command line's --max-model-len won over the file's 512.
    assert models.data[0].model_extra["max_model_len"] == 1024
    r = client.completions.create(model="smol-alias", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text.startswith(" Paris"), r.choices[0].text
    chat = client.chat.completions.create(
        model="smol-from-file",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content.strip(), chat.choices[0].message.content


def test_bad_config_file_fails_before_loading_with_key_and_line():
    binary = os.environ.get("FLOTILLA_GATEWAY_BIN", os.path.join(REPO, "target", "debug", "gateway"))
    if not os.path.isfile(binary):
        pytest.fail(f"gateway binary not found at {binary}")
    path = write_config("port: 8000\nmax-num-seqs: many\n")
    try:
        out = subprocess.run([binary, "serve", "model.gguf", "--config", path],
                             capture_output=True, text=True, timeout=30)
    finally:
        os.unlink(path)
    assert out.returncode != 0
    assert f"config file {path}, line 2: 'max-num-seqs': expected a whole number" in out.stderr, out.stderr
