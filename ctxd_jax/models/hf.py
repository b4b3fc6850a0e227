"""Hugging Face weights in and out: load HF safetensors (+ a PEFT adapter) into the NNX Transformer, export a PEFT
adapter and merged HF weights. All key names and transposes come from ctxd_jax.models.names.
"""

import functools
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ctxd_jax.models import names
from ctxd_jax.models.config import ModelConfig
from ctxd_jax.models.transformer import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX = "model.safetensors.index.json"
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}
# Files that describe the model rather than hold its weights: copied next to merged exports.
_META_PATTERNS = ("*.json", "*.jinja", "*.txt", "tokenizer.model")
_NOT_META = (INDEX, ADAPTER_CONFIG)


class SafetensorsReader:
    """Lazy reader over one HF folder's safetensors files (single file, index + shards, or bare shards)."""

    def __init__(self, folder: str, weights_name: str = "model.safetensors"):
        self.folder = folder
        index = os.path.join(folder, INDEX)
        if os.path.exists(os.path.join(folder, weights_name)):
            files = [weights_name]
        elif os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{folder}: no {weights_name}, {INDEX} or *.safetensors")
        self._handles = {}
        self.file_of = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: missing (named in {INDEX})")
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as e:  # safetensors raises its own types for a truncated or garbage header
                raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {' '.join(str(e).split())})") from e
            self._handles[name] = handle
            for key in handle.keys():
                self.file_of[key] = name

    def keys(self) -> set[str]:
        return set(self.file_of)

    def where(self, key: str) -> str:
        return os.path.join(self.folder, self.file_of.get(key, "?"))

    def shape(self, key: str) -> list[int]:
        return self._handles[self.file_of[key]].get_slice(key).get_shape()

    def dtype(self, key: str):
        return _NP_DTYPES[self._handles[self.file_of[key]].get_slice(key).get_dtype()]

    def read(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.file_of:
            raise KeyError(f"{self.folder}: missing tensor {key!r}")
        value = self._handles[self.file_of[key]].get_tensor(key)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{self.where(key)}: tensor {key!r} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(shape)}")
        return value


def _check_keys(reader: SafetensorsReader, entries: list[names.Entry], num_layers: int):
    expected = {k for e in entries for k in e.hf_keys(num_layers)}
    missing, unexpected = sorted(expected - reader.keys()), sorted(reader.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"{reader.folder}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}"
                       + (" (more omitted)" if max(len(missing), len(unexpected)) > 8 else ""))


def check_files(model_dir: str) -> ModelConfig:
    """The folder's config and weights as loading needs them, from the safetensors headers alone (no weights read):
    a supported model_type, every shard of the index present and readable, every tensor present with the shape the
    config gives. Raises ValueError naming the file."""
    cfg = ModelConfig.from_hf(model_dir)
    try:
        reader = SafetensorsReader(model_dir)
    except FileNotFoundError as e:
        raise ValueError(e.args[0]) from e
    entries = names.base_entries(cfg)
    try:
        _check_keys(reader, entries, cfg.num_layers)
    except KeyError as e:
        raise ValueError(e.args[0]) from e
    leaves = dict(nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))))
    for e in entries:
        per_key = leaves[e.path].get_value().shape[1 if e.stacked else 0:]
        expected = tuple(per_key[::-1] if e.transpose else per_key)
        for key in e.hf_keys(cfg.num_layers):
            shape = tuple(reader.shape(key))
            if shape != expected:
                raise ValueError(f"{reader.where(key)}: tensor {key!r} has shape {shape}, config.json gives "
                                 f"{expected}")
    return cfg


def _load_entry(reader: SafetensorsReader, entry: names.Entry, abstract, num_layers: int) -> np.ndarray:
    """One NNX array from its HF tensors, in the abstract leaf's dtype; shape checked per HF key."""
    per_key = abstract.shape[1:] if entry.stacked else abstract.shape
    hf_shape = per_key[::-1] if entry.transpose else per_key
    value = names.to_nnx(entry, lambda k: reader.read(k, hf_shape), num_layers)
    return value.astype(abstract.dtype)


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no PEFT adapter config")
    with open(path) as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA" or c.get("use_rslora") or c.get("use_dora"):
        raise ValueError(f"{path}: only plain LoRA adapters are supported (peft_type LORA, no rslora/dora)")
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern/alpha_pattern is not supported")
    return c


