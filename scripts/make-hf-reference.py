#!/usr/bin/env python3
"""Writes gateway/tests/data/smollm2_hf_reference.json: HF transformers'
greedy float32 outputs on SmolLM2-135M-Instruct's Q4_1 GGUF, dequantized to
f32 exactly (the reference for issue 12's exact GGUF path).

Not run by CI or setup.sh (it needs torch + transformers, plus the `gguf`
package that make-hf-smollm2.py uses); the JSON it writes is committed.

  VENV/bin/python scripts/make-hf-reference.py GGUF [OUT]   (VENV: torch, transformers, gguf)
"""
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
COMPLETIONS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, Neil Armstrong",
    "The quick brown fox",
    "import numpy as np\n\ndef mean(xs):",
    "A good breakfast should include",
    "The largest planet in our solar system is",
    "To make a cup of tea, first",
]
CHATS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Give me a tip for learning to code.",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
    "What is the boiling point of water?",
    "Suggest a name for a pet cat.",
    "How many days are in a week?",
    "Translate 'thank you' into French.",
]


def write_f32_dir(gguf: Path, out: Path, template_dir: Path) -> None:
    """The HF directory make-hf-smollm2.py writes, with f32 weights (its
    bf16 rounding skipped): the GGUF's exact dequantized values."""
    spec = importlib.util.spec_from_file_location("mk", HERE / "make-hf-smollm2.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    md = mk.read_metadata(reader)
    mk.to_bf16_bits = lambda w: w
    weights = mk.load_weights(reader, md)
    shutil.copytree(template_dir, out, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()},
              str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


def main() -> None:
    gguf = Path(sys.argv[1])
    out_json = Path(sys.argv[2]) if len(sys.argv) > 2 else \
        HERE.parent / "gateway/tests/data/smollm2_hf_reference.json"
    # config, tokenizer and generation config from the bf16 fixture directory.
    template = Path.home() / ".cache/flotilla/fixtures/smollm2-hf"
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "smollm2-f32"
        write_f32_dir(gguf, d, template)
        tok = AutoTokenizer.from_pretrained(d)
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        cases = [{"prompt": p} for p in COMPLETIONS] + \
            [{"messages": [{"role": "user", "content": c}]} for c in CHATS]
        out = []
        for c in cases:
            if "prompt" in c:
                ids = tok(c["prompt"], add_special_tokens=True)["input_ids"]
            else:
                ids = tok.apply_chat_template(c["messages"], add_generation_prompt=True,
                                              tokenize=True)
                if hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            with torch.no_grad():
                g = m.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
            new = g.sequences[0, len(ids):].tolist()
            lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.scores, new)]
            out.append({**c, "prompt_token_ids": ids, "output_token_ids": new,
                        "output_logprobs": [round(v, 5) for v in lps],
                        "text": tok.decode(new, skip_special_tokens=True)})
    import transformers
    source = (f"HF transformers {transformers.__version__}, torch {torch.__version__}, float32, "
              f"greedy, max_new_tokens=32, on {gguf.name} dequantized to f32 "
              "(scripts/make-hf-smollm2.py's reader, no bf16 rounding)")
    out_json.write_text(json.dumps({"source": source, "cases": out}, indent=1))
    print(f"wrote {out_json}: {len(out)} cases")


if __name__ == "__main__":
    main()
