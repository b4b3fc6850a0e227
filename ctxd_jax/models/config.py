"""The decoder's shape, read from a Hugging Face `config.json` (Qwen3, Qwen2/2.5, Llama 3.x).

Fields are read as transformers reads them for each family (its defaults where the file omits one); a field that
would change the math in a way not built here is refused, naming it, rather than loaded as something else.
"""

import dataclasses
import json
import os

from ctxd_jax.models.rope import Rope, read_rope

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# transformers' defaults per family for fields a config.json may omit (None: hidden_size // heads).
FAMILIES = {
    "qwen3": dict(head_dim=128, max_position_embeddings=32768),
    "qwen2": dict(head_dim=None, max_position_embeddings=32768),
    "llama": dict(head_dim=None, max_position_embeddings=2048),
}
SUPPORTED = tuple(FAMILIES)
# Fields whose other values change the math and are not built, with the one value accepted (also the default).
FIXED = {"hidden_act": "silu", "quantization_config": None}


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
    rope: Rope
    rms_norm_eps: float
    tie_word_embeddings: bool
    biases: tuple[str, ...]  # projections with a bias: Qwen2 q/k/v; Llama attention_bias q/k/v/o, mlp_bias the MLP
    qk_norm: bool  # Qwen3: RMSNorm on q and k per head, before RoPE

    @classmethod
    def from_dict(cls, c: dict, source: str = "config") -> "ModelConfig":
        model_type = c.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (supported: {SUPPORTED})")
        for field, value in FIXED.items():
            if c.get(field, value) != value:
                raise ValueError(f"{source}: {field} {c[field]!r} is not supported (only {value!r})")
        family = FAMILIES[model_type]
        num_heads, num_layers = c["num_attention_heads"], c["num_hidden_layers"]
        _refuse_sliding_window(c, model_type, num_layers, source)
        head_dim = c.get("head_dim") or family["head_dim"] or c["hidden_size"] // num_heads
        max_positions = c.get("max_position_embeddings") or family["max_position_embeddings"]
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=c.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=c["intermediate_size"],
            rope=read_rope(c, head_dim=head_dim, max_position_embeddings=max_positions, source=source),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            biases=_biases(c, model_type, source),
            qk_norm=model_type == "qwen3",
        )

    @classmethod
    def from_hf(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no config.json; is {model_dir!r} a Hugging Face checkpoint folder?")
        with open(path) as f:
            return cls.from_dict(json.load(f), source=path)


def _biases(c: dict, model_type: str, source: str) -> tuple[str, ...]:
    if model_type == "qwen2":  # transformers and vLLM give Qwen2 q/k/v biases whatever attention_bias says
        return ATTN[:3]
    if model_type == "qwen3":  # Qwen3 has no mlp_bias field: transformers ignores it
        if c.get("attention_bias"):
            # transformers puts a bias on o_proj too, vLLM does not: the two would serve different models.
            raise ValueError(f"{source}: attention_bias true is not supported for qwen3")
        return ()
    return (ATTN if c.get("attention_bias") else ()) + (MLP if c.get("mlp_bias") else ())


def _refuse_sliding_window(c: dict, model_type: str, num_layers: int, source: str):
    """Qwen2/3 layers may attend within a window (Llama has no such field): not built, so refused."""
    if model_type == "llama":
        return
    if c.get("layer_types") is not None:
        other = sorted(set(c["layer_types"]) - {"full_attention"})
        if other:
            raise ValueError(f"{source}: layer_types {other} is not supported (only full_attention)")
        return
    # transformers' rule when layer_types is absent: layers from max_window_layers on slide, if use_sliding_window.
    window, first = c.get("sliding_window", 4096), c.get("max_window_layers", 28)
    if c.get("use_sliding_window") and window is not None and first < num_layers:
        raise ValueError(f"{source}: use_sliding_window true is not supported (layers from max_window_layers "
                         f"{first} on would attend within sliding_window {window})")
