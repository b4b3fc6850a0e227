"""CUDA MPS for a GPU that a vLLM server and the trainer share.

Two processes on one GPU time-slice: while the server decodes (memory-bound, most of the GPU's arithmetic idle) the
trainer's kernels wait for their turn. Under MPS (the Multi-Process Service) the GPU runs both processes' kernels
side by side. The run starts its own MPS control daemon, with a pipe folder of its own (so it never touches another
user's or run's daemon), before any process of the run opens the GPU, and stops it when the run ends. Only for a
trainer on one GPU: NCCL across MPS clients (a trainer mesh) was not measured here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

from ctxd_jax.config import ConfigError

CONTROL = "nvidia-cuda-mps-control"
ENV_KEYS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


def wanted(mode: str, plan) -> bool:
    """Whether the run should run under MPS: a server shares the trainer's only GPU (and the mode allows it)."""
    if mode == "off" or plan.cpu or len(plan.trainer.gpu_ids) != 1:
        return False
    return any(plan.trainer.gpu_ids[0] in s.gpu_ids for s in plan.servers)


def _control(args: list[str], env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, input=stdin, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def daemon(required: bool):
    """Runs the body under a private MPS daemon: the processes started inside it (and this one, if it opens the GPU
    inside it) are its clients. `required`: a daemon that cannot start is a ConfigError; else one line on stderr and
    the body runs without MPS."""
    exe = shutil.which(CONTROL)
    folder = tempfile.mkdtemp(prefix="ctxd-mps-")
    env = {**os.environ, ENV_KEYS[0]: os.path.join(folder, "pipe"), ENV_KEYS[1]: os.path.join(folder, "log")}
    for key in ENV_KEYS:
        os.makedirs(env[key])
    started = exe is not None and _control([exe, "-d"], env).returncode == 0
    if not started:
        shutil.rmtree(folder, ignore_errors=True)
        why = f"{CONTROL} not found" if exe is None else f"{CONTROL} -d failed"
        if required:
            raise ConfigError(f"trainer.mps: 'on' but CUDA MPS cannot start here ({why}); use 'auto' or 'off'")
        print(f"trainer.mps: CUDA MPS not started ({why}): the server and the trainer take turns on their GPU",
              file=sys.stderr)
        yield False
        return
    saved = {key: os.environ.get(key) for key in ENV_KEYS}
    os.environ.update({key: env[key] for key in ENV_KEYS})
    try:
        yield True
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        # The daemon exits once its last client (this process, while it holds the GPU) is gone.
        with contextlib.suppress(subprocess.TimeoutExpired):
            _control([exe], env, stdin="quit\n")
        shutil.rmtree(folder, ignore_errors=True)
