import jax.numpy as jnp
import numpy as np
import pytest

from ctxd_jax.finite import NonFiniteError, Streak, check_finite, nonfinite_leaves, tree_finite


def test_tree_finite_and_leaves():
    good = {"a": jnp.ones(3), "n": jnp.arange(3)}
    assert bool(tree_finite(good)) and nonfinite_leaves(good) == []
    bad = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, np.inf])}, "n": jnp.arange(3)}
    assert not bool(tree_finite(good, bad))
    assert nonfinite_leaves(bad) == ["['b']['c']"]
    with pytest.raises(NonFiniteError, match=r"^checkpoint at step 3 not written: 1 arrays .*\['b'\]\['c'\]"):
        check_finite(bad, "checkpoint at step 3 not written")
    check_finite(good, "adapter")


def test_streak_stops_at_the_limit_in_a_row():
    s = Streak(2)
    s.update(1, True)
    s.update(2, False)  # a finite step resets the count
    s.update(3, True)
    with pytest.raises(NonFiniteError, match=r"^optim.max_nonfinite_steps: 2 steps in a row \(steps 3-4\)"):
        s.update(4, True)
