"""The exponential moving average of the student's LoRA state that teaches with `teacher.lora=ema`."""

import functools

import jax


@functools.partial(jax.jit, donate_argnums=0)
def ema_update(average, new, decay):
    """decay * average + (1 - decay) * new, leaf by leaf (in each leaf's dtype); `average` is donated."""
    return jax.tree.map(lambda a, n: (decay * a + (1.0 - decay) * n).astype(a.dtype), average, new)
