"""A data-parallel train step moves only the LoRA gradients (and a few scalars) between devices, and gives the
one-device step's loss, metrics and gradients.

With frozen weights replicated and rows sharded over the devices, each device should compute its own rows only;
the compiled 2-device step (ctxd_jax/hlo.py) must hold no all-gather or other collective besides the all-reduce of
the gradients, and its loops the same trip counts as the 1-device step's (a log-prob chunk loop over the flattened
rows once made every device gather every row's hidden states and compute the whole batch's LM head). Runs in a
subprocess on 2 fake CPU devices (XLA_FLAGS must be set before jax starts).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ctxd_jax import hlo
from ctxd_jax.sharding import make_mesh, shard_model
from ctxd_jax.trainer import OptimConfig, Trainer
from ctxd_jax.trainer_test import STEP, _batch, _model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(tiny_dir, devices):
    model = _model(tiny_dir)
    mesh = make_mesh(devices)
    shard_model(model, mesh, shard_weights=False)
    return Trainer(model, mesh, OptimConfig(lr=1e-2, total_steps=4), STEP)


def _check_hlo_counts_loop_trips():
    """A collective inside a 3-step scan (depending on the carry, so not hoisted out) counts 3 runs."""
    mesh = make_mesh()
    total = jax.shard_map(lambda y: jax.lax.psum(y, "fsdp"), mesh=mesh, in_specs=P("fsdp"), out_specs=P())

    @jax.jit
    def f(x):
        return jax.lax.scan(lambda c, _: (c + total(x * c.sum()), None), jnp.ones(3), None, length=3)[0]

    found = hlo.collectives(f.lower(jnp.ones(6)).compile().as_text())
    assert [(c.kind, c.times, c.operand_bytes) for c in found] == [("all-reduce", 3, 12)], found


def _check(tiny_dir):
    assert len(jax.devices()) == 2
    _check_hlo_counts_loop_trips()
    batch = _batch(row_multiple=2)
    one, two = _trainer(tiny_dir, jax.devices()[:1]), _trainer(tiny_dir, jax.devices())
    assert two.dp == 2

    programs = {n: two.compiled_step(batch)[name].as_text() for n, name in ((2, "grad"), ("apply", "apply"))}
    found = hlo.collectives(programs[2])
    assert {c.kind for c in found} == {"all-reduce"}, hlo.table(found)
    lora_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(two.lora))
    assert sum(c.total_bytes for c in found) <= lora_bytes + 1024, (lora_bytes, hlo.table(found))
    assert not hlo.collectives(programs["apply"]), hlo.table(hlo.collectives(programs["apply"]))
    trips = [t for _, t, _ in hlo.loops(one.compiled_step(batch)["grad"].as_text())]
    assert [t for _, t, _ in hlo.loops(programs[2])] == trips and trips, trips

    (want_loss, want_metrics, want), (loss, metrics, grads) = one.grads(batch), two.grads(batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(np.abs(w).max() > 0 for w in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-4)
    print("OK")


def test_two_devices_exchange_only_lora_gradients(tmp_path):
    from ctxd_jax.tiny import write_tiny_checkpoint

    tiny_dir = write_tiny_checkpoint(str(tmp_path), "qwen3")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "ctxd_jax.trainer_mesh_test", tiny_dir], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    _check(sys.argv[1])
