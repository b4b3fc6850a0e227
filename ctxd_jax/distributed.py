"""Several processes (one per host) as one program: `jax.distributed` from the environment, and the host-level
agreements between them.

After `initialize`, `jax.devices()` lists every process's devices, so `sharding.make_mesh()` spans all hosts. Every
process runs the same loop (ctxd_jax/loop.py) on its own share of each step's groups: it builds its part of every
global array from its own rows (`Trainer.local`) and reads back only its own rows' results (`local_rows`). What the
processes exchange besides XLA's collectives inside the jitted programs (the LoRA gradient's all-reduce) goes through
`gather`: a few numbers per call (row counts, shapes, metric sums, a stop flag), never rows or samples. `gather` is
a collective: every process calls it in the same order. One process: all of it is the identity.

Environment: CTXD_COORDINATOR_ADDRESS (host:port that process 0 listens on), CTXD_NUM_PROCESSES, CTXD_PROCESS_ID,
or SLURM's task variables (ctxd_jax/hosts.py).
"""

from __future__ import annotations

import os
import secrets
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from ctxd_jax import hosts
from ctxd_jax.config import ConfigError
from ctxd_jax.hosts import Settings  # the variables and their parsed form live in hosts.py

# A process that stops answering is noticed by the others within this (then JAX's coordination service ends them).
HEARTBEAT_TIMEOUT_S = 30
sent_bytes = 0  # what this process has put into `gather` (the run logs it per step: it must not grow with the batch)


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
    jax.distributed.initialize(s.coordinator_address or None, s.num_processes, s.process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    return True


def exit_now(status: int) -> None:
    """Ends a process of several that failed: the others may be waiting in a collective for it, so it exits at once
    (JAX's coordination service then ends them too) rather than in jax.distributed's shutdown barrier."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def gather(values) -> np.ndarray:
    """[processes, *shape]: every process's `values` (a small array of numbers, the same shape everywhere)."""
    global sent_bytes
    x = np.asarray(values)
    if jax.process_count() == 1:
        return x[None]
    sent_bytes += x.nbytes
    return np.asarray(multihost_utils.process_allgather(x))


def to_host(x) -> np.ndarray:
    """The whole value of a jax.Array on this host, also when its shards live in several processes (then every
    process must call this, in the same order: it is a collective)."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x) -> np.ndarray:
    """This process's rows of an array sharded by rows (its devices' blocks, in row order; no other process's)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    blocks = {s.index[0].start or 0: s.data for s in x.addressable_shards}  # tensor-parallel copies: one each
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


def reduce(values: dict[str, float], maxima: tuple[str, ...] = ()) -> dict[str, float]:
    """`values` summed over the processes (the largest for the keys in `maxima`); every process passes the same keys."""
    keys = sorted(values)
    every = gather(np.asarray([values[k] for k in keys], np.float64))
    return {k: float(every[:, i].max() if k in maxima else every[:, i].sum()) for i, k in enumerate(keys)}


def check_shared(folder: str) -> None:
    """Raises ConfigError in every process unless each sees the file that process 0 writes into `folder` (the run
    folder, where every process writes its part of the checkpoints)."""
    if jax.process_count() == 1:
        return
    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    path = os.path.join(folder, f".shared-{token}")
    if jax.process_index() == 0:
        with open(path, "w") as f:
            f.write(str(token))
    multihost_utils.sync_global_devices("run folder marked")
    try:
        with open(path) as f:
            sees = f.read() == str(token)
    except OSError:
        sees = False
    blind = np.flatnonzero(~gather(sees).astype(bool)).tolist()
    if jax.process_index() == 0:
        os.remove(path)
    if blind:
        raise ConfigError(f"output_dir: {folder} is not shared by every host (process {blind[0]} does not see "
                          "process 0's files there); several processes need a run folder every host sees "
                          "(checkpoints are written by all)")
