import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctxd_jax.finite import nonfinite_leaves
from ctxd_jax.loss import compute_loss
from ctxd_jax.models.hf import load_model
from ctxd_jax.models.logprobs import token_logprobs
from ctxd_jax.packing import pack
from ctxd_jax.records import Rollout
from ctxd_jax.sharding import make_mesh
from ctxd_jax.tiny import write_tiny_checkpoint
from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer, mismatch_kl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), "qwen3")


def _model(tiny_dir):
    model = load_model(tiny_dir, lora_rank=4, lora_alpha=8.0, seed=1)
    # lora_b starts at zero (PEFT): perturb it so that every LoRA factor has a non-zero gradient
    lora = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(3), 64))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lora))
    return model


def _batch(seed=0, teacher=True, samples=6, row_multiple=2):
    """`samples` random rollouts (pairs share a prompt group), packed in rows of 16 tokens."""
    rng = np.random.default_rng(seed)
    rollouts = []
    for i in range(samples):
        p, c = int(rng.integers(3, 8)), int(rng.integers(2, 9))
        rollouts.append(Rollout(
            example_id=str(i // 2), group=i // 2, prompt_ids=rng.integers(3, 300, p).tolist(),
            completion_ids=rng.integers(3, 300, c).tolist(), sampling_logprobs=(-5.5 + rng.normal(0, .2, c)).tolist(),
            finish_reason="stop", temperature=[1.0, 0.7][i % 2],
            teacher_logprobs=(-5.0 + rng.normal(0, .5, c)).tolist() if teacher else None))
    adv = rng.normal(size=samples).astype(np.float32)
    return pack(rollouts, adv, np.full(samples, 0.5, np.float32), seq_len=16, row_multiple=row_multiple)[0]


STEP = StepConfig(teacher_tau=0.3, student_tau=0.2, use_full_reward_baseline=False, micro_batch_rows=1,
                  chunk_size=8)


# sequence ratios: the whole batch's divisor is its rows, not its loss tokens; kl_tau reaches the loss
SEQUENCE = dataclasses.replace(STEP, ratio_type="sequence", masks=(("kl_tau", 0.5), ("sequence_clip_high", 2.0)))


@pytest.mark.parametrize("step", [STEP, SEQUENCE], ids=["token", "sequence"])
def test_accumulated_gradient_equals_direct_grad(tiny_dir, step):
    model = _model(tiny_dir)
    trainer = Trainer(model, make_mesh(), OptimConfig(lr=1e-2, total_steps=4), step)
    batch = _batch()
    assert batch.tokens.shape[0] >= 2  # several micro-batches
    loss, _, grads = trainer.grads(batch)

    def direct(lora):
        m = nnx.merge(trainer.graphdef, lora, trainer.rest)
        lp, _ = token_logprobs(m, jnp.asarray(batch.tokens), jnp.asarray(batch.positions),
                               jnp.asarray(batch.segment_ids), jnp.asarray(batch.temperatures))
        return compute_loss(lp, batch.sampling_logprobs, batch.teacher_logprobs, batch.advantages, batch.kl_gates,
                            batch.loss_mask, teacher_tau=0.3, student_tau=0.2, use_full_reward_baseline=False,
                            segment_ids=batch.segment_ids, ratio_type=step.ratio_type, **dict(step.masks))[0]

    ref_loss, ref_grads = jax.value_and_grad(direct)(trainer.lora)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)
    flat, ref = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref) and any(np.abs(r).max() > 0 for r in ref)
    for g, r in zip(flat, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_step_changes_only_lora_and_reports_metrics(tiny_dir):
    model = _model(tiny_dir)
    before = jax.tree.map(np.asarray, nnx.state(model))
    trainer = Trainer(model, make_mesh(), OptimConfig(lr=1e-2, warmup_steps=0, total_steps=4), STEP)
    batch = _batch(1)
    metrics = trainer.step(batch)
    for key in ("loss", "grad_norm", "lr", "entropy", "mismatch_kl", "teacher_kl", "teacher_seq_kl", "masked_total"):
        assert np.isfinite(metrics[key]), key
    assert metrics["lr"] == pytest.approx(1e-2) and metrics["grad_norm"] > 0 and metrics["entropy"] > 0
    after = nnx.state(trainer.model())
    changed = {path: not np.array_equal(before_v, np.asarray(after_v))
               for (path, before_v), (_, after_v) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after))}
    assert changed and all(changed[p] == (p[-1] in ("lora_a", "lora_b")) for p in changed)
    # the trainer scores with the updated weights, and its own log-probs have zero mismatch
    lp = trainer.logprobs(batch)
    assert mismatch_kl(lp, lp, batch.loss_mask) == 0.0 and lp.shape == batch.tokens.shape
    # state round trip
    arrays = jax.tree.map(np.asarray, trainer.state_arrays())
    trainer.step(batch)
    trainer.load_state_arrays(jax.tree.map(jnp.asarray, arrays))
    assert trainer.updates == 1
    np.testing.assert_array_equal(trainer.logprobs(batch), lp)


def test_micro_batch_shape_errors(tiny_dir):
    trainer = Trainer(_model(tiny_dir), make_mesh(), OptimConfig(lr=1e-3), StepConfig(micro_batch_rows=4))
    with pytest.raises(ValueError, match="micro_batch_rows"):
        trainer.step(_batch(teacher=False))


def test_nonfinite_advantages_skip_the_update(tiny_dir):
    """A NaN advantage makes the loss and gradient NaN: the step keeps the LoRA and optimizer state as they were
    and says so; the next finite batch trains as usual."""
    trainer = Trainer(_model(tiny_dir), make_mesh(), OptimConfig(lr=1e-2, total_steps=4), STEP)
    before = jax.tree.map(np.asarray, trainer.state_arrays())
    poisoned = _batch(2)
    poisoned.advantages[poisoned.loss_mask] = np.nan
    metrics = trainer.step(poisoned)
    assert metrics["nonfinite_skipped"] == 1.0 and not np.isfinite(metrics["loss"])
    after = jax.tree.map(np.asarray, trainer.state_arrays())
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert trainer.updates == 0
    assert trainer.step(_batch(1))["nonfinite_skipped"] == 0.0 and trainer.updates == 1
    assert not nonfinite_leaves(trainer.state_arrays())


def test_a_dropped_trainer_frees_its_weights_at_once(tiny_dir):
    """Nothing in a Trainer refers back to it, so its last reference gone, its arrays go too, without waiting for
    the cycle collector: a process that makes a second trainer (a benchmark's probe, the next run) never holds two
    copies of the weights on the GPU."""
    import gc
    import weakref

    trainer = Trainer(_model(tiny_dir), make_mesh(), OptimConfig(lr=1e-3), STEP)
    trainer.step(_batch(1))
    gone = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert gone() is None
    finally:
        gc.enable()
