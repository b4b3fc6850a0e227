"""What bench/evidence.py runs: its flags (checked before anything starts), the tasks and sizes, and the resolved
config of each run (task x method x seed)."""

import argparse
import os
import re
import sys

import yaml

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)  # its siblings, however this module was imported
from evidence_methods import METHODS  # noqa: E402

# Tasks by name: config overrides. A name not here is an environment name as the command line takes it (built-in,
# dataset, module:Class), with --set for its fields. `arith_steps` is the privileged-context task: the
# teacher sees the example's worked solution (bench/make_opsd_data.py writes the file), the student the question.
TASKS = {
    "arith_steps": {"env.name": "dataset", "env.dataset.path": os.path.join(BENCH, "data", "arith_steps.jsonl"),
                    "env.dataset.eval_fraction": 0.25, "env.dataset.prompt_key": "question",
                    "env.dataset.answer_key": "answer", "env.dataset.context_key": "solution",
                    "env.dataset.verifier": "math"},
}
SHARED = {"teacher.eval_baseline": False, "ckpt.interval": 0, "ckpt.resume": False, "log.tensorboard": False,
          "parity.num_prompts": 2}
# Sizes by machine (a flag given on the command line wins): CPU keeps the demo's step (~16 s on 2 idle cores).
SIZES = {"cpu": dict(seeds=1, steps=6, prompts=4, max_tokens=16, eval_every=1, eval_examples=24, eval_samples=4),
         "gpu": dict(seeds=3, steps=20, prompts=16, max_tokens=96, eval_every=2, eval_examples=80, eval_samples=4)}
# The eval split's last prompts: answers for forgetting / fidelity, disjoint from train and from the eval prompts (the
# first eval_examples; `check` keeps them apart).
HELD = 16
HELD_OUT = slice(-HELD, None)
# Several workers on one GPU: each trainer keeps configs/demo_gpu.py's share, the servers split what is left of the
# demo's total; a server needs at least this share, and gets a fixed KV cache (vLLM's profiling of free memory is
# thrown off by neighbours starting beside it). 4 GiB: ~180k tokens of SmolLM2-135M, twice a step's peak.
MIN_SERVER_SHARE = 0.1
SHARED_GPU_KV_GIB = 4


def server_share(c, workers: int) -> float:
    """Each server's share of a GPU that `workers` workers share (configs/demo_gpu.py's split when alone)."""
    total = c.inference.gpu_memory_utilization + c.trainer.gpu_memory_fraction
    return round(total / workers - c.trainer.gpu_memory_fraction, 4)


def folder(task: str) -> str:
    """A task's folder name (an environment name may be module:Class or verifiers:ID)."""
    return re.sub(r"[^\w.-]", "_", task)


def missing_fields(config, overrides: dict) -> list[str]:
    """The keys of `overrides` that `config` (locked) has no field for."""
    missing = []
    for key in overrides:
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                missing.append(key)
                break
            node = node[part]
    return missing


def make_config(a, task: str, method: str, seed: int):
    """The resolved config of one run (validated like the command line's), on the GPU of this worker's
    CUDA_VISIBLE_DEVICES."""
    from configs import demo, demo_gpu
    from ctxd_jax.config import resolve
    from ctxd_jax.plan import Gpus, visible_devices

    c = (demo_gpu if a.gpus else demo).get_config()
    sizes = {"max_steps": a.steps, "seed": seed, **TASKS.get(task, {"env.name": task}), "eval.interval": a.eval_every,
             "eval.num_examples": a.eval_examples, "eval.samples": a.eval_samples,
             "batch_size": a.prompts * c.rollouts_per_example,
             "sampling.max_tokens": a.max_tokens,
             "output_dir": os.path.join(a.out, folder(task), method, f"seed{seed}")}
    if a.gpus:
        sizes["inference.gpu_memory_utilization"] = server_share(c, a.workers)
    lr = {"optim.lr": a.lr[method]} if method in a.lr else {}
    c.update_from_flattened_dict({**SHARED, **sizes, **METHODS[method], **lr, **a.set, "model.path": a.model})
    gpus = Gpus((0,), (0,), (0,), visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))) if a.gpus else Gpus()
    return resolve(c, gpus)[0]


def run_list(a) -> list[tuple[str, str, int]]:
    """Every run of the command, seed by seed: a command stopped early leaves whole seeds of every cell."""
    return [(t, m, s) for s in range(a.first_seed, a.first_seed + a.seeds) for t in a.tasks.split(",")
            for m in a.methods.split(",")]


