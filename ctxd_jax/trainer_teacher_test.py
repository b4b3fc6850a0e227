"""The teacher inside the train step: full-vocabulary divergences on the batch's teacher rows, and teacher.lora."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctxd_jax.models.hf import load_model
from ctxd_jax.packing import pack
from ctxd_jax.records import Rollout
from ctxd_jax.sharding import make_mesh
from ctxd_jax.tiny import write_tiny_checkpoint
from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer

STEP = StepConfig(topk_tau=1.0, full_vocab=True, micro_batch_rows=1, chunk_size=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), "qwen3")


def _trainer(tiny_dir, step=STEP):
    model = load_model(tiny_dir, lora_rank=4, lora_alpha=8.0, seed=1)
    lora = nnx.state(model, nnx.LoRAParam)  # lora_b starts at zero: perturb it, so the student is not the base
    keys = iter(jax.random.split(jax.random.key(3), 64))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lora))
    return Trainer(model, make_mesh(), OptimConfig(lr=1e-2, total_steps=4), step)


def _rollouts(seed=0, samples=6, same_prompt=False):
    """Random rollouts whose teacher prompt is longer than the student's (a context), or the student's own (then
    sampled at temperature 1, the teacher's)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(samples):
        prompt = rng.integers(3, 300, int(rng.integers(3, 8))).tolist()
        c = int(rng.integers(2, 9))
        out.append(Rollout(str(i // 2), i // 2, prompt, rng.integers(3, 300, c).tolist(), [-5.0] * c, "stop",
                           temperature=1.0 if same_prompt else [1.0, 0.7][i % 2],
                           teacher_prompt_ids=prompt if same_prompt else rng.integers(3, 300, 9).tolist() + prompt))
    return out


def _pack(rollouts, trainer, seq_len, **kw):
    zeros = np.zeros(len(rollouts), np.float32)  # no task advantage: the loss is the distillation term alone
    return pack(rollouts, zeros, seq_len=seq_len, row_multiple=trainer.row_multiple, teacher_rows=True, **kw)[0]


@pytest.mark.parametrize("direction", ["forward", "jsd"])
def test_full_vocabulary_equals_top_k_at_the_vocabulary_size_and_packing_changes_nothing(tiny_dir, direction):
    trainer = _trainer(tiny_dir, dataclasses.replace(STEP, topk_direction=direction))
    rollouts = _rollouts()
    vocab = trainer.model().lm_head_kernel().shape[1]
    # the teacher's top-V (all of the vocabulary), scored as the pipeline does (the base model, temperature 1)
    scores = trainer.score([r.teacher_prompt_ids + r.completion_ids for r in rollouts], lora=trainer.base_lora(),
                           starts=[len(r.teacher_prompt_ids) for r in rollouts], topk=vocab)
    for r, s in zip(rollouts, scores):
        r.teacher_topk_ids, r.teacher_topk_logprobs = s.topk_ids, s.topk_logprobs
    topk_batch = _pack(rollouts, trainer, 24, topk=vocab)
    full = topk_batch._replace(teacher_topk_ids=None, teacher_topk_logprobs=None)
    assert full.teacher_tokens.shape[1] > 24  # the teacher's rows are longer than the student's
    loss, metrics, grads = trainer.grads(full)
    topk_trainer = Trainer(trainer.model(), trainer.mesh, trainer.optim_config,
                           dataclasses.replace(trainer.step_config, full_vocab=False))
    ref_loss, _, ref_grads = topk_trainer.grads(topk_batch)
    assert float(loss) > 1e-3
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-6)
    # more samples to a row (another packing, one row per micro-batch): the same loss and gradients
    packed = _pack(rollouts, trainer, 64)
    assert packed.tokens.shape[0] < full.tokens.shape[0]
    loss2, _, grads2 = trainer.grads(packed)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["off", "live"])
def test_live_teacher_on_the_students_own_prompt_teaches_nothing(tiny_dir, mode):
    trainer = _trainer(tiny_dir, dataclasses.replace(STEP, teacher_lora=mode))
    batch = _pack(_rollouts(1, same_prompt=True), trainer, 32)
    metrics = trainer.step(batch)
    if mode == "live":  # the same weights on the same tokens: no divergence, no gradient
        assert metrics["topk_kl"] < 1e-5 and metrics["grad_norm"] < 1e-4
    else:  # the base model teaches the LoRA student
        assert metrics["topk_kl"] > 1e-3 and metrics["grad_norm"] > 1e-3


def test_ema_teacher_follows_the_average_and_round_trips(tiny_dir):
    trainer = _trainer(tiny_dir, dataclasses.replace(STEP, teacher_lora="ema", ema_decay=0.5))
    batch = _pack(_rollouts(2), trainer, 32)
    want = jax.tree.map(lambda x: np.asarray(x, np.float64), trainer.lora)
    assert trainer.teacher_lora() is trainer.ema
    for _ in range(2):
        trainer.step(batch)
        want = jax.tree.map(lambda a, n: 0.5 * a + 0.5 * np.asarray(n, np.float64), want, trainer.lora)
    for g, w in zip(jax.tree.leaves(trainer.ema), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    saved = jax.tree.map(np.asarray, trainer.state_arrays())
    assert "teacher_ema" in saved
    after_save = trainer.step(batch)
    trainer.load_state_arrays(jax.tree.map(jnp.asarray, saved))
    again = trainer.step(batch)  # the restored EMA teaches the restored student as before
    assert again["loss"] == pytest.approx(after_save["loss"], rel=1e-6)
