"""HTTPS on the API server (vLLM's --ssl-keyfile, --ssl-certfile,
--ssl-ca-certs, --ssl-cert-reqs), through the official `openai` client:
a CA, a server certificate for 127.0.0.1 and a client certificate are made
with the openssl CLI for each run."""

import os
import shutil
import ssl
import subprocess
import tempfile
import time

import openai
import pytest
import requests

from conftest import MODEL_NAME, REPO, free_port, smollm2_gguf


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki():
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make test certificates")
    d = tempfile.mkdtemp(prefix="flotilla-tls-")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Flotilla test CA",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("client", "extendedKeyUsage=clientAuth")]:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    yield {k: os.path.join(d, k) for k in os.listdir(d)}
    shutil.rmtree(d, ignore_errors=True)


def start_tls_server(pki, extra=()):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("SmolLM2 GGUF not found (scripts/setup.sh)")
    binary = os.environ.get("FLOTILLA_GATEWAY_BIN", os.path.join(REPO, "target", "debug", "gateway"))
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="gateway-tls-", suffix=".log", delete=False)
    cmd = [binary, "serve", gguf, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", MODEL_NAME, "--max-model-len", "512", "--num-gpu-blocks-override", "64",
           "--ssl-keyfile", pki["server.key"], "--ssl-certfile", pki["server.crt"], *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    cert = (pki["client.crt"], pki["client.key"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gateway exited: {open(log.name).read()[-3000:]}")
        try:
            if requests.get(f"https://127.0.0.1:{port}/health", verify=pki["ca.crt"], cert=cert,
                            timeout=2).status_code == 200:
                return proc, port
        except requests.RequestException:
            pass
        time.sleep(0.25)
    proc.kill()
    pytest.fail(f"gateway not healthy over https: {open(log.name).read()[-3000:]}")


def trusting(pki, client_cert=False):
    """An SSL context that trusts the test CA (and presents the client certificate)."""
    ctx = ssl.create_default_context(cafile=pki["ca.crt"])
    if client_cert:
        ctx.load_cert_chain(pki["client.crt"], pki["client.key"])
    return ctx


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)


def test_https_with_the_openai_client(pki):
    proc, port = start_tls_server(pki)
    try:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=trusting(pki), timeout=60))
        r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=3,
                                      temperature=0)
        assert r.choices[0].text.startswith(" Paris"), r.choices[0].text
        # Plain HTTP on the TLS port is refused; the server goes on.
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
        # A client that does not trust the CA refuses the server.
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                          timeout=10).models.list()
        assert requests.get(f"https://127.0.0.1:{port}/health", verify=pki["ca.crt"]).status_code == 200
    finally:
        stop(proc)


def test_client_certificates_required(pki):
    proc, port = start_tls_server(pki, ["--ssl-ca-certs", pki["ca.crt"], "--ssl-cert-reqs", "2"])
    try:
        url = f"https://127.0.0.1:{port}/v1"
        with_cert = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, http_client=openai.DefaultHttpxClient(
            verify=trusting(pki, client_cert=True), timeout=60))
        assert [m.id for m in with_cert.models.list().data] == [MODEL_NAME]
        without = openai.OpenAI(base_url=url, api_key="unused", max_retries=0,
                                http_client=openai.DefaultHttpxClient(verify=trusting(pki), timeout=10))
        with pytest.raises(openai.APIConnectionError):
            without.models.list()
    finally:
        stop(proc)


def test_bad_tls_settings_are_clear_errors(pki):
    binary = os.environ.get("FLOTILLA_GATEWAY_BIN", os.path.join(REPO, "target", "debug", "gateway"))
    gguf = smollm2_gguf() or "model.gguf"
    run = lambda *a: subprocess.run([binary, "serve", gguf, "--port", str(free_port()), *a],
                                    capture_output=True, text=True, timeout=120)
    r = run("--ssl-keyfile", pki["server.key"])
    assert r.returncode != 0 and "--ssl-certfile" in r.stderr, r.stderr
    r = run("--ssl-keyfile", pki["server.key"], "--ssl-certfile", pki["server.crt"], "--ssl-cert-reqs", "2")
    assert r.returncode != 0 and "--ssl-ca-certs" in (r.stderr + r.stdout), r.stderr[-2000:]
    r = run("--ssl-keyfile", pki["client.key"], "--ssl-certfile", pki["server.crt"])
    assert r.returncode != 0 and "--ssl-keyfile" in (r.stderr + r.stdout), r.stderr[-2000:]
