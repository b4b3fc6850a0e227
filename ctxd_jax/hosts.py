"""Several processes, one per host: who they are (from the environment) and what each runs. Pure: no JAX.

Every process runs the same `python -m ctxd_jax.train` command and the same program (ctxd_jax/loop.py): its own
servers (the plan's, on its own host's GPUs), its share of every step's groups (sampled, verified, scored and packed
there), its part of the trainer mesh, which spans the trainer GPUs of all of them, and each adapter version written
from its own copy of the (replicated) LoRA weights into its own servers: no sample, row or weight file crosses hosts
(ctxd_jax/distributed.py says what does).

The processes come from CTXD_COORDINATOR_ADDRESS (host:port of process 0), CTXD_NUM_PROCESSES and CTXD_PROCESS_ID,
or, when those are unset, from SLURM's task variables inside `srun` (JAX then finds the coordinator itself).
"""

from __future__ import annotations

import dataclasses
import os
import re

from ctxd_jax.config import ConfigError, check_gpu_memory
from ctxd_jax.plan import Plan

ENV = ("CTXD_COORDINATOR_ADDRESS", "CTXD_NUM_PROCESSES", "CTXD_PROCESS_ID")
# What JAX's SLURM detection reads (jax._src.clusters.slurm_cluster); all must be set.
SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Settings:
    coordinator_address: str = ""  # "" with several processes: found by JAX from the scheduler (SLURM)
    num_processes: int = 1
    process_id: int = 0
    source: str = "CTXD"  # the variables they came from: CTXD or SLURM

    def __post_init__(self):
        count, pid = ("CTXD_NUM_PROCESSES", "CTXD_PROCESS_ID") if self.source == "CTXD" else ("SLURM_NTASKS",
                                                                                             "SLURM_PROCID")
        if self.num_processes < 1:
            raise ConfigError(f"{count}: must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"{pid}: {self.process_id} is not in [0, {self.num_processes})")
        if self.num_processes > 1 and self.source == "CTXD" and not self.coordinator_address:
            raise ConfigError("CTXD_COORDINATOR_ADDRESS: needed (host:port of process 0) with several processes")

    @property
    def several(self) -> bool:
        return self.num_processes > 1

    @property
    def leader(self) -> bool:
        return self.process_id == 0


def _number(env, name: str, default: int) -> int:
    text = env.get(name, "") or str(default)
    if not text.isdigit():
        raise ConfigError(f"{name}: {text!r} is not a non-negative integer")
    return int(text)


def settings_from_env(env) -> Settings:
    """CTXD_* when CTXD_NUM_PROCESSES is set, else SLURM's variables of an `srun` step, else one process."""
    if not env.get(ENV[1]) and all(env.get(name) for name in SLURM):
        return Settings("", _number(env, "SLURM_NTASKS", 1), _number(env, "SLURM_PROCID", 0), source="SLURM")
    return Settings(env.get(ENV[0], ""), _number(env, ENV[1], 1), _number(env, ENV[2], 0))


def check(config, plan: Plan, settings: Settings) -> None:
    """Refusals that only several processes have (ConfigError 'field: message')."""
    if not settings.several:
        return
    check_gpu_memory(config, plan, several_processes=True)  # the trainers form one mesh over NCCL
    if config.weights.mode == "merged":
        raise ConfigError("weights.mode: 'merged' is not built for several processes (each host would gather the "
                          "whole model every step); use 'adapter'")
    prompts, n = config.batch_size // config.rollouts_per_example, settings.num_processes
    if prompts % n:
        raise ConfigError(f"batch_size: {config.batch_size} samples are {prompts} groups of rollouts_per_example, "
                          f"not a whole number per process for {n} processes")


def local_plan(config, plan: Plan, process: int) -> Plan:
    """The servers `process` starts: the plan's, on ports of its own (inference.port + 2 p and + 2 p + 1 over TCP),
    so processes sharing a host never collide."""
    if process == 0 or config.inference.transport == "uds":
        return plan

    def moved(server):
        return server and dataclasses.replace(server, port=server.port + 2 * process)

    return dataclasses.replace(plan, student=moved(plan.student), teacher=moved(plan.teacher))


PROCESS_DIR = re.compile(r"process[1-9][0-9]*")


def process_dir(out: str, process: int | str) -> str:
    """The folder of process `process`'s own files (its servers' logs, its adapter versions, its sampled-ahead
    batches): the run folder for process 0, which also writes the run's own files, else `process<p>/` in it (its
    name matches PROCESS_DIR)."""
    return out if process == 0 else os.path.join(out, f"process{process}")


def describe(config, plan: Plan, settings: Settings) -> str:
    """The plan of every process (hosts alike: each runs the same command with the same GPU ids)."""
    if not settings.several:
        return plan.describe()
    n, mode = settings.num_processes, "CPU" if plan.cpu else "GPU"
    where = settings.coordinator_address or "found by JAX from SLURM"
    groups = config.batch_size // config.rollouts_per_example
    lines = [f"plan ({mode} mode, {n} processes from {settings.source}_* variables, one per host; this is process "
             f"{settings.process_id}; coordinator {where}):",
             f"  every process (each on its own host, the same program): {groups // n} of each step's {groups} groups "
             "(group g on process g % processes), sampled, verified, scored and packed there, on these servers:"]
    lines += [f"  {line}" for line in plan.describe().splitlines()[1:]]
    if config.inference.transport == "tcp":
        lines.append("    (process p: ports + 2 p)")
    devices = f"{len(plan.trainer.gpu_ids) * n} GPUs" if plan.trainer.gpu_ids else "CPU devices"
    workers = f", num_train_workers={plan.trainer.num_train_workers * n}" if plan.trainer.gpu_ids else ""
    lines += [f"  trainer mesh: the {devices} of all {n} processes{workers}, tp={plan.trainer.tp}; each process "
              "places only its own rows; between processes only the LoRA gradient's all-reduce and a few numbers "
              "per step",
              f"  each adapter version: written by every process from its own copy of the LoRA weights to "
              f"{process_dir(config.output_dir, '<p>')}/weights and loaded into its own student server",
              f"  process 0 logs the metrics (summed over all processes) and writes the run's files; checkpoints: "
              f"{config.output_dir}/checkpoints, written by every process (a folder every host sees)"]
    return "\n".join(lines)
