import jax
import jax.numpy as jnp
import numpy as np

from ctxd_jax.ema import ema_update


def test_ema_update_against_numpy_over_several_steps():
    rng = np.random.default_rng(0)
    steps = [{"a": rng.normal(size=(3, 4)).astype(np.float32), "b": [rng.normal(size=5).astype(np.float32)]}
             for _ in range(4)]
    want = jax.tree.map(np.float64, steps[0])
    got = jax.tree.map(jnp.asarray, steps[0])
    for new in steps[1:]:
        want = jax.tree.map(lambda a, n: 0.9 * a + 0.1 * n, want, new)
        got = ema_update(got, jax.tree.map(jnp.asarray, new), 0.9)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_ema_decay_zero_is_the_live_state_and_dtypes_are_kept():
    avg = {"w": jnp.zeros(3, jnp.bfloat16)}
    out = ema_update(avg, {"w": jnp.ones(3, jnp.bfloat16)}, 0.0)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), 1.0)
