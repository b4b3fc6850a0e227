"""The one name map between Hugging Face / PEFT safetensors keys and the NNX tree of models/transformer.py.

Loading and both exports go through `base_entries` / `lora_entries`, so a name or a transpose is written once.
Per-layer HF tensors map onto one layer-stacked NNX array (leading axis L): `{i}` in `Entry.hf` is the layer.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from ctxd_jax.models.config import ATTN, MLP, ModelConfig

Path = tuple[str, ...]

LORA_TARGETS = ATTN + MLP
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # HF key; "{i}" stands for the layer index when `stacked`
    path: Path  # flat nnx.state path
    transpose: bool  # HF Linear weights are [out, in], NNX kernels (and LoRA factors, see below) the other way
    stacked: bool  # one NNX array [L, ...] holds the HF tensors of all layers

    def hf_keys(self, num_layers: int) -> list[str]:
        return [self.hf.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf]


def _module(name: str) -> tuple[str, ...]:
    return ("self_attn", name) if name in ATTN else ("mlp", name)


def base_entries(cfg: ModelConfig) -> list[Entry]:
    """Every base (non-LoRA) parameter of `cfg`'s model, in a stable order."""
    out = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), False, False)]
    layer = "model.layers.{i}."
    out.append(Entry(layer + "input_layernorm.weight", ("layers", "input_layernorm", "scale"), False, True))
    for name in LORA_TARGETS:
        mod = _module(name)
        out.append(Entry(layer + ".".join(mod) + ".weight", ("layers", *mod, "kernel"), True, True))
        if name in cfg.biases:
            out.append(Entry(layer + ".".join(mod) + ".bias", ("layers", *mod, "bias"), False, True))
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            out.append(Entry(layer + f"self_attn.{name}.weight", ("layers", "self_attn", name, "scale"), False, True))
    out.append(Entry(layer + "post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"),
                     False, True))
    out.append(Entry("model.norm.weight", ("norm", "scale"), False, False))
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), True, False))
    return out


def lora_entries(targets=LORA_TARGETS) -> list[Entry]:
    """PEFT adapter keys: lora_A.weight [r, in] is lora_a[i].T, lora_B.weight [out, r] is lora_b[i].T."""
    out = []
    for name in targets:
        mod = _module(name)
        key = PEFT_PREFIX + "model.layers.{i}." + ".".join(mod)
        out.append(Entry(key + ".lora_A.weight", ("layers", *mod, "lora_a"), True, True))
        out.append(Entry(key + ".lora_B.weight", ("layers", *mod, "lora_b"), True, True))
    return out


def lora_targets(paths) -> list[str]:
    """The module names (q_proj, ...) that carry LoRA factors among flat NNX `paths`."""
    found = {p[-2] for p in paths if p and p[-1] == "lora_a"}
    return [t for t in LORA_TARGETS if t in found]


def to_nnx(entry: Entry, read: Callable[[str], np.ndarray], num_layers: int) -> np.ndarray:
    """Assembles one NNX array from HF tensors; `read(key)` returns a tensor (and raises naming what is missing)."""
    parts = [read(k) for k in entry.hf_keys(num_layers)]
    if entry.transpose:
        parts = [p.T for p in parts]
    return np.stack(parts) if entry.stacked else parts[0]


def to_hf(entry: Entry, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Splits one NNX array into its HF tensors (contiguous, so safetensors can write them)."""
    parts = list(value) if entry.stacked else [value]
    for key, part in zip(entry.hf_keys(len(parts)), parts):
        yield key, np.ascontiguousarray(part.T if entry.transpose else part)


def flat_to_hf(entries: list[Entry], flat: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """{NNX path: array} -> {HF key: tensor}."""
    return {k: v for e in entries for k, v in to_hf(e, np.asarray(flat[e.path]))}
