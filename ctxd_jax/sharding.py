"""Device mesh ('fsdp', 'tp') and partition rules for the model tree (paths as models/transformer.py builds it).

Rules, by path: with `shard_weights` (FSDP), big kernels and embeddings shard their largest remaining dim that
divides over 'fsdp'; without, the frozen weights are replicated over 'fsdp' and only the LoRA gradients cross devices
(faster where the weights fit on each device: BENCHMARKS.md, "Scaling"); 'tp' takes attention heads / MLP intermediate (q/k/v/gate/up:
output dim, o/down: input dim, embeddings/lm_head: vocab) when divisible. Stacked-layer axes, norms, biases and LoRA
params are replicated (small). Batches shard over 'fsdp'.
"""

import numpy as np
import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("fsdp", "tp")
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output dim is heads / intermediate
_ROW = ("o_proj", "down_proj")  # input dim is heads / intermediate


def make_mesh(devices=None, *, tp: int = 1) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % tp:
        raise ValueError(f"tp={tp} does not divide the {len(devices)} devices")
    return Mesh(np.array(devices).reshape(len(devices) // tp, tp), AXES)


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh | None = None, *,
               shard_weights: bool = True) -> P:
    """PartitionSpec for one Variable. Without a mesh, divisibility is assumed (axis sizes 1)."""
    sizes = dict(mesh.shape) if mesh is not None else {a: 1 for a in AXES}
    name = path[-1]
    if name not in ("kernel", "embedding"):  # norms, biases, lora_a / lora_b
        return P()
    stacked = path[0] == "layers"
    dims = list(range(1 if stacked else 0, len(shape)))  # never shard the layer axis: the scan slices it
    spec = [None] * len(shape)
    if name == "embedding":
        tp_dim = dims[0]  # [V, D]: vocab
    elif "lm_head" in path:
        tp_dim = dims[-1]  # [D, V]: vocab
    elif any(p in path for p in _COLUMN):
        tp_dim = dims[-1]
    elif any(p in path for p in _ROW):
        tp_dim = dims[0]
    else:
        tp_dim = None
    if tp_dim is not None and sizes["tp"] > 1 and shape[tp_dim] % sizes["tp"] == 0:
        spec[tp_dim] = "tp"
    free = [d for d in dims if spec[d] is None and shape[d] % sizes["fsdp"] == 0]
    if free and shard_weights:
        spec[max(free, key=lambda d: shape[d])] = "fsdp"
    return P(*spec)


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def state_shardings(state: nnx.State, mesh: Mesh, *, shard_weights: bool = True):
    """A pytree like `state` with a NamedSharding per Variable value (for jax.jit in/out shardings)."""

    def one(path, leaf):
        names = tuple(n for n in _path_names(path) if n not in ("value", "raw_value"))
        return NamedSharding(mesh, param_spec(names, leaf.shape, mesh, shard_weights=shard_weights))

    return jax.tree_util.tree_map_with_path(one, state)


def shard_state(state: nnx.State, mesh: Mesh, *, shard_weights: bool = True) -> nnx.State:
    """Places every Variable of `state` by the rules above."""
    return jax.device_put(state, state_shardings(state, mesh, shard_weights=shard_weights))


def shard_model(model: nnx.Module, mesh: Mesh, *, shard_weights: bool = True) -> None:
    """Moves a model's Variables onto the mesh in place."""
    nnx.update(model, shard_state(nnx.state(model), mesh, shard_weights=shard_weights))


def batch_spec() -> P:
    """[B, ...] arrays: batch over 'fsdp', everything else replicated."""
    return P("fsdp")


def shard_batch(x, mesh: Mesh):
    return jax.device_put(x, NamedSharding(mesh, batch_spec()))
