"""The decoder's shape, read from a Hugging Face `config.json` (Qwen3, Qwen2/2.5, Llama)."""

import dataclasses
import json
import os

SUPPORTED = ("qwen3", "qwen2", "llama")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: biases on q/k/v
    qk_norm: bool  # Qwen3: RMSNorm on q and k per head, before RoPE

    @classmethod
    def from_dict(cls, c: dict, source: str = "config") -> "ModelConfig":
        model_type = c.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (supported: {SUPPORTED})")
        if c.get("rope_scaling"):
            raise ValueError(f"{source}: rope_scaling {c['rope_scaling']!r} is not supported")
        num_heads = c["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=c.get("num_key_value_heads") or num_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
            intermediate_size=c["intermediate_size"],
            rope_theta=float(c.get("rope_theta", 10000.0)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            # Qwen2 configs often omit attention_bias although the checkpoints carry q/k/v biases.
            attention_bias=bool(c.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
        )

    @classmethod
    def from_hf(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no config.json; is {model_dir!r} a Hugging Face checkpoint folder?")
        with open(path) as f:
            return cls.from_dict(json.load(f), source=path)
