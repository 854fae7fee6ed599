#!/usr/bin/env python3
"""Fetches llama.cpp's vocab-only GGUF files and their expected token ids.

The PyPI sdist of llama-cpp-python vendors llama.cpp's models/ folder:
ggml-vocab-NAME.gguf (a tokenizer with no weights), NAME.gguf.inp (test texts)
and NAME.gguf.out (the ids Hugging Face's tokenizer gives for them). Only the
vocabularies that gateway/tests/tokenizer_real_vocab.rs uses are extracted,
into ${FLOTILLA_FIXTURES:-~/.cache/flotilla/fixtures}/llama-vocab/.
Python 3.11 standard library only; idempotent.
"""

import hashlib
import json
import os
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
MODELS_DIR = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models"
# Keep in step with gateway/tests/tokenizer_real_vocab.rs.
VOCABS = [
    "llama-spm",
    "phi-3",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "gpt-2",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
    "deepseek-coder",
    "falcon",
    # Its pre-tokenizer is unsupported: the test checks the error.
    "deepseek-llm",
]
SUFFIXES = (".gguf", ".gguf.inp", ".gguf.out")


def wanted_files() -> list[str]:
    return [f"ggml-vocab-{v}{s}" for v in VOCABS for s in SUFFIXES]


def fixture_dir() -> Path:
    root = os.environ.get("FLOTILLA_FIXTURES") or str(
        Path.home() / ".cache" / "flotilla" / "fixtures"
    )
    return Path(root) / "llama-vocab"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.load(r)


def find_sdist() -> tuple[str, str]:
    """(absolute url, sha256) of the sdist, from PyPI's JSON API."""
    # Some indexes serve only the project-level document; both carry the files.
    candidates = [
        f"https://pypi.org/pypi/{PACKAGE}/{VERSION}/json",
        f"https://pypi.org/pypi/{PACKAGE}/json",
    ]
    errors = []
    for json_url in candidates:
        try:
            doc = get_json(json_url)
        except OSError as e:
            errors.append(f"{json_url}: {e}")
            continue
        # The version document lists its files in "urls", the project one
        # per version in "releases".
        if json_url.endswith(f"/{VERSION}/json"):
            files = doc.get("urls") or []
        else:
            files = doc.get("releases", {}).get(VERSION) or []
        for f in files:
            if f.get("packagetype") == "sdist" and f.get("filename", "").endswith(".tar.gz"):
                # Mirrors may answer with a url relative to the JSON document.
                return urllib.parse.urljoin(json_url, f["url"]), f["digests"]["sha256"]
        errors.append(f"{json_url}: no sdist for {VERSION}")
    sys.exit("cannot find the %s %s sdist:\n  %s" % (PACKAGE, VERSION, "\n  ".join(errors)))


def download(url: str, sha256: str, dest: Path) -> None:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as r, open(dest, "wb") as out:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        sys.exit(f"sha256 mismatch for {url}: got {digest.hexdigest()}, want {sha256}")


def extract(tarball: Path, names: list[str], target: Path) -> None:
    wanted = {f"{MODELS_DIR}/{n}": n for n in names}
    found = set()
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            name = wanted.get(member.name)
            if name is None or not member.isfile():
                continue
            src = tar.extractfile(member)
            # Write beside the target first so a partial file never looks done.
            tmp = target / (name + ".part")
            with open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            tmp.replace(target / name)
            found.add(name)
    missing = sorted(set(names) - found)
    if missing:
        sys.exit(f"{tarball.name} lacks: {', '.join(missing)}")


def main() -> None:
    target = fixture_dir()
    missing = [n for n in wanted_files() if not (target / n).is_file()]
    if not missing:
        print(f"vocab fixtures present in {target}")
        return
    target.mkdir(parents=True, exist_ok=True)
    url, sha256 = find_sdist()
    print(f"downloading {url} ({len(missing)} vocab files missing)", flush=True)
    with tempfile.TemporaryDirectory(prefix="flotilla-vocab-") as tmp:
        tarball = Path(tmp) / f"llama_cpp_python-{VERSION}.tar.gz"
        download(url, sha256, tarball)
        extract(tarball, missing, target)
    print(f"vocab fixtures written to {target}")


if __name__ == "__main__":
    main()
