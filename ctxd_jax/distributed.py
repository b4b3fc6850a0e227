"""Several processes (one per host) for the JAX trainer: `jax.distributed` from arguments or the environment.

After `initialize`, `jax.devices()` lists every process's devices, so `sharding.make_mesh()` spans all hosts. Every
process builds the same model (same checkpoint, same seed) and passes the same global TrainBatch to the Trainer;
`jax.device_put` then copies to each process only its own devices' rows. One process is a no-op.

Environment (when no Settings are passed): CTXD_COORDINATOR_ADDRESS (host:port that process 0 listens on),
CTXD_NUM_PROCESSES, CTXD_PROCESS_ID.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV = ("CTXD_COORDINATOR_ADDRESS", "CTXD_NUM_PROCESSES", "CTXD_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Settings:
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"CTXD_NUM_PROCESSES: must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"CTXD_PROCESS_ID: {self.process_id} is not in [0, {self.num_processes})")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError("CTXD_COORDINATOR_ADDRESS: needed (host:port of process 0) with several processes")


def settings_from_env(env=None) -> Settings:
    env = os.environ if env is None else env
    numbers = {}
    for name, default in ((ENV[1], 1), (ENV[2], 0)):
        text = env.get(name, "") or str(default)
        if not text.isdigit():
            raise ValueError(f"{name}: {text!r} is not a non-negative integer")
        numbers[name] = int(text)
    return Settings(env.get(ENV[0], ""), numbers[ENV[1]], numbers[ENV[2]])


def initialize(settings: Settings | None = None) -> bool:
    """Joins the processes (blocks until all have joined); False (and nothing done) for one process.

    Call before anything touches a JAX device."""
    s = settings_from_env() if settings is None else settings
    if s.num_processes == 1:
        return False
    # The CPU backend has no cross-process collectives by default; gloo provides them (GPUs use NCCL regardless).
    # A JAX without the option (none seen) keeps its default rather than failing a GPU run.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:
        pass
    jax.distributed.initialize(s.coordinator_address, s.num_processes, s.process_id)
    return True


def to_host(x) -> np.ndarray:
    """The whole value of a jax.Array on this host, also when its shards live in several processes (then every
    process must call this, in the same order: it is a collective)."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
