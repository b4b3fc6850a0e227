"""Trainer-side scoring: packed = unpacked, teacher (LoRA off) = transformers' base model, behaviour log-probs under a
snapshot = the trainer's log-probs before the step, and the same on a 2-device mesh."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ctxd_jax.envs import get_env
from ctxd_jax.inference.teacher import render_prompt, teacher_prompt_ids
from ctxd_jax.models.hf import load_model
from ctxd_jax.models.hf_test import randomise_lora
from ctxd_jax.models.logprobs import token_logprobs
from ctxd_jax.packing import pack
from ctxd_jax.records import Rollout
from ctxd_jax.scoring import (MIN_ROW, behaviour_logprobs, bucket, every_position, rows_per_call, score_rows_jit,
                              score_sequences, score_teacher_in_trainer)
from ctxd_jax.sharding import make_mesh
from ctxd_jax.tiny import write_tiny_checkpoint
from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer

K = 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), "qwen3", std=0.1)


def _trainer(tiny_dir, **step):
    # A non-zero LoRA, so scoring with LoRA on and off differ (lora_b starts at zero).
    model = randomise_lora(load_model(tiny_dir, lora_rank=4, lora_alpha=8.0, seed=1), seed=2, std=0.1)
    return Trainer(model, make_mesh(), OptimConfig(lr=1e-1), StepConfig(chunk_size=16, **step))


@pytest.fixture(scope="module")
def trainer(tiny_dir):
    return _trainer(tiny_dir)


def test_bucket_ladder_and_rows_per_call():
    assert [bucket(n) for n in (1, 7, 8, 9, 16, 17, 129, 266, 5000)] == [1, 7, 8, 10, 16, 20, 160, 320, 5120]
    assert bucket(3, MIN_ROW) == 128
    assert all(n <= bucket(n) < 1.25 * n + 1 for n in range(1, 3000))
    assert rows_per_call(5, 128, batch_tokens=8192) == 5
    assert rows_per_call(9, 128, batch_tokens=8192) == 10
    assert rows_per_call(9, 128, batch_tokens=512) == 4  # capped by the budget
    assert rows_per_call(3, 128, batch_tokens=8192, row_multiple=4) == 4
    assert rows_per_call(30, 4096, batch_tokens=1024, row_multiple=2) == 2  # at least one row per device


@functools.partial(jax.jit, static_argnames=("graphdef", "topk"))
def _alone(lora, rest, tokens, length, temperature, *, graphdef, topk):
    """token_logprobs of one sequence alone in a [1, T] row, padding after it."""
    t = tokens.shape[1]
    segments = (jnp.arange(t) < length).astype(jnp.int32)[None]
    out = token_logprobs(nnx.merge(graphdef, lora, rest), tokens, jnp.arange(t)[None], segments,
                         jnp.full((1, t), temperature), topk=topk)
    return (out[0],) + tuple(out[2:])


def _unpacked(trainer, lora, seq, start, temperature, topk):
    tokens = np.zeros((1, 128), np.int32)
    tokens[0, :len(seq)] = seq
    out = _alone(lora, trainer.rest, tokens, len(seq), temperature, graphdef=trainer.graphdef, topk=topk)
    return [np.asarray(x[0, start:len(seq)]) for x in out]


def test_packed_equals_unpacked(trainer):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 300, n).tolist() for n in (40, 7, 90, 2, 61, 33, 120, 15)]
    starts = [int(rng.integers(1, len(s) + 1)) for s in seqs]
    temps = [1.0, 0.7, 1.3, 1.0, 0.5, 1.0, 0.9, 1.1]
    lora = trainer.snapshot_lora()
    many = trainer.score(seqs, lora=lora, starts=starts, temperatures=temps, topk=K)  # one call, shared rows
    few = trainer.score(seqs, lora=lora, starts=starts, temperatures=temps, topk=K, batch_tokens=128)  # a row each
    for s, start, t, a, b in zip(seqs, starts, temps, many, few):
        want_lp, want_ids, want_top = _unpacked(trainer, lora, s, start, t, K)
        assert a.logprobs.shape == (len(s) - start,) and a.topk_ids.shape == (len(s) - start, K)
        for got in (a, b):
            np.testing.assert_allclose(got.logprobs, want_lp, atol=1e-5)
            np.testing.assert_array_equal(got.topk_ids, want_ids)
            np.testing.assert_allclose(got.topk_logprobs, want_top, atol=1e-5)
    with pytest.raises(ValueError, match="sequence 1: start 0"):
        trainer.score(seqs[:2], lora=lora, starts=[1, 0])


def _score_every_position(trainer, lora, seqs, **kw):
    """The straightforward computation on the same packed rows: LM head and top-k at every position of every row."""

    def run(rows):
        return score_rows_jit(lora, trainer.rest, rows, graphdef=trainer.graphdef,
                              chunk_size=trainer.step_config.chunk_size, topk=K)

    return score_sequences(every_position(run), seqs, **kw)


def test_scored_positions_only_equal_every_position(trainer):
    rng = np.random.default_rng(3)
    # Long prompts, short completions (a teacher's shape), an empty completion, several calls of several rows.
    seqs = [rng.integers(3, 300, n).tolist() for n in (100, 90, 120, 60, 110, 30)]
    starts = [80, 85, 100, 60, 20, 29]
    temps = [1.0, 0.7, 1.0, 1.0, 1.2, 1.0]
    lora = trainer.snapshot_lora()
    for batch_tokens in (256, 8192):
        kw = dict(starts=starts, temperatures=temps, batch_tokens=batch_tokens)
        got = trainer.score(seqs, lora=lora, topk=K, **kw)
        want = _score_every_position(trainer, lora, seqs, **kw)
        for s, start, g, w in zip(seqs, starts, got, want):
            assert g.logprobs.shape == (len(s) - start,) and g.topk_logprobs.shape == (len(s) - start, K)
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-6)
            np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
            np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, atol=1e-6)


def _rollouts(tok, examples, completions):
    out = []
    for g, ex in enumerate(examples):
        prompt = render_prompt(tok, ex.messages)
        for c in completions[g]:
            out.append(Rollout(example_id=ex.id, group=g, prompt_ids=prompt, completion_ids=c,
                               sampling_logprobs=[0.0] * len(c), finish_reason="length", temperature=0.8))
    return out


def test_teacher_scores_equal_transformers_base_model(trainer, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    env = get_env("ahoy")
    examples = list(env.examples("train")[:2])
    rng = np.random.default_rng(1)
    completions = [[rng.integers(3, 200, n).tolist() for n in (6, 9)], [rng.integers(3, 200, 4).tolist(), []]]
    rollouts = _rollouts(tok, examples, completions)
    score_teacher_in_trainer(trainer, tok, env, examples, rollouts, env.default_context, topk=K)

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for r in rollouts:
        prompt = teacher_prompt_ids(tok, env, examples[r.group], env.default_context, r.prompt_ids)
        assert len(prompt) > len(r.prompt_ids) + 20  # the context is in the teacher's prompt
        ids = prompt + r.completion_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, len(prompt) - 1:-1].double(), -1).numpy()
        n = len(r.completion_ids)
        assert len(r.teacher_logprobs) == len(r.teacher_topk_ids) == len(r.teacher_topk_logprobs) == n
        np.testing.assert_allclose(r.teacher_logprobs, ref[np.arange(n), r.completion_ids], atol=1e-4)
        np.testing.assert_array_equal(np.reshape(r.teacher_topk_ids, (n, K)), np.argsort(-ref, -1)[:, :K])
        np.testing.assert_allclose(np.reshape(r.teacher_topk_logprobs, (n, K)), -np.sort(-ref, -1)[:, :K], atol=1e-4)
    no_topk = [Rollout(**{**r.__dict__, "teacher_logprobs": None}) for r in rollouts[:1]]
    score_teacher_in_trainer(trainer, tok, env, examples, no_topk, "", topk=0)
    assert no_topk[0].teacher_topk_ids is None
    # No context: the teacher scores the student's own prompt.
    at_one = [Rollout(**{**rollouts[0].__dict__, "temperature": 1.0})]
    own = behaviour_logprobs(trainer, at_one, trainer.base_lora())
    np.testing.assert_allclose(no_topk[0].teacher_logprobs, own[0], atol=1e-6)
    # With the trainer's LoRA on, the same sequence scores differently: the teacher really is the base model.
    on = behaviour_logprobs(trainer, at_one, trainer.lora)
    assert np.max(np.abs(np.subtract(on[0], own[0]))) > 1e-2


def test_packed_teacher_topk_is_the_teachers_full_sequence_topk(trainer, tiny_dir):
    """What the loss reads (TrainBatch.teacher_topk_* at loss-mask positions) is the top-k of the teacher's whole
    sequence (teacher prompt + completion, every position scored) at the completion's positions."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    env = get_env("ahoy")
    examples = list(env.examples("train")[:3])
    rng = np.random.default_rng(4)
    completions = [[rng.integers(3, 200, n).tolist() for n in (12, 30)] for _ in examples]
    rollouts = _rollouts(tok, examples, completions)
    score_teacher_in_trainer(trainer, tok, env, examples, rollouts, env.default_context, topk=K)
    batch, _ = pack(rollouts, np.zeros(len(rollouts)), seq_len=256, topk=K)
    prompts = [teacher_prompt_ids(tok, env, examples[r.group], env.default_context, r.prompt_ids) for r in rollouts]
    full = _score_every_position(trainer, trainer.base_lora(), [p + r.completion_ids for p, r in zip(prompts, rollouts)],
                                 starts=[1] * len(rollouts))
    checked = 0
    for row, segs in enumerate(batch.segment_ids):
        for seg in np.unique(segs[segs > 0]):
            where = (segs == seg) & batch.loss_mask[row]
            completion = batch.tokens[row][where].tolist()  # random completions: each is unique
            i = next(j for j, r in enumerate(rollouts) if r.completion_ids == completion)
            p, n = len(prompts[i]) - 1, len(completion)  # full[i] starts at token 1
            np.testing.assert_array_equal(batch.teacher_topk_ids[row][where], full[i].topk_ids[p:p + n])
            np.testing.assert_allclose(batch.teacher_topk_logprobs[row][where], full[i].topk_logprobs[p:p + n],
                                       atol=1e-6)
            np.testing.assert_allclose(batch.teacher_logprobs[row][where], full[i].logprobs[p:p + n], atol=1e-6)
            checked += 1
    assert checked == len(rollouts)


