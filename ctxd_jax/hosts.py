"""Several processes, one per host: who they are (from the environment) and which process runs what. Pure: no JAX.

Every process runs the same `python -m ctxd_jax.train` command. Process 0 (the leader) runs the orchestrator: its
servers are the plan's (student, and the teacher where the plan has one), and it owns the environment, the teacher
scores, advantages, packing, logs, plots and run files. Every other process starts one student server on its own
host's inference GPUs, which only it talks to (sampling requests reach it through process 0's link to it), and writes
each new adapter version from its own copy of the (replicated) LoRA weights to its own folder: no weight file
crosses hosts. Every process holds its part of the trainer mesh, which spans the trainer GPUs of all of them.

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


def student_port(config, process: int) -> int | None:
    """Process 0's student server takes inference.port (its teacher port + 1); process p > 0 takes port + 1 + p, so
    processes sharing a host never collide. None: private Unix sockets (inference.transport 'uds'), no ports."""
    if config.inference.transport == "uds":
        return None
    return config.inference.port + (process + 1 if process else 0)


def local_plan(config, plan: Plan, process: int) -> Plan:
    """The servers `process` starts: process 0 the whole plan, any other one student server and no teacher."""
    if process == 0:
        return plan
    student = dataclasses.replace(plan.student, roles=("student",), port=student_port(config, process))
    return dataclasses.replace(plan, student=student, teacher=None)


PROCESS_DIR = re.compile(r"process[1-9][0-9]*")


def process_dir(out: str, process: int | str) -> str:
    """The folder of process `process` > 0 under the run folder: its server's log and its adapter versions (process
    0 writes the run's own files: `logs/`, `weights/`, ...). Its name matches PROCESS_DIR."""
    return os.path.join(out, f"process{process}")


def describe(config, plan: Plan, settings: Settings) -> str:
    """The plan of every process (hosts alike: each runs the same command with the same GPU ids)."""
    if not settings.several:
        return plan.describe()
    n, mode = settings.num_processes, "CPU" if plan.cpu else "GPU"
    where = settings.coordinator_address or "found by JAX from SLURM"
    lines = [f"plan ({mode} mode, {n} processes from {settings.source}_* variables, one per host; this is process "
             f"{settings.process_id}; coordinator {where}):",
             "  process 0 (host 0): the orchestrator (prompts, rewards, advantages, packing; the only one "
             "writing logs, plots, run files and checkpoint metadata)"]
    lines += [f"  {line}" for line in plan.describe().splitlines()[1:]]
    lines[-1] += ": its share of the mesh"
    other = local_plan(config, plan, 1).student
    who = "process 1 (on its own host)" if n == 2 else f"processes 1..{n - 1} (each on its own host)"
    port = "" if n == 2 or other.port is None else f" (process p: port {config.inference.port} + 1 + p)"
    lines += [f"  {who}: a student server that only its process reaches, and its share of "
              "the mesh",
              f"    {dataclasses.replace(other, roles=('student',)).describe()}{port}",
              f"    each adapter version written by that process from its own copy of the LoRA weights to "
              f"{process_dir(config.output_dir, '<p>')}/weights, then loaded into its server",
              f"    {plan.trainer.describe()}: its share of the mesh"]
    devices = f"{len(plan.trainer.gpu_ids) * n} GPUs" if plan.trainer.gpu_ids else "CPU devices"
    workers = f", num_train_workers={plan.trainer.num_train_workers * n}" if plan.trainer.gpu_ids else ""
    lines += [f"  trainer mesh: the {devices} of all {n} processes{workers}, tp={plan.trainer.tp}; each process gets "
              "only its own rows of every batch; the trainer's scores (teacher, behaviour) run on it too",
              f"  sampling: each group goes to the least-loaded of the {n} student servers; every adapter version is "
              "loaded into all of them before a request names it",
              f"  checkpoints: {config.output_dir}/checkpoints, written by every process (a folder every host sees)"]
    return "\n".join(lines)
