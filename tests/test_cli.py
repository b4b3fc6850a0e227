"""The documented command line, run as a user runs it: `python -m ctxd_jax.train ... --dry_run` in a subprocess."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPUS = ["--inference_gpu_ids=0", "--teacher_gpu_ids=1", "--trainer_gpu_ids=2"]
VLLM = "--config.teacher.scorer=vllm"  # a teacher vLLM server scores (the default lets the trainer score the base)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxd_jax.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def ok(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = cli(*args, "--dry_run", env=env)
    assert r.returncode == 0, r.stderr
    return r


def refused(*args: str, env: dict | None = None) -> str:
    r = cli(*args, "--dry_run", env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0].removeprefix("error: ")


# The reference's common configurations (docs/command-line.md's table of them), in our flag names, on its GPU layout.
COMMON = {
    "pure_rl": ["--config.loss.adv_tau=1.0", "--config.loss.teacher_tau=0", "--config.loss.student_tau=0"],
    "hybrid": ["--config.loss.adv_tau=1.0", "--config.loss.teacher_tau=1.0", "--config.loss.student_tau=1.0",
               "--config.advantage.use_full_reward_baseline=true"],
    "gated": ["--config.loss.adv_tau=1.0", "--config.loss.teacher_tau=0.01", "--config.loss.student_tau=0.01",
              "--config.advantage.use_full_reward_baseline=true", "--config.advantage.kl_only_incorrect=true"],
    "pure_distillation": ["--config.loss.adv_tau=0.0", "--config.loss.teacher_tau=1.0",
                          "--config.loss.student_tau=1.0", "--config.buffer.skip_verification=true"],
    "token_kl": ["--config.loss.adv_tau=1.0", "--config.loss.teacher_tau=0.01", "--config.loss.student_tau=0.01",
                 "--config.advantage.use_full_reward_baseline=false"],
}


@pytest.mark.parametrize("name", COMMON)
def test_common_configuration(name):
    r = ok("--config=configs/rl.py", *COMMON[name], *GPUS, VLLM)
    assert "warning" not in r.stderr, r.stderr
    assert "vLLM server [student] " in r.stdout and "on GPUs 0 (dp=1, tp=1)" in r.stdout
    assert "JAX trainer on GPUs 2 (num_train_workers=1, tp=1)" in r.stdout
    for flag in COMMON[name]:
        field, value = flag.removeprefix("--config.").split("=")
        leaf = field.split(".")[-1]
        shown = value if value in ("true", "false") else str(float(value))
        assert f"  {leaf}: {shown}\n" in r.stdout, (flag, r.stdout)
    assert "vLLM server [teacher] " in r.stdout and "on GPUs 1 (dp=1, tp=1), a private Unix socket" in r.stdout


@pytest.mark.parametrize("name", COMMON)
def test_common_configuration_with_the_trainer_scoring_the_teacher(name):
    # The teacher is the base model (teacher.model ''): no teacher server, no teacher GPUs needed.
    r = ok("--config=configs/rl.py", *COMMON[name], "--inference_gpu_ids=0", "--trainer_gpu_ids=2")
    assert r.stderr == ""
    plan = r.stdout.split("plan (GPU mode):\n")[1].splitlines()
    what = "no log-probs (KL taus 0)" if name == "pure_rl" else "log-probs from the JAX trainer (LoRA off)"
    assert plan == ["  vLLM server [student] Qwen/Qwen3-4B-Instruct-2507 on GPUs 0 (dp=1, tp=1), a private Unix socket",
                    f"  teacher = the student's base model: {what}, samples from the student server",
                    "  JAX trainer on GPUs 2 (num_train_workers=1, tp=1)"], r.stdout
    r = ok(*COMMON[name], *GPUS)
    assert "warning: teacher_gpu_ids: unused: the teacher is the student's base model" in r.stderr
    assert "[teacher]" not in r.stdout


def test_pure_rl_without_teacher_gpus():
    r = ok(*COMMON["pure_rl"], "--inference_gpu_ids=0", "--trainer_gpu_ids=1", VLLM)
    assert "no teacher" in r.stdout and "teacher" not in r.stdout.split("plan (")[1].split("no teacher")[0]
    assert "warning: teacher.eval_baseline: " in r.stderr


@pytest.mark.parametrize("name", ["hybrid", "gated", "pure_distillation", "token_kl"])
def test_kl_without_teacher_gpus_is_refused(name):
    msg = refused(*COMMON[name], "--inference_gpu_ids=0", "--trainer_gpu_ids=1", VLLM)
    assert msg.startswith("teacher_gpu_ids: ")


def test_default_and_demo_cpu_plans():
    r = ok()  # --config defaults to configs/rl.py
    assert "plan (CPU mode)" in r.stdout and "vLLM server [student] " in r.stdout
    assert "teacher = the student's base model: log-probs from the JAX trainer" in r.stdout
    assert "vLLM server [student + teacher] " in ok(VLLM).stdout
    r = ok("--config=configs/demo.py")
    assert "SmolLM2-135M-Instruct on CPU" in r.stdout and "JAX trainer on CPU" in r.stdout
    assert "name: ahoy" in r.stdout and r.stderr == ""


DRY_RUN_IMPORTS = """
import runpy, sys
sys.argv = ["ctxd_jax.train", "--config=configs/demo.py", "--dry_run"]
try:
    runpy.run_module("ctxd_jax.train", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print(" ".join(sorted(m for m in ("jax", "torch", "transformers", "vllm") if m in sys.modules)) or "none")
"""


def test_dry_run_imports_no_jax():
    # Checking a config (every refused start, every --dry_run) needs none of the heavy stacks: JAX alone would
    # triple its time.
    r = subprocess.run([sys.executable, "-c", DRY_RUN_IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "none", r.stdout


def test_demo_gpu_plan_shares_one_gpu():
    # The one-GPU quickstart (docs/layouts.md): one server (student adapter + teacher) and the trainer on GPU 0, shares within it.
    r = ok("--config=configs/demo_gpu.py", "--inference_gpu_ids=0", "--teacher_gpu_ids=0", "--trainer_gpu_ids=0")
    assert "vLLM server [student + teacher] " in r.stdout and "SmolLM2-135M-Instruct on GPUs 0 (dp=1" in r.stdout
    assert "JAX trainer on GPUs 0 " in r.stdout and "dtype: bfloat16" in r.stdout and r.stderr == ""


def test_reference_gpu_layout_infers_dp():
    # The fork's README layout: --inference_gpu_ids 0,1 --teacher_gpu_ids 2 --trainer_gpu_ids 3 (dp inferred = 2).
    r = ok("--inference_gpu_ids=0,1", "--teacher_gpu_ids=2", "--trainer_gpu_ids=3,4,5,6")
    assert "on GPUs 0,1 (dp=2, tp=1)" in r.stdout and "dp: 2\n" in r.stdout
    assert "num_train_workers=4" in r.stdout



# launch/four_gpus.sh's layouts: trainer on two GPUs; the student on two (dp=2), one of them shared with the teacher.
SHARED_GPU = ["--inference_gpu_ids=0,1", "--teacher_gpu_ids=1", "--trainer_gpu_ids=2,3",
              "--config.inference.parallel.dp=2", VLLM]


@pytest.mark.parametrize("args,servers", [
    (["--inference_gpu_ids=0", "--teacher_gpu_ids=1", "--trainer_gpu_ids=2,3", VLLM],
     ["[student] Qwen/Qwen3-4B-Instruct-2507 on GPUs 0 (dp=1, tp=1), a private Unix socket",
      "[teacher] Qwen/Qwen3-4B-Instruct-2507 on GPUs 1 (dp=1, tp=1), a private Unix socket"]),
    # Student replica and teacher each take gpu_memory_utilization of GPU 1: two shares must add up to <= 1.
    (SHARED_GPU + ["--config.inference.gpu_memory_utilization=0.45", "--config.inference.transport=tcp"],
     ["[student] Qwen/Qwen3-4B-Instruct-2507 on GPUs 0,1 (dp=2, tp=1), port 8000",
      "[teacher] Qwen/Qwen3-4B-Instruct-2507 on GPUs 1 (dp=1, tp=1), port 8001"]),
])
def test_reference_multi_gpu_layouts(args, servers):
    r = ok(*args)
    plan = r.stdout.split("plan (GPU mode):\n")[1].splitlines()
    assert plan == [f"  vLLM server {s}" for s in servers] + [
        "  JAX trainer on GPUs 2,3 (num_train_workers=2, tp=1)"], r.stdout


def test_gpu_ids_index_an_inherited_cuda_visible_devices():
    # Given GPUs 2,3 (by a scheduler, or beside another run), ids 0 and 1 are those two.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="2,3")
    r = ok("--inference_gpu_ids=0", "--trainer_gpu_ids=1", env=env)
    assert "on GPUs 0 (CUDA_VISIBLE_DEVICES=2) (dp=1" in r.stdout
    assert "JAX trainer on GPUs 1 (CUDA_VISIBLE_DEVICES=3) (num_train_workers=1" in r.stdout
    assert refused("--inference_gpu_ids=0", "--trainer_gpu_ids=2", env=env) == (
        "trainer_gpu_ids: GPU 2 is not one of the 2 in CUDA_VISIBLE_DEVICES='2,3' (GPU ids index into it)")


def test_benchmark_layouts_pass_the_cli_validation():
    # bench/layouts.py dry-runs every layout through this CLI (launch/four_gpus.sh for the four-GPU ones), each on
    # the GPUs it would get: all must pass, memory shares included.
    r = subprocess.run([sys.executable, "bench/layouts.py", "--dry_run", "--layouts=all", "--gpus=0,1,2,3,4,5,6,7"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "REFUSED" not in r.stdout, r.stdout + r.stderr
    # one (GPU 0) and split (1,2) come first in the same round, so mesh gets GPUs 3,4, which its ids 0,1 index
    assert "-- mesh (CUDA_VISIBLE_DEVICES=3,4): ok" in r.stdout
    assert "on GPUs 0,1 (CUDA_VISIBLE_DEVICES=3,4) (dp=2, tp=1)" in r.stdout
    assert "-- mesh4 (CUDA_VISIBLE_DEVICES=0,1,2,3): ok" in r.stdout and "on GPUs 0,1,2,3 (dp=4, tp=1)" in r.stdout
    eight = "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"
    assert f"-- separate8 ({eight}): ok" in r.stdout
    assert "[teacher] /tmp/qwen3-0.6b-random on GPUs 4,5 (dp=2" in r.stdout
    assert f"-- mesh8 ({eight}): ok" in r.stdout
    assert "JAX trainer on GPUs 0,1,2,3,4,5,6,7 (num_train_workers=8" in r.stdout


def test_shared_gpu_over_its_memory_is_refused():
    assert refused(*SHARED_GPU) == (
        "inference.gpu_memory_utilization: GPU 1 is shared (student server 0.9, teacher server 0.9: 1.80 > 1); "
        "lower it and/or trainer.gpu_memory_fraction")

@pytest.mark.parametrize("args,prefix", [
    (["--config.loss.teacher_tau=-1"], "loss.teacher_tau: must be >= 0"),
    (["--config.loss.student_tau=-0.5"], "loss.student_tau: must be >= 0"),
    (["--config.loss.adv_tau=-1"], "loss.adv_tau: must be >= 0"),
    (["--config.loss.ratio_type=seq"], "loss.ratio_type: 'seq' is not one of ('token', 'sequence')"),
    (["--config.batch_size=100"], "batch_size: 100 is not divisible by rollouts_per_example=16"),
    (["--config.optim.lr=0"], "optim.lr: must be > 0"),
    (["--config.sampling.max_tokens=0"], "sampling.max_tokens: must be > 0"),
    (["--config.sampling.temperature=-1"], "sampling.temperature: must be > 0"),
    (["--config.lora.rank=0"], "lora.rank: must be in (0, 512]"),
    (["--config.lora.alpha=0"], "lora.alpha: must be > 0"),
    (["--config.inference.parallel.dp=3", "--inference_gpu_ids=0,1", "--teacher_gpu_ids=2", "--trainer_gpu_ids=3"],
     "inference.parallel.dp: dp=3 x tp=1 != 2"),
    (["--config.loss.teacher_ta=1"], "config.loss.teacher_ta: unknown key 'teacher_ta' (did you mean 'teacher_tau'?)"),
    (["--config.nope=1"], "config.nope: unknown key 'nope'"),
    (["--config.loss.teacher_tau=abc"], "flag --config.loss.teacher_tau=abc: "),
    (["--config=configs/missing.py"], "config: cannot load 'configs/missing.py'"),
    (["--inference_gpu_ids=0,x", "--trainer_gpu_ids=1"], "inference_gpu_ids: 'x' is not a GPU id"),
    (["--trainer_gpu_ids=1"], "inference_gpu_ids: empty while other GPU ids are given"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--config=configs/demo.py", "--config.env.name=nope"], "env.name: unknown environment 'nope'"),
    (["--config.teacher.scorer=trainer", "--config.teacher.model=/models/other"],
     "teacher.scorer: 'trainer' scores with the student's base model (LoRA off), but teacher.model is"),
    (["--config.env.name=ahoy", "--config.env.ahoy.num_eval=0"], "env.ahoy.num_eval: 0 must be in [1, "),
    (["--config.env.args.seed=1"], "config.env.args.seed: unknown key 'args'"),
    (["--config.inference.transport=http"], "inference.transport: 'http' is not one of ('uds', 'tcp')"),
    (["--config.advantage.kl_normalize=max"], "advantage.kl_normalize: 'max' is not one of ('sum', 'mean')"),
    (["--config.loss.topk_tau=1", "--config.loss.topk=0", VLLM, *GPUS],
     "loss.topk: 0 (the full vocabulary) runs the teacher inside the train step, but a vLLM server scores it"),
    (["--config.teacher.lora=live", VLLM, *GPUS], "teacher.lora: 'live' needs the trainer to score the teacher"),
])
def test_refusals(args, prefix):
    assert refused(*args).startswith(prefix)


def test_dry_run_shows_the_teacher_in_the_train_step():
    flags = ["--config.loss.topk_tau=1", "--config.loss.topk=0", "--config.loss.topk_direction=jsd",
             "--config.loss.jsd_beta=0.3", "--config.teacher.lora=ema", "--config.teacher.ema_decay=0.9",
             "--config.advantage.kl_normalize=mean"]
    r = ok("--config=configs/demo.py", "--config.teacher.scorer=trainer", *flags)
    for line in ("topk: 0", "topk_direction: jsd", "jsd_beta: 0.3", "lora: ema", "ema_decay: 0.9",
                 "kl_normalize: mean"):
        assert f"\n  {line}\n" in r.stdout, line


def test_warning_for_setting_without_effect():
    r = ok("--config.advantage.kl_only_incorrect=true", "--config.loss.teacher_tau=0", "--config.loss.student_tau=0")
    assert "warning: advantage.kl_only_incorrect: no effect" in r.stderr
    r = ok("--config.buffer.skip_verification=true")
    assert "warning: buffer.skip_verification: " in r.stderr


def test_switching_environment_from_the_command_line():
    r = ok("--config=configs/rl.py", "--config.env.name=ahoy", "--config.env.ahoy.num_eval=32")
    env = r.stdout.split("\nenv:\n")[1].split("\neval:")[0]
    assert "name: ahoy" in env and "num_eval: 32" in env and "min_w" not in env
    assert "Start every answer with" in r.stdout  # the teacher context follows the environment


# Checks that need the files run before any process starts (no --dry_run here: a run that is refused).
def start_refused(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "vLLM" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0].removeprefix("error: ")


def tiny_run(model_dir, out, *extra):
    return ["--config=configs/demo.py", f"--config.model.path={model_dir}", f"--config.output_dir={out}", *extra]


def test_missing_model_folder_is_refused_before_start(tmp_path):
    msg = start_refused(*tiny_run(tmp_path / "nope", tmp_path / "out"))
    assert msg.startswith(f"model.path: '{tmp_path / 'nope'}' is not a folder")
    (tmp_path / "empty").mkdir()
    assert start_refused(*tiny_run(tmp_path / "empty", tmp_path / "out")).startswith("model.path: ")
    assert not (tmp_path / "out").exists()


def test_used_run_folder_is_refused_and_kept(tiny_model_dir, tmp_path):
    """A folder holding a run: without resume or overwrite, the start is refused and nothing of it is touched."""
    out = tmp_path / "run"
    (out / "weights" / "step_000003").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    msg = start_refused(*tiny_run(tiny_model_dir, out, "--config.ckpt.resume=false"))
    assert msg == (f"output_dir: {out} holds a run (metrics of 3 steps); continue it with --config.ckpt.resume=true "
                   "or start over with --config.ckpt.overwrite=true (deletes it)")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3 and (out / "weights" / "step_000003").is_dir()


def test_complete_run_only_redraws_its_plots(tiny_model_dir, tmp_path):
    """README command 1 run again: the demo resumes by default, and a run at max_steps starts nothing."""
    from configs import demo
    from ctxd_jax import rundir
    from ctxd_jax.config import resolve
    from ctxd_jax.plan import Gpus

    c = demo.get_config()
    c.update_from_flattened_dict({"model.path": tiny_model_dir, "output_dir": str(tmp_path)})
    config = resolve(c, Gpus())[0]
    ckpt = rundir.checkpointer(config)
    ckpt.save(config.max_steps, {"w": np.zeros(2)}, {"data_position": 0})
    ckpt.close()
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "reward/mean": 0.5}}\n' for s in (1, 2)))
    r = cli(*tiny_run(tiny_model_dir, tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().endswith(f"{tmp_path}: the run is complete (checkpoint at step {config.max_steps}, "
                                     f"max_steps {config.max_steps}); plots redrawn. Raise --config.max_steps to "
                                     "train on.")
    assert (tmp_path / "reward.png").exists() and not (tmp_path / "logs").exists()  # no server started


def test_the_key_is_never_printed():
    key = "k3y-" + "x" * 20
    r = ok("--config=configs/demo.py", f"--config.inference.api_key={key}")
    assert key not in r.stdout + r.stderr and "api_key: <set, not shown>" in r.stdout
    from ctxd_jax.train import _resume_command

    hint = _resume_command(["train", "--config=c.py", f"--config.inference.api_key={key}", "--config.seed=1"])
    assert key not in hint and hint.endswith("ctxd_jax.train --config=c.py --config.seed=1 --config.ckpt.resume=true")