def test_behaviour_logprobs_under_snapshot_equal_logprobs_before_the_step(tiny_dir):
    trainer = _trainer(tiny_dir)
    rng = np.random.default_rng(2)
    rollouts = [Rollout(example_id=str(i), group=i // 2, prompt_ids=rng.integers(3, 300, 5).tolist(),
                        completion_ids=rng.integers(3, 300, 6).tolist(), sampling_logprobs=[-5.0] * 6,
                        finish_reason="stop", temperature=[1.0, 0.7][i % 2]) for i in range(4)]
    # Reference: the trainer's own log-probs of each rollout, packed alone, before the step.
    before = []
    for r in rollouts:
        batch, _ = pack([r], np.zeros(1), seq_len=16)
        before.append(trainer.logprobs(batch)[batch.loss_mask])
    snapshot = trainer.snapshot_lora()
    old = trainer.lora
    trainer.step(pack(rollouts, rng.normal(size=4), seq_len=16)[0])
    assert all(x.is_deleted() for x in jax.tree.leaves(old))  # the step donated the LoRA state it started from
    got = behaviour_logprobs(trainer, rollouts, snapshot)
    now = behaviour_logprobs(trainer, rollouts, trainer.lora)
    for b, g, n in zip(before, got, now):
        np.testing.assert_allclose(g, b, atol=1e-5)
        assert np.max(np.abs(np.subtract(n, b))) > 1e-3  # the step changed the policy


_SHARDED = """
import jax, numpy as np
from ctxd_jax.models.hf import load_model
from ctxd_jax.models.hf_test import randomise_lora
from ctxd_jax.sharding import make_mesh, shard_model
from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer
assert len(jax.devices()) == 2
model = randomise_lora(load_model({src!r}, lora_rank=4))
shard_model(model, make_mesh())
trainer = Trainer(model, make_mesh(), OptimConfig(lr=1e-2), StepConfig(chunk_size=16))
seqs = [list(range(3, 3 + n)) for n in (30, 5, 70, 12, 40)]
one = Trainer(randomise_lora(load_model({src!r}, lora_rank=4)), make_mesh(jax.devices()[:1]), OptimConfig(lr=1e-2),
              StepConfig(chunk_size=16))
assert trainer.dp == 2 and one.dp == 1
for lora, lora_one in ((trainer.base_lora(), one.base_lora()), (trainer.snapshot_lora(), one.snapshot_lora())):
    assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(lora))
    for g, w in zip(trainer.score(seqs, lora=lora, topk=3), one.score(seqs, lora=lora_one, topk=3)):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
print("OK")
"""


def test_score_on_a_2_device_mesh(tiny_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED.format(src=tiny_dir)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
