import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxd_jax.divergence import hidden_divergence, logits_divergence
from ctxd_jax.loss import topk_kl

DIRECTIONS = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _numpy_divergence(student_logits, teacher_logits, direction, beta):
    """Oracle, float64: the definitions written out on probabilities."""
    s, t = np.exp(_log_softmax(student_logits)), np.exp(_log_softmax(teacher_logits))

    def kl(p, q):
        return np.sum(p * (np.log(p) - np.log(q)), axis=-1)

    if direction == "forward":
        return kl(t, s)
    if direction == "reverse":
        return kl(s, t)
    mix = beta * t + (1 - beta) * s
    return beta * kl(t, mix) + (1 - beta) * kl(s, mix)


def _logits(seed, shape, scale=2.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize("direction,beta", DIRECTIONS)
def test_logits_divergence_against_numpy(direction, beta):
    s, t = _logits(0, (3, 5, 97)), _logits(1, (3, 5, 97))
    got = logits_divergence(jnp.asarray(s), jnp.asarray(t), direction=direction, beta=beta)
    np.testing.assert_allclose(got, _numpy_divergence(s, t, direction, beta), rtol=1e-4, atol=1e-6)
    same = logits_divergence(jnp.asarray(s), jnp.asarray(s + 3.0), direction=direction, beta=beta)
    np.testing.assert_allclose(same, 0.0, atol=1e-5)  # equal distributions (a shift of the logits changes nothing)


def test_jsd_is_bounded_by_the_entropy_of_a_beta_coin():
    beta = 0.3
    s, t = np.zeros((1, 4), np.float32), np.asarray([[-1e4, 0.0, -1e4, -1e4]], np.float32)
    s[0, 0] = 1e4  # disjoint supports: the bound is reached
    got = float(logits_divergence(jnp.asarray(s), jnp.asarray(t), direction="jsd", beta=beta)[0])
    np.testing.assert_allclose(got, -beta * np.log(beta) - (1 - beta) * np.log(1 - beta), rtol=1e-5)


@pytest.mark.parametrize("direction,beta", DIRECTIONS)
def test_gradient_by_finite_differences_and_teacher_stop_gradient(direction, beta):
    s, t = _logits(2, (7,), 1.0), _logits(3, (7,), 1.0)
    f = lambda x, y: logits_divergence(x, y, direction=direction, beta=beta)
    grad_s, grad_t = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_array_equal(grad_t, 0.0)
    eps = 1e-3
    for i in range(7):
        e = np.zeros(7)
        e[i] = eps
        fd = (_numpy_divergence(s + e, t, direction, beta) - _numpy_divergence(s - e, t, direction, beta)) / (2 * eps)
        np.testing.assert_allclose(grad_s[i], fd, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_topk_divergence_reaches_the_full_vocabulary_as_k_reaches_its_size(direction):
    v = 64
    s, t = _logits(4, (2, 3, v), 3.0), _logits(5, (2, 3, v), 3.0)
    full = np.asarray(logits_divergence(jnp.asarray(s), jnp.asarray(t), direction=direction))
    order = np.argsort(-t, axis=-1)  # the teacher's top-k ids, most likely first
    mask = np.ones((2, 3), bool)
    errors = []
    for k in (4, 16, v):
        ids = order[..., :k]
        got = topk_kl(jnp.asarray(np.take_along_axis(_log_softmax(s), ids, -1), jnp.float32),
                      jnp.asarray(np.take_along_axis(_log_softmax(t), ids, -1), jnp.float32), mask,
                      direction=direction)
        errors.append(np.abs(np.asarray(got) - full).max())
    assert errors[-1] < 1e-5, errors
    assert errors[0] > errors[1] > errors[2], errors


def _numpy_hidden_divergence(hs, ht, w, temps, index, direction, beta):
    """Oracle of hidden_divergence: per student position t >= 1 with index > 0, the divergence between the student's
    logits from hidden t-1 (at temps[t]) and the teacher's from its hidden index[t]-1."""
    b, n, _ = hs.shape
    out = np.zeros((b, n))
    for r in range(b):
        for p in range(1, n):
            if index[r, p] > 0:
                ls = (hs[r, p - 1].astype(np.float64) @ w) / temps[r, p]
                lt = ht[r, index[r, p] - 1].astype(np.float64) @ w
                out[r, p] = _numpy_divergence(ls, lt, direction, beta)
    return out


@pytest.mark.parametrize("direction,beta", DIRECTIONS[:3])
def test_hidden_divergence_chunked_against_numpy(direction, beta):
    rng = np.random.default_rng(6)
    b, n, nt, d, v = 2, 9, 12, 8, 50
    hs, ht = rng.normal(size=(b, n, d)).astype(np.float32), rng.normal(size=(b, nt, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    temps = rng.choice([1.0, 0.7], size=(b, n)).astype(np.float32)
    index = np.zeros((b, n), np.int32)
    index[0, 3:7] = np.arange(5, 9)  # student tokens 3..6 sit at teacher positions 5..8
    index[1, 1:9] = np.arange(2, 10)
    want = _numpy_hidden_divergence(hs, ht, w, temps, index, direction, beta)
    for chunk in (3, 1024):  # several chunks (with padding) or one
        got = hidden_divergence(jnp.asarray(hs), jnp.asarray(ht), jnp.asarray(w), jnp.asarray(temps),
                                jnp.asarray(index), chunk_size=chunk, direction=direction, beta=beta)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_hidden_divergence_gradient_reaches_the_student_only():
    rng = np.random.default_rng(7)
    hs, ht = rng.normal(size=(1, 6, 4)).astype(np.float32), rng.normal(size=(1, 6, 4)).astype(np.float32)
    w, temps = rng.normal(size=(4, 20)).astype(np.float32), np.ones((1, 6), np.float32)
    index = np.asarray([[0, 0, 2, 3, 4, 5]], np.int32)

    def total(hs, ht, chunk):
        return hidden_divergence(hs, ht, jnp.asarray(w), jnp.asarray(temps), jnp.asarray(index), chunk_size=chunk,
                                 direction="forward").sum()

    g_s, g_t = jax.grad(total, argnums=(0, 1))(jnp.asarray(hs), jnp.asarray(ht), 2)
    np.testing.assert_array_equal(g_t, 0.0)
    g_one = jax.grad(total)(jnp.asarray(hs), jnp.asarray(ht), 1024)
    np.testing.assert_allclose(g_s, g_one, rtol=1e-5, atol=1e-6)  # chunking changes nothing
    assert np.abs(g_s[0, 1:5]).sum() > 0 and np.all(g_s[0, 5] == 0)  # hidden 5 predicts nothing in the row