def _adapter_targets(adapter_config: dict, model_targets: list[str], adapter_dir: str) -> list[str]:
    targets = adapter_config.get("target_modules")
    if targets == "all-linear":
        return model_targets
    if not isinstance(targets, list) or not set(targets) <= set(model_targets):
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG}: target_modules {targets!r} must be 'all-linear' or a "
                         f"list drawn from {model_targets}")
    return [t for t in model_targets if t in targets]


def _place(value, path, mesh, shard_weights):
    if mesh is None:
        return jnp.asarray(value)
    from ctxd_jax.sharding import param_spec

    spec = param_spec(path, value.shape, mesh, shard_weights=shard_weights)
    return jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _init_lora(cfg, lora_rank, lora_alpha, dtype, param_dtype, key):
    # Under jit the unused base-weight initialisers are dead code: only the LoRA factors are computed. Module-level
    # so that loads of the same shapes reuse the compilation.
    model = Transformer(cfg, lora_rank=lora_rank, lora_alpha=lora_alpha, dtype=dtype, param_dtype=param_dtype,
                        rngs=nnx.Rngs(key))
    return nnx.state(model, nnx.LoRAParam)


def load_model(model_dir: str, *, lora_rank: int = 0, lora_alpha: float | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, mesh=None, seed: int = 0, adapter_dir: str | None = None,
               remat: bool = False, remat_policy: str = "nothing_saveable",
               attn_impl: str | None = None, shard_weights: bool = True) -> Transformer:
    """HF checkpoint (+ optional PEFT adapter) -> Transformer, each array placed straight into its sharding.

    With `adapter_dir`, rank and alpha default to the adapter's (explicit values must agree). Without it, LoRA
    factors are initialised from `seed` like PEFT (A uniform, B zero); lora_alpha defaults to 2 * rank.
    """
    cfg = ModelConfig.from_hf(model_dir)
    if adapter_dir is not None:
        ac = read_adapter_config(adapter_dir)
        for name, given, found in (("lora_rank", lora_rank, ac["r"]), ("lora_alpha", lora_alpha, ac["lora_alpha"])):
            if given and given != found:
                raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG}: {name} is {found}, but {given} was requested")
        lora_rank, lora_alpha = ac["r"], ac["lora_alpha"]
    if lora_alpha is None:
        lora_alpha = 2.0 * lora_rank

    def build():
        return Transformer(cfg, lora_rank=lora_rank, lora_alpha=lora_alpha, dtype=dtype, param_dtype=param_dtype,
                           remat=remat, remat_policy=remat_policy, attn_impl=attn_impl, rngs=nnx.Rngs(seed))

    graphdef, state = nnx.split(nnx.eval_shape(build))
    leaves = dict(nnx.to_flat_state(state))
    values = {}
    place = functools.partial(_place, mesh=mesh, shard_weights=shard_weights)

    def load(reader: SafetensorsReader, entries: list[names.Entry]):
        _check_keys(reader, entries, cfg.num_layers)
        for e in entries:
            values[e.path] = place(_load_entry(reader, e, leaves[e.path].get_value(), cfg.num_layers), e.path)

    load(SafetensorsReader(model_dir), names.base_entries(cfg))
    if lora_rank > 0:
        targets = names.lora_targets(leaves)
        if adapter_dir is not None:
            load(SafetensorsReader(adapter_dir, ADAPTER_WEIGHTS),
                 names.lora_entries(_adapter_targets(ac, targets, adapter_dir)))
            for e in names.lora_entries(targets):  # modules the adapter does not adapt: zero delta
                if e.path not in values:
                    abstract = leaves[e.path].get_value()
                    values[e.path] = place(np.zeros(abstract.shape, abstract.dtype), e.path)
        else:
            lora = _init_lora(cfg, lora_rank, lora_alpha, dtype, param_dtype, jax.random.key(seed))
            for path, var in nnx.to_flat_state(lora):
                values[path] = place(var.get_value(), path)

    unfilled = sorted(set(leaves) - set(values))
    if unfilled:
        raise KeyError(f"{model_dir}: no HF tensor maps to model parameters {unfilled[:8]}")
    for path, var in leaves.items():
        var.set_value(values[path])
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _lora_hparams(model: Transformer) -> tuple[int, float]:
    proj = model.layers.self_attn.q_proj
    if getattr(proj, "lora_rank", 0) <= 0:
        raise ValueError("the model has no LoRA parameters (lora_rank=0)")
    alpha = proj.lora_scale * proj.lora_rank
    return proj.lora_rank, int(round(alpha)) if abs(alpha - round(alpha)) < 1e-6 else alpha