def parse(argv, description: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tasks", default="ahoy,tutor")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, help="seeds per cell: 42, 43, ...")
    p.add_argument("--steps", type=int)
    p.add_argument("--prompts", type=int, help="prompts a step (x the config's rollouts_per_example)")
    p.add_argument("--max_tokens", type=int)
    p.add_argument("--eval_every", type=int)
    p.add_argument("--eval_examples", type=int)
    p.add_argument("--eval_samples", type=int, help="samples a prompt at each eval")
    p.add_argument("--gpus", help="GPU ids, e.g. 0,1,2,3: configs/demo_gpu.py on each (default: CPU, configs/demo.py)")
    p.add_argument("--workers", type=int, default=1, help="workers a GPU (with --gpus), else on the CPU")
    p.add_argument("--out", default="/tmp/evidence", help="results.json (resumed when present), run folders, caches")
    p.add_argument("--export", action="append", default=[], help="a folder that gets results.json after every run "
                   "and the report at the end (e.g. $OUT); may repeat")
    p.add_argument("--time_limit", type=float, default=0, help="seconds for the whole command (0: none)")
    p.add_argument("--redo", default="", help="methods whose stored runs (every task and seed) are dropped first, "
                   "to run them again, e.g. after a fix; running the same command again resumes (keeps them)")
    p.add_argument("--model", help="model folder (default: the demo config's)")
    p.add_argument("--first_seed", type=int, default=42, help="seeds are first_seed, first_seed + 1, ...; the lr "
                   "sweep runs on a tuning seed outside the final table's (e.g. 7)")
    p.add_argument("--lr", default="", help="each arm's learning rate, e.g. rl=3e-3,distill=1e-3 (default: the "
                   "config's); bench/evidence_sweep.py prints it from a sweep")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE, a config field for every run, e.g. "
                   "env.dataset.path=my.jsonl or optim.lr=3e-4; may repeat")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for key, value in SIZES["gpu" if a.gpus else "cpu"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.out = os.path.abspath(a.out)
    a.redo = [m for m in a.redo.split(",") if m]
    if a.model is None:
        from configs import demo, demo_gpu

        a.model = (demo_gpu if a.gpus else demo).get_config().model.path
    a.model = os.path.abspath(os.path.expanduser(a.model))  # as results.json records it
    a.export = [os.path.abspath(e) for e in a.export]
    a.lr = {m: float(v) for m, v in (kv.split("=", 1) for kv in a.lr.split(",") if kv)}
    a.set = {k: set_value(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    return a


def set_value(text: str):
    """A --set value as the command line's --config flags read it: a number where it is one (YAML alone reads "1e-4"
    as a string), else YAML (true, a list, a string)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return yaml.safe_load(text)


def check(a) -> None:
    """One line per bad flag, before anything starts."""
    from configs import demo_gpu

    for flag, methods in (("methods", a.methods.split(",")), ("redo", a.redo), ("lr", list(a.lr))):
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            sys.exit(f"error: --{flag}: unknown {unknown} (known: {', '.join(METHODS)})")
    if set(a.redo) - set(a.methods.split(",")):
        sys.exit(f"error: --redo: {sorted(set(a.redo) - set(a.methods.split(',')))} not in --methods (their runs "
                 "would be dropped and not run again)")
    if a.workers < 1:
        sys.exit("error: --workers: at least 1")
    share = server_share(demo_gpu.get_config(), a.workers)
    if a.gpus and share < MIN_SERVER_SHARE:
        sys.exit(f"error: --workers: {a.workers} workers a GPU leave each vLLM server {share:.2f} of it "
                 f"(< {MIN_SERVER_SHARE}) beside the trainers' configs/demo_gpu.py shares")
    from configs import demo

    base = (demo_gpu if a.gpus else demo).get_config()
    if missing_fields(base, a.set):
        sys.exit(f"error: --set: {', '.join(missing_fields(base, a.set))}: not a config field")
    for m in a.methods.split(","):
        missing = missing_fields(base, METHODS[m])
        if missing:
            sys.exit(f"error: --methods: {m} sets {', '.join(missing)}, not a config field in this checkout (the arm "
                     "needs the feature that adds it)")
    from ctxd_jax.config import ConfigError

    try:
        for task in a.tasks.split(","):
            missing = missing_fields(base, TASKS.get(task, {}))
            if missing:
                sys.exit(f"error: --tasks: {task} sets {', '.join(missing)}, not a config field in this checkout")
            from ctxd_jax.envs import env_from_config

            config = make_config(a, task, a.methods.split(",")[0], 42)
            n = len(env_from_config(config).examples("eval"))
            if a.eval_examples > n - HELD:
                sys.exit(f"error: --eval_examples: {task} has {n} eval prompts; the last {HELD} are the held-out "
                         f"ones (forgetting, fidelity), so at most {n - HELD} evaluate")
    except ConfigError as e:
        sys.exit(f"error: {e}")
