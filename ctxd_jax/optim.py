"""The optimizer of the LoRA weights: AdamW after global-norm clipping, with a warmup and a decay schedule."""

from __future__ import annotations

from dataclasses import dataclass

import optax


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    max_norm: float = 1.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine (decay to 0 at total_steps)
    total_steps: int = 1


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps, then constant / linear to 0 / cosine to 0 at total_steps."""
    decay_steps = max(c.total_steps - c.warmup_steps, 1)
    if c.schedule == "constant":
        main = optax.constant_schedule(c.lr)
    elif c.schedule == "linear":
        main = optax.linear_schedule(c.lr, 0.0, decay_steps)
    elif c.schedule == "cosine":
        main = optax.cosine_decay_schedule(c.lr, decay_steps)
    else:
        raise ValueError(f"optim.schedule: {c.schedule!r} is not one of constant, linear, cosine")
    if c.warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, c.warmup_steps), main], [c.warmup_steps])


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(c.max_norm),
                       optax.adamw(lr_schedule(c), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))
