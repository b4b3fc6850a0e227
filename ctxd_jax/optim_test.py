import pytest

from ctxd_jax.optim import OptimConfig, lr_schedule


def test_lr_schedules():
    c = OptimConfig(lr=1.0, warmup_steps=2, schedule="linear", total_steps=6)
    s = lr_schedule(c)
    assert [float(s(i)) for i in range(7)] == pytest.approx([0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert float(lr_schedule(OptimConfig(lr=0.1))(100)) == pytest.approx(0.1)
    assert float(lr_schedule(OptimConfig(lr=1.0, schedule="cosine", total_steps=4))(4)) == pytest.approx(0.0)