def _atomic_write(path: str, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: Transformer, out_dir: str, *, base_model_name_or_path: str) -> str:
    """Writes the LoRA factors as a PEFT adapter (loadable by peft and vLLM's /v1/load_lora_adapter)."""
    rank, alpha = _lora_hparams(model)
    host = jax.device_get(nnx.state(model, nnx.LoRAParam))  # one transfer for all factors
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(host)}
    targets = names.lora_targets(flat)
    tensors = names.flat_to_hf(names.lora_entries(targets), flat)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "target_modules": targets,
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "modules_to_save": None, "init_lora_weights": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS),
                  lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=1)
    return out_dir


def _merged(flat, path, scale):
    """The base array at `path` with its LoRA delta folded in (W + (alpha/r) A B, computed in float32)."""
    value = flat[path]
    lora = path[:-1] + ("lora_a",)
    if path[-1] != "kernel" or lora not in flat:
        return value
    a, b = flat[lora], flat[path[:-1] + ("lora_b",)]
    return value.astype(jnp.float32) + scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


def save_merged(model: Transformer, out_dir: str, *, src_dir: str, max_shard_bytes: int = 5 << 30) -> str:
    """Merged HF checkpoint in the source checkpoint's dtypes, plus src_dir's config/tokenizer files.

    Written one NNX array at a time (host memory: about one shard): `model.safetensors` when it fits in one shard,
    else `model-0000k-of-0000n.safetensors` + index. Earlier weight files in `out_dir` are replaced.
    """
    if os.path.realpath(out_dir) == os.path.realpath(src_dir):
        raise ValueError(f"save_merged: out_dir {out_dir!r} is the source checkpoint; write to a new folder")
    src = SafetensorsReader(src_dir)
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    scale = 0.0
    if any(p[-1] == "lora_a" for p in flat):
        rank, alpha = _lora_hparams(model)
        scale = alpha / rank
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "model*.safetensors")) + glob.glob(os.path.join(out_dir, INDEX)):
        os.remove(old)
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            name = os.path.join(out_dir, f".shard{len(shards)}.tmp")
            save_file(current, name, metadata={"format": "pt"})
            shards.append((name, list(current)))
        current, size = {}, 0

    for entry in names.base_entries(model.cfg):
        first = entry.hf_keys(model.cfg.num_layers)[0]
        dtype = src.dtype(first) if first in src.file_of else flat[entry.path].dtype
        host = np.asarray(jax.device_get(_merged(flat, entry.path, scale).astype(dtype)))
        for key, tensor in names.to_hf(entry, host):
            current[key] = tensor
            size += tensor.nbytes
        if size >= max_shard_bytes:
            flush()
    flush()
    if len(shards) == 1:
        os.replace(shards[0][0], os.path.join(out_dir, "model.safetensors"))
    else:
        weight_map = {}
        for k, (tmp, keys) in enumerate(shards, 1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            os.replace(tmp, os.path.join(out_dir, name))
            weight_map.update({key: name for key in keys})
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    for pattern in _META_PATTERNS:
        for path in glob.glob(os.path.join(src_dir, pattern)):
            if os.path.basename(path) not in _NOT_META:
                shutil.copy(path, os.path.join(out_dir, os.path.basename(path)))
    return out_dir
