"""Sequence-level importance ratios and the kl_tau penalty of compute_loss, in closed form (the packed
property test in loss_test.py covers them against its per-sample reference too)."""

import numpy as np
import pytest

from ctxd_jax.loss import compute_loss, default_loss_scale
from ctxd_jax.loss_test import grad_and_loss, one_sample, rand_tokens


def test_sequence_ratio_closed_form():
    # one detached ratio per sample, exp(sum log r), over the sample's loss-token count; the row count divides
    grad, loss, metrics = one_sample([2.0, 0.5, 4.0], ratio_type="sequence")
    np.testing.assert_allclose(grad[0], [-4.0 / 3] * 3, rtol=1e-5)
    np.testing.assert_allclose(loss, 4.0 / 3 * 3, rtol=1e-5)  # -sum(c * lp), lp = -1
    np.testing.assert_allclose(metrics["sequence_ratio"], 4.0, rtol=1e-5)
    grad, _, metrics = one_sample([3.0, 3.0, 3.0], ratio_type="sequence")  # 27, capped at sequence_clip_high = 10
    np.testing.assert_allclose(grad[0], [-10.0 / 3] * 3, rtol=1e-5)
    np.testing.assert_allclose(metrics["sequence_ratio"], 10.0, rtol=1e-6)
    grad, _, _ = one_sample([3.0, 3.0, 3.0], ratio_type="sequence", sequence_clip_high=2.0)
    np.testing.assert_allclose(grad[0], [-2.0 / 3] * 3, rtol=1e-5)
    # the summed log-ratio is capped at 10 before exp, whatever sequence_clip_high allows
    grad, _, metrics = one_sample([7.5] * 6, ratio_type="sequence", sequence_clip_high=1e6)
    np.testing.assert_allclose(grad[0], [-np.exp(10.0) / 6] * 6, rtol=1e-5)
    assert metrics["masked_total"] == 0


def test_sequence_ratio_per_sample_of_a_packed_row_with_prompt_and_masked_tokens():
    # two samples in one row: [prompt, r=2, r=2] and [r=0.5, r=0.05 (token-masked, still counted)]
    log_r = np.log(np.array([[1.0, 2.0, 2.0, 0.5, 0.05, 1.0]], np.float32))
    lp = np.full_like(log_r, -1.0)
    mu = lp - log_r
    mu[0, 0] = -40.0  # a wild prompt token is in no sample's ratio
    m = np.array([[False, True, True, True, True, False]])
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    A = np.array([[1.0, 1.0, 1.0, -2.0, -2.0, 0.0]], np.float32)
    grad, _, _ = grad_and_loss(lp, mu, None, A, None, m, segment_ids=seg, teacher_tau=0.0, student_tau=0.0,
                               use_full_reward_baseline=True, ratio_type="sequence")
    np.testing.assert_allclose(grad, [[0, -4.0 / 2, -4.0 / 2, 2 * 0.025 / 2, 0, 0]], rtol=1e-5)


@pytest.mark.parametrize("ratio_type", ["token", "sequence"])
@pytest.mark.parametrize("full", [True, False])
def test_kl_tau_closed_form(ratio_type, full):
    rng = np.random.default_rng(7)
    lp, mu, lpT = rand_tokens(rng, (2, 6), spread=0.2)
    A = np.repeat(rng.normal(size=(2, 1)), 6, 1).astype(np.float32)
    m = np.ones((2, 6), bool)
    m[:, 0] = False
    kw = dict(teacher_tau=0.4, student_tau=0.2, use_full_reward_baseline=full, ratio_type=ratio_type)
    grad, loss, _ = grad_and_loss(lp, mu, lpT, A, None, m, kl_tau=0.3, **kw)
    log_r = np.where(m, lp - mu, 0.0)
    a_hat = A if full else A + 0.4 * lpT - 0.2 * lp
    if ratio_type == "sequence":
        ratio = np.minimum(np.exp(log_r.sum(1, keepdims=True)), 10.0) / m.sum(1, keepdims=True)
        scale = 2  # rows
    else:
        ratio, scale = np.exp(log_r), m.sum()
    coeff = np.where(m, ratio * (a_hat - 0.3 * log_r), 0.0)
    np.testing.assert_allclose(grad, -coeff / scale, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, -np.sum(coeff * lp) / scale, rtol=1e-5)
    # kl_tau = 0 is the plain loss; the penalty pulls up tokens the trainer finds less likely than the sampler did
    grad0, _, _ = grad_and_loss(lp, mu, lpT, A, None, m, **kw)
    np.testing.assert_allclose(grad - grad0, np.where(m, ratio * 0.3 * log_r / scale, 0.0), rtol=1e-4, atol=1e-7)


def test_numbers_are_traced_not_compiled_in():
    x = np.full((1, 3), -1.0, np.float32)
    kw = dict(teacher_tau=0.0, student_tau=0.0, use_full_reward_baseline=True, ratio_type="sequence")
    compute_loss(x, x, None, x, None, x > -2, kl_tau=0.1, sequence_clip_high=5.0, **kw)
    before = compute_loss._cache_size()
    for v in (0.2, 0.3):
        compute_loss(x, x, None, x, None, x > -2, kl_tau=v, sequence_clip_high=v * 10, **kw)
    assert compute_loss._cache_size() == before


def test_unknown_ratio_type_is_refused_by_name():
    x = np.zeros((1, 3), np.float32)
    with pytest.raises(ValueError, match="ratio_type: 'seq'"):
        compute_loss(x, x, None, x, None, x, teacher_tau=0.0, student_tau=0.0, use_full_reward_baseline=True,
                     ratio_type="seq")


def test_default_loss_scale():
    m = np.array([[True, True, False], [False, False, False], [False, True, True]])
    seg = np.array([[1, 2, 0], [1, 1, 0], [1, 1, 0]])
    assert float(default_loss_scale(m, seg)) == 3  # the padding token is not counted
    assert float(default_loss_scale(m, seg, ratio_type="sequence")) == 2  # rows holding loss tokens
    assert float(default_loss_scale(np.zeros((2, 2), bool), ratio_type="sequence")) == 1
