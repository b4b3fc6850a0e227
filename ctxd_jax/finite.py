"""No non-finite value reaches the weights, a checkpoint or a published adapter.

The train step skips an update whose loss, gradient or result is not finite (trainer.py); `Streak` stops the run
after `optim.max_nonfinite_steps` such steps in a row; `check_finite` refuses to save or publish a state holding a
NaN or an infinity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ctxd_jax.distributed import to_host


class NonFiniteError(RuntimeError):
    """The run's state or its updates are not finite; str() is one line."""


def tree_finite(*trees) -> jax.Array:
    """A scalar bool (traced inside jit): every floating leaf of `trees` is finite."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


@jax.jit
def _finite_flags(leaves):
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def nonfinite_leaves(tree) -> list[str]:
    """Paths of the floating leaves of `tree` holding a NaN or an infinity. With several processes a collective:
    every process calls it, in the same order (each checks its own shards; the flags are then everyone's)."""
    leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    flags = _finite_flags([leaf for _, leaf in leaves])
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(leaves, flags) if not to_host(ok)]


def check_finite(tree, refused: str) -> None:
    """Raise NonFiniteError starting with `refused` (e.g. 'checkpoint at step 3 not written') if any leaf of `tree`
    is not finite."""
    if bad := nonfinite_leaves(tree):
        raise NonFiniteError(f"{refused}: {len(bad)} arrays hold NaN or infinity (first {bad[0]})")


class Streak:
    """Counts train steps skipped in a row for a non-finite loss or gradient; the `limit`-th stops the run."""

    def __init__(self, limit: int):
        self.limit, self.count, self.first = limit, 0, None

    def update(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.count, self.first = 0, None
            return
        self.count += 1
        self.first = step if self.first is None else self.first
        if self.count >= self.limit:
            raise NonFiniteError(
                f"optim.max_nonfinite_steps: {self.count} steps in a row (steps {self.first}-{step}) had a non-finite "
                f"loss or gradient; their updates were skipped and nothing non-finite was saved (check the rewards, "
                f"optim.lr and the loss taus)")
