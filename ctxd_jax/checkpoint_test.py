import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctxd_jax.checkpoint import CheckpointError, Checkpointer


def _state(seed):
    k = jax.random.PRNGKey(seed)
    lora = {"layers": {"q_proj": {"lora_a": jax.random.normal(k, (2, 4, 3)), "lora_b": jnp.zeros((2, 3, 5))}}}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = opt.init(lora)
    grads = jax.tree.map(jnp.ones_like, lora)
    _, opt_state = opt.update(grads, opt_state, lora)
    return {"lora": lora, "opt_state": opt_state}


def test_round_trip_and_latest(tmp_path):
    ck = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    assert ck.latest_step() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ck.restore(_state(0))
    key = jax.random.key_data(jax.random.PRNGKey(7))
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"rng": np.asarray(key).tolist(), "data_position": 10 * step})
    ck.close()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3"]  # keep=2
    # a torn save (killed mid-write) is not a complete checkpoint
    os.makedirs(tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-123")
    ck = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    assert ck.latest_step() == 3
    arrays, meta = ck.restore(_state(0))
    expected = _state(3)
    assert jax.tree.structure(arrays) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(arrays), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    assert meta["step"] == 3 and meta["data_position"] == 30 and meta["rng"] == np.asarray(key).tolist()
    ck.close()


def test_config_is_stored_and_read_alone(tmp_path):
    config = {"batch_size": 16, "lora": {"rank": 8, "targets": ("q_proj", "v_proj")}}
    ck = Checkpointer(str(tmp_path / "ckpt"), config=config)
    ck.save(5, _state(0), {"data_position": 50})
    ck.close()
    meta = Checkpointer(str(tmp_path / "ckpt")).meta(5)
    assert meta["config"] == {"batch_size": 16, "lora": {"rank": 8, "targets": ["q_proj", "v_proj"]}}
    assert meta["step"] == 5 and meta["data_position"] == 50
    with pytest.raises(CheckpointError, match="/6: cannot read its metadata"):
        Checkpointer(str(tmp_path / "ckpt")).meta(6)
