"""Rotary position embeddings as transformers computes them for Qwen2/2.5/3 and Llama 3.x.

`read_rope` reads a `config.json` in either layout: transformers 4 (top-level `rope_theta`, a `rope_scaling` dict
whose type sits under `type` or `rope_type`) and transformers 5 (everything in `rope_parameters`). It standardises
them the way transformers does (and vLLM, which reads configs through transformers), computes the inverse
frequencies once in numpy from these static values, and refuses any RoPE type or key it does not build, naming it.
The JAX side (`rope_sin_cos`, `apply_rope`) is in models/transformer.py: this module stays free of JAX, so that the
command line checks a config (and --dry_run prints it) without importing JAX, in a third of the time.
"""

import dataclasses
import math

import numpy as np

DEFAULT_THETA = 10000.0
# The keys each built type reads, besides rope_type, rope_theta and partial_rotary_factor.
TYPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
}
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclasses.dataclass(frozen=True)
class Rope:
    rope_type: str
    theta: float
    inv_freq: tuple[float, ...]  # head_dim / 2 float32 values: the angle per position of dims i and i + head_dim/2
    attention_scaling: float = 1.0  # yarn: cos and sin are multiplied by it
    # dynamic: transformers rescales its frequencies once a batch is longer than this; up to it they are the
    # default ones (vLLM's too), so longer rows are refused.
    max_row: int | None = None


def rope_parameters(c: dict, source: str) -> tuple[str, dict]:
    """(the config key they came from, the RoPE parameters standardised like transformers: rope_type and
    rope_theta always set, partial_rotary_factor moved in from the top level)."""
    where = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    params = dict(c.get(where) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: {where}: RoPE parameters per layer type are not supported")
    legacy, modern = params.pop("type", None), params.get("rope_type")
    if legacy and modern and legacy != modern:
        raise ValueError(f"{source}: {where}: type {legacy!r} and rope_type {modern!r} disagree")
    params["rope_type"] = modern or legacy or "default"
    params.setdefault("rope_theta", c.get("rope_theta", DEFAULT_THETA))
    if "partial_rotary_factor" in c:
        params.setdefault("partial_rotary_factor", c["partial_rotary_factor"])
    return where, params


def read_rope(c: dict, *, head_dim: int, max_position_embeddings: int, source: str = "config") -> Rope:
    where, p = rope_parameters(c, source)
    rope_type = p["rope_type"]
    if rope_type not in TYPE_KEYS:
        raise ValueError(f"{source}: {where}.rope_type {rope_type!r} is not supported (supported: "
                         f"{', '.join(TYPE_KEYS)})")
    # Keys of no built type may change the math elsewhere (vLLM reads some, e.g. mrope_section): refused. Keys of
    # another built type are ignored, as transformers and vLLM do.
    unknown = sorted(set(p) - set(_COMMON_KEYS) - {k for keys in TYPE_KEYS.values() for k in keys})
    if unknown:
        raise ValueError(f"{source}: {where}.{unknown[0]}: unknown RoPE key (not built here)")
    if p.get("partial_rotary_factor") not in (None, 1.0):
        # transformers' Qwen/Llama ignore it for default RoPE (and fail for the others) while vLLM honours it.
        raise ValueError(f"{source}: partial_rotary_factor {p['partial_rotary_factor']!r} is not supported (only 1)")
    for key in _REQUIRED.get(rope_type, ()):
        if key not in p:
            raise ValueError(f"{source}: {where}.{key}: required by rope_type {rope_type!r}")
    if "original_max_position_embeddings" in TYPE_KEYS[rope_type]:
        # As transformers when it builds the model: a top-level value wins over the dict's, else max positions.
        p["original_max_position_embeddings"] = c.get(
            "original_max_position_embeddings", p.get("original_max_position_embeddings", max_position_embeddings))
    theta = float(p["rope_theta"])
    inv_freq, scaling = FREQUENCIES[rope_type](p, theta, head_dim, max_position_embeddings)
    return Rope(rope_type=rope_type, theta=theta, inv_freq=tuple(float(x) for x in inv_freq),
                attention_scaling=float(scaling), max_row=max_position_embeddings if rope_type == "dynamic" else None)


# The formulas of transformers' modeling_rope_utils, step for step in float32: (inv_freq [dim/2], attention scaling).

def _default(theta: float, dim: int) -> np.ndarray:
    return np.float32(1.0) / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def _linear(p, theta, dim, max_pos):
    return _default(theta, dim) / p["factor"], 1.0


def _dynamic(p, theta, dim, max_pos):
    # transformers starts from seq_len = max_position_embeddings, where the NTK base is theta itself.
    factor, seq_len = p["factor"], max_pos
    base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default(base, dim), 1.0


def _llama3(p, theta, dim, max_pos):
    inv_freq = _default(theta, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled), 1.0


def _yarn_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(p, theta, dim, max_pos):
    old_len = p["original_max_position_embeddings"]
    factor = p["factor"] if p["factor"] is not None else max_pos / old_len
    attention_factor, mscale, mscale_all_dim = p.get("attention_factor"), p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    pos_freqs = theta ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency per dim
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


FREQUENCIES = {"default": lambda p, theta, dim, max_pos: (_default(theta, dim), 1.0), "linear": _linear,
               "dynamic": _dynamic, "llama3": _llama3, "yarn": _yarn}
assert set(FREQUENCIES) == set(TYPE_KEYS)
