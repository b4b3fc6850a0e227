"""The processes a run starts: which GPUs each server and the trainer get, and how a dry run prints them.

Pure data; ctxd_jax/config.py validates a config and builds the Plan (`make_plan`).
"""

import dataclasses
import subprocess


def visible_devices(value: str | None) -> tuple[str, ...] | None:
    """The entries of an inherited CUDA_VISIBLE_DEVICES (None when unset: GPU ids are the machine's own)."""
    return None if value is None else tuple(p for p in value.replace(" ", "").split(",") if p)


def machine_gpu_count() -> int | None:
    """How many GPUs `nvidia-smi -L` lists (None where it does not run: no driver, or not a machine with GPUs)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else None


def gpu_memory_mib(devices: tuple[str, ...]) -> int | None:
    """The smallest memory (MiB) of the GPUs `devices` (indexes or UUIDs), as nvidia-smi reports it; None where it
    does not run or names none of them."""
    if not devices:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i",
                              ",".join(devices)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = [int(line) for line in out.stdout.split() if line.isdigit()] if out.returncode == 0 else []
    return min(sizes) if sizes else None


@dataclasses.dataclass(frozen=True)
class Gpus:
    """GPU ids of each process, as indexes into `visible` (the CUDA_VISIBLE_DEVICES the run inherited, e.g. from a
    scheduler), or the machine's own ids when it is None; so two runs on one host can be given disjoint GPUs."""

    inference: tuple[int, ...] = ()
    teacher: tuple[int, ...] = ()
    trainer: tuple[int, ...] = ()
    visible: tuple[str, ...] | None = None
    machine: int | None = None  # GPUs the machine shows (machine_gpu_count); None = unknown, not checked
    memory_mib: int | None = None  # the smallest of the run's GPUs (gpu_memory_mib); None = unknown, not checked
    processes: int = 1  # hosts the run spans, each with these GPUs: the trainer mesh is this many times its own

    @property
    def cpu(self) -> bool:
        return not (self.inference or self.teacher or self.trainer)

    def devices(self, ids: tuple[int, ...]) -> tuple[str, ...]:
        """What a process on GPUs `ids` gets as its CUDA_VISIBLE_DEVICES entries."""
        return tuple(str(i) if self.visible is None else self.visible[i] for i in ids)

    def run_devices(self) -> tuple[str, ...]:
        """The devices of every process of the run (ids past `visible` left out: the layout check names them)."""
        ids = sorted(set(self.inference + self.teacher + self.trainer))
        return self.devices(tuple(i for i in ids if self.visible is None or i < len(self.visible)))


def _describe_gpus(ids: tuple[int, ...], devices: tuple[str, ...]) -> str:
    """'0,1', with the devices they name when an inherited CUDA_VISIBLE_DEVICES makes them differ."""
    text = ",".join(map(str, ids))
    return text if devices == tuple(map(str, ids)) else f"{text} (CUDA_VISIBLE_DEVICES={','.join(devices)})"


@dataclasses.dataclass(frozen=True)
class ServerPlan:
    """One vLLM server. gpu_ids () = CPU. roles: 'student' (serves the LoRA adapter) and/or 'teacher' (base weights)."""

    roles: tuple[str, ...]
    model: str
    gpu_ids: tuple[int, ...]
    dp: int
    tp: int
    port: int | None  # None: a private Unix socket (inference.transport='uds')
    devices: tuple[str, ...] = ()  # the server's CUDA_VISIBLE_DEVICES entries (Gpus.devices of gpu_ids)

    def describe(self) -> str:
        where = (f"GPUs {_describe_gpus(self.gpu_ids, self.devices)} (dp={self.dp}, tp={self.tp})" if self.gpu_ids
                 else "CPU")
        listen = "a private Unix socket" if self.port is None else f"port {self.port}"
        return f"vLLM server [{' + '.join(self.roles)}] {self.model} on {where}, {listen}"


@dataclasses.dataclass(frozen=True)
class TrainerPlan:
    gpu_ids: tuple[int, ...]  # () = CPU
    num_train_workers: int  # data-parallel (fsdp) size of the trainer mesh
    tp: int
    devices: tuple[str, ...] = ()  # the trainer's CUDA_VISIBLE_DEVICES entries

    def describe(self) -> str:
        if not self.gpu_ids:
            return "JAX trainer on CPU"
        gpus = _describe_gpus(self.gpu_ids, self.devices)
        return f"JAX trainer on GPUs {gpus} (num_train_workers={self.num_train_workers}, tp={self.tp})"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The processes a run starts. `teacher` is `student` itself when one server serves both; None = no teacher
    server. `teacher_scorer` ('trainer' or 'vllm', resolved) says who computes the teacher's log-probs, which the
    run needs when `teacher_logprobs` (a KL tau > 0); with 'trainer' no teacher server runs."""

    cpu: bool
    student: ServerPlan
    teacher: ServerPlan | None
    trainer: TrainerPlan
    teacher_scorer: str = "vllm"
    teacher_logprobs: bool = False
    memory: tuple[str, ...] = ()  # the memory plan, a line per GPU (config.check_memory_plan)

    @property
    def teacher_shared(self) -> bool:
        return self.teacher is self.student

    @property
    def servers(self) -> tuple[ServerPlan, ...]:
        if self.teacher is None or self.teacher_shared:
            return (self.student,)
        return (self.student, self.teacher)

    def describe(self) -> str:
        mode = "CPU" if self.cpu else "GPU"
        lines = [f"plan ({mode} mode):"]
        lines += [f"  {s.describe()}" for s in self.servers]
        if self.teacher_scorer == "trainer":
            what = "log-probs from the JAX trainer (LoRA off)" if self.teacher_logprobs else "no log-probs (KL taus 0)"
            lines.append(f"  teacher = the student's base model: {what}, samples from the student server")
        elif self.teacher is None:
            lines.append("  no teacher (all KL taus 0, no baseline eval)")
        lines.append(f"  {self.trainer.describe()}")
        lines += [f"  {line}" for line in self.memory]
        return "\n".join(lines)
