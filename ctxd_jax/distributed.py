"""Several processes (one per host) for the JAX trainer: `jax.distributed` from arguments or the environment.

After `initialize`, `jax.devices()` lists every process's devices, so `sharding.make_mesh()` spans all hosts. Every
process builds the same model (same checkpoint, same seed) and passes the Trainer the same global TrainBatch or only
its own rows of it (`Trainer.share`); each process places only its own devices' rows. One process is a no-op.
The training loop over several processes: ctxd_jax/multihost.py.

Environment (when no Settings are passed): CTXD_COORDINATOR_ADDRESS (host:port that process 0 listens on),
CTXD_NUM_PROCESSES, CTXD_PROCESS_ID, or SLURM's task variables (ctxd_jax/hosts.py).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from ctxd_jax import hosts
from ctxd_jax.hosts import Settings  # the variables and their parsed form live in hosts.py


def settings_from_env(env=None) -> Settings:
    return hosts.settings_from_env(os.environ if env is None else env)


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
    # SLURM: no coordinator address; JAX derives it (the step's first node) from the same variables.
    jax.distributed.initialize(s.coordinator_address or None, s.num_processes, s.process_id)
    return True


def to_host(x) -> np.ndarray:
    """The whole value of a jax.Array on this host, also when its shards live in several processes (then every
    process must call this, in the same order: it is a collective)."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
