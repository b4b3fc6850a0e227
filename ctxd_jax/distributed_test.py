"""Two processes x 2 CPU devices (jax.distributed, gloo collectives) train exactly like one process x 4 devices.

Each side runs in its own subprocess (`python -m ctxd_jax.distributed_test TINY_DIR OUT`): device counts and
jax.distributed must be set before JAX starts. Same tiny checkpoint, same LoRA, same global batch; compared: loss,
LoRA gradients (also from each process's own rows of the batch only, given as the global batch's or as its own packed
batch), trainer log-probs (sharded over both
processes, gathered) and the loss after an optimizer step.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ctxd_jax import distributed, hosts, sharding
from ctxd_jax.config import ConfigError
from ctxd_jax.models.hf import load_model
from ctxd_jax.tiny import write_tiny_checkpoint
from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer
from ctxd_jax.trainer_test import _batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = StepConfig(teacher_tau=0.3, student_tau=0.2, use_full_reward_baseline=False, micro_batch_rows=4, chunk_size=8)


def test_settings_from_env():
    assert distributed.settings_from_env({}) == distributed.Settings("", 1, 0)
    s = distributed.settings_from_env({"CTXD_COORDINATOR_ADDRESS": "h0:1234", "CTXD_NUM_PROCESSES": "2",
                                       "CTXD_PROCESS_ID": "1"})
    assert s == distributed.Settings("h0:1234", 2, 1)
    with pytest.raises(ValueError, match="^CTXD_COORDINATOR_ADDRESS: "):
        distributed.settings_from_env({"CTXD_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="^CTXD_PROCESS_ID: 2 is not in"):
        distributed.Settings("h0:1", 2, 2)
    with pytest.raises(ValueError, match="^CTXD_NUM_PROCESSES: 'two'"):
        distributed.settings_from_env({"CTXD_NUM_PROCESSES": "two"})
    assert distributed.initialize(distributed.Settings()) is False  # one process: nothing to join


def _run(tiny_dir: str, out: str) -> None:
    distributed.initialize()  # from CTXD_* (absent for the one-process reference)
    mesh = sharding.make_mesh()  # every process's devices
    model = load_model(tiny_dir, lora_rank=4, lora_alpha=8.0, seed=1, mesh=mesh)
    # lora_b starts at zero: perturb every factor (host numpy, same on every process) so all get gradients
    rng = np.random.default_rng(3)
    lora = nnx.state(model, nnx.LoRAParam)
    noisy = jax.tree.map(lambda x: (distributed.to_host(x) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                         lora)
    nnx.update(model, sharding.shard_state(noisy, mesh))
    trainer = Trainer(model, mesh, OptimConfig(lr=1e-2), STEP)
    batch = _batch(samples=10, row_multiple=4)
    loss, _, grads = trainer.grads(batch)
    arrays = {"loss": distributed.to_host(loss), "logprobs": trainer.logprobs(batch)}
    for path, value in nnx.to_flat_state(grads):
        arrays["grad/" + "/".join(map(str, path))] = distributed.to_host(value[...])
    # The same from only this process's rows of the batch (what the loop sends each process).
    rows = trainer.share(batch, jax.process_index())
    assert len(rows.index) * jax.process_count() == rows.rows
    loss, _, grads = trainer.grads(rows)
    arrays["rows/loss"] = distributed.to_host(loss)
    for path, value in nnx.to_flat_state(grads):
        arrays["rows/grad/" + "/".join(map(str, path))] = distributed.to_host(value[...])
    # The same from this process's rows as its own packed batch (what the loop joins the step with).
    loss, _, grads = trainer.grads(trainer.local(rows.batch))
    arrays["local/loss"] = distributed.to_host(loss)
    for path, value in nnx.to_flat_state(grads):
        arrays["local/grad/" + "/".join(map(str, path))] = distributed.to_host(value[...])
    # Trainer-side scores (teacher with LoRA off, behaviour under a snapshot): each process places its own rows.
    seqs = [batch.tokens[0, :n].tolist() for n in (5, 9, batch.tokens.shape[1])]
    for name, lora in (("snapshot", trainer.snapshot_lora()), ("base", trainer.base_lora())):
        for i, s in enumerate(trainer.score(seqs, lora=lora, topk=2)):
            arrays[f"score/{name}/{i}"], arrays[f"score/{name}/{i}/topk"] = s.logprobs, s.topk_logprobs
    # The run folder: one every process sees passes; a folder of each process's own is refused in every process.
    distributed.check_shared(os.path.dirname(out))
    own = f"{out}.folder{jax.process_index()}"
    os.makedirs(own)
    try:
        distributed.check_shared(own)
        refused = ""
    except ConfigError as e:
        refused = str(e)
    assert ("process 1 does not see" in refused) == (jax.process_count() > 1), refused
    trainer.step(batch)
    arrays["loss_after_step"] = np.float32(trainer.step(batch)["loss"])
    if jax.process_index() == 0:
        np.savez(out, **arrays)
    print("OK", jax.process_index(), jax.process_count(), len(jax.devices()), len(jax.local_devices()), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    tiny = write_tiny_checkpoint(str(tmp_path / "tiny"), "qwen3")
    base = {k: v for k, v in os.environ.items() if k not in hosts.ENV}
    base.update(JAX_PLATFORMS="cpu")
    port = _free_port()

    def start(devices: int, out: str, **env):
        env = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env)
        return subprocess.Popen([sys.executable, "-m", "ctxd_jax.distributed_test", tiny, out], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    procs = [start(4, one)] + [
        start(2, two, CTXD_COORDINATOR_ADDRESS=f"localhost:{port}", CTXD_NUM_PROCESSES="2", CTXD_PROCESS_ID=str(i))
        for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log, want in zip(procs, logs, ["OK 0 1 4 4", "OK 0 2 4 2", "OK 1 2 4 2"]):
        assert p.returncode == 0 and want in log, log[-3000:]
    want, got = np.load(one), np.load(two)
    assert sorted(want.files) == sorted(got.files) and len(want.files) > 10
    for key in want.files:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=2e-6, err_msg=key)
    assert np.abs(want["grad/layers/mlp/down_proj/lora_a"]).max() > 0


if __name__ == "__main__":
    _run(*sys.argv[1:3])
