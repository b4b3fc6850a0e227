"""Chunked log-probs equal the full-logits computation, for every chunk size, temperature and candidate ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctxd_jax.models.config import ModelConfig
from ctxd_jax.models.logprobs import hidden_logprobs, logprobs_at, token_logprobs
from ctxd_jax.models.transformer import Transformer
from ctxd_jax.tiny import tiny_config

B, T, K = 2, 11, 3


@pytest.fixture(scope="module")
def case():
    cfg = ModelConfig.from_dict(tiny_config("qwen3", num_layers=1))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    segs = jnp.asarray([[1] * 6 + [2] * 5, [1] * 8 + [0] * 3], jnp.int32)
    positions = jnp.asarray([list(range(6)) + list(range(5)), list(range(8)) + [0] * 3], jnp.int32)
    temps = jnp.asarray(rng.uniform(0.5, 1.5, (B, T)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T, K)), jnp.int32)
    hidden = model(tokens, positions, segs)
    return model, tokens, positions, segs, temps, ids, hidden


def _reference(hidden, w, tokens, segs, temps, ids):
    logits = (hidden[:, :-1] @ w) / temps[:, 1:, None]
    logp_all = jax.nn.log_softmax(logits, -1)
    logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    at = jnp.take_along_axis(logp_all, ids[:, 1:], -1)
    valid = (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] != 0)
    pad = lambda x: jnp.pad(jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, 0.0),
                            ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))
    return pad(logp), pad(ent), pad(at)


@pytest.mark.parametrize("chunk_size", [1, 7, 20, 4096])
def test_chunked_equals_full(case, chunk_size):
    model, tokens, positions, segs, temps, ids, hidden = case
    want = _reference(hidden, model.lm_head_kernel(), tokens, segs, temps, ids)
    got = hidden_logprobs(hidden, model.lm_head_kernel(), tokens, segs, temps, chunk_size=chunk_size,
                          gather_ids=ids)
    for g, w, name in zip(got, want, ("logprobs", "entropy", "at_ids")):
        np.testing.assert_allclose(g, w, atol=1e-5, err_msg=name)
    # Segment starts (t=0, t=6 of row 0) and padding are zero.
    assert float(got[0][0, 6]) == 0.0 and np.all(np.asarray(got[0][1, 8:]) == 0.0)


def test_token_logprobs_runs_the_model(case):
    model, tokens, positions, segs, temps, ids, hidden = case
    logp, ent = token_logprobs(model, tokens, positions, segs, temps, chunk_size=5)
    want = _reference(hidden, model.lm_head_kernel(), tokens, segs, temps, ids)
    np.testing.assert_allclose(logp, want[0], atol=1e-5)
    np.testing.assert_allclose(ent, want[1], atol=1e-5)


def test_gradient_through_chunks_matches_full(case):
    model, tokens, positions, segs, temps, ids, hidden = case
    w = model.lm_head_kernel()
    chunked = jax.grad(lambda h, w: jnp.sum(hidden_logprobs(h, w, tokens, segs, temps, chunk_size=4)[0]),
                       argnums=(0, 1))(hidden, w)
    full = jax.grad(lambda h, w: jnp.sum(_reference(h, w, tokens, segs, temps, ids)[0]), argnums=(0, 1))(hidden, w)
    for g, f in zip(chunked, full):
        np.testing.assert_allclose(g, f, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_topk_equals_full_sort(case, chunk_size):
    model, tokens, positions, segs, temps, ids, hidden = case
    w = model.lm_head_kernel()
    *_, top_ids, top_lps = hidden_logprobs(hidden, w, tokens, segs, temps, chunk_size=chunk_size, topk=K)
    logp_all = np.asarray(jax.nn.log_softmax((hidden[:, :-1] @ w) / temps[:, 1:, None], -1))
    want_ids = np.argsort(-logp_all, -1)[..., :K]
    valid = np.asarray((segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] != 0))
    assert top_ids.dtype == jnp.int32 and top_ids.shape == (B, T, K)
    np.testing.assert_array_equal(np.asarray(top_ids)[:, 1:][valid], want_ids[valid])
    np.testing.assert_allclose(np.asarray(top_lps)[:, 1:][valid],
                               np.take_along_axis(logp_all, want_ids, -1)[valid], atol=1e-5)
    assert not np.asarray(top_ids)[:, 1:][~valid].any() and not np.asarray(top_lps)[:, 0].any()


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_logprobs_at_positions_equal_every_position(case, chunk_size):
    model, tokens, positions, segs, temps, ids, hidden = case
    w = model.lm_head_kernel()
    lp, _, top_ids, top_lps = hidden_logprobs(hidden, w, tokens, segs, temps, chunk_size=chunk_size, topk=K)
    at = jnp.asarray([[7, 9, 10, 1, 3], [2, 5, 7, 0, 0]], jnp.int32)  # any order; row 1 padded with 0
    got_lp, got_ids, got_lps = logprobs_at(hidden, w, tokens, temps, at, chunk_size=chunk_size, topk=K)
    assert got_lp.shape == (B, 5) and got_ids.shape == got_lps.shape == (B, 5, K) and got_ids.dtype == jnp.int32
    rows = np.arange(B)[:, None]
    real = np.asarray(at) > 0
    np.testing.assert_allclose(np.asarray(got_lp)[real], np.asarray(lp)[rows, at][real], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_ids)[real], np.asarray(top_ids)[rows, at][real])
    np.testing.assert_allclose(np.asarray(got_lps)[real], np.asarray(top_lps)[rows, at][real], atol=1e-6)
    assert len(logprobs_at(hidden, w, tokens, temps, at, chunk_size=chunk_size)) == 1  # no top-k asked
