import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax.numpy as jnp

from ctxd_jax.advantage import compute_advantages, kl_gates

TAUS = dict(adv_tau=1.0, teacher_tau=1.0, student_tau=1.0)


def adv(r, st_, ss, group_size, full=True, kl_only_incorrect=False, lengths=None, **taus):
    taus = {**TAUS, **taus}
    as_arr = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    return np.asarray(compute_advantages(as_arr(r), as_arr(st_), as_arr(ss), group_size=group_size,
                                         use_full_reward_baseline=full, kl_only_incorrect=kl_only_incorrect,
                                         completion_lengths=as_arr(lengths), length_weighted_mean=lengths is not None,
                                         **taus))


@pytest.mark.parametrize("rewards, gate", [([0, 0, 0, 0], 1.0), ([1, 1, 1, 1], 0.0), ([1, 0, 0, 0], 0.75)])
def test_kl_gate_table(rewards, gate):
    np.testing.assert_allclose(kl_gates(jnp.asarray(rewards, jnp.float32), group_size=4), [gate] * 4)


def test_kl_gates_per_group():
    g = kl_gates(jnp.asarray([0, 0, 1, 1, 1, 0], jnp.bfloat16), group_size=2)
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, [1, 1, 0, 0, 0.5, 0.5])


def test_worked_example_full_baseline():
    np.testing.assert_allclose(adv([1, 1], [-3, -6], [-4.5, -4.5], 2), [1.5, -1.5])


def test_adv_tau_scales_task_advantage_when_kl_terms_equal():
    a = adv([1, 0, 0, 1], [-2, -2, -2, -2], [-3, -3, -3, -3], 4, adv_tau=0.5)
    np.testing.assert_allclose(a, 0.5 * np.array([0.5, -0.5, -0.5, 0.5]))


def test_kl_only_incorrect_all_correct_is_zero():
    np.testing.assert_allclose(adv([1, 1], [-3, -6], [-4.5, -4.5], 2, kl_only_incorrect=True), [0, 0])


def test_kl_only_incorrect_mixed_gate():
    # gate = 1 - 0.25; R = r + 0.75*(S_T - S_S)
    r, s_t, s_s = [1, 0, 0, 0], [-1, -2, -3, -4], [-1, -1, -1, -1]
    R = np.array(r) + 0.75 * (np.array(s_t) - np.array(s_s))
    np.testing.assert_allclose(adv(r, s_t, s_s, 4, kl_only_incorrect=True), R - R.mean(), rtol=1e-6)


R4, ST4, SS4 = [1, 0, 1, 0], [-10, -20, -5, -8], [-12, -15, -6, -9]


def test_config_pure_task_rl_applies_adv_tau_without_teacher():
    # deliberate difference: the fork ignores adv_tau here
    np.testing.assert_allclose(adv(R4, None, None, 4, adv_tau=2.0, teacher_tau=0, student_tau=0), [1, -1, 1, -1])


def test_config_hybrid_full_baseline():
    R = np.array(R4) + np.array(ST4) - np.array(SS4)
    np.testing.assert_allclose(adv(R4, ST4, SS4, 4), R - R.mean(), rtol=1e-6)


def test_config_hybrid_gated():
    R = np.array(R4) + 0.5 * (0.01 * np.array(ST4) - 0.01 * np.array(SS4))
    np.testing.assert_allclose(adv(R4, ST4, SS4, 4, teacher_tau=0.01, student_tau=0.01, kl_only_incorrect=True),
                               R - R.mean(), rtol=1e-5, atol=1e-6)


def test_config_pure_distillation():
    R = np.array(ST4, float) - np.array(SS4)
    np.testing.assert_allclose(adv(R4, ST4, SS4, 4, adv_tau=0.0), R - R.mean(), rtol=1e-6)


def test_config_token_level_kl_is_task_only():
    # no full baseline: the KL enters per token in the loss; sums are ignored here
    np.testing.assert_allclose(adv(R4, ST4, SS4, 4, full=False, teacher_tau=0.01, student_tau=0.01),
                               [0.5, -0.5, 0.5, -0.5])


def test_bfloat16_inputs_computed_in_float32():
    a = compute_advantages(jnp.asarray([1, 1], jnp.bfloat16), jnp.asarray([-3, -6], jnp.bfloat16),
                           jnp.asarray([-4.5, -4.5], jnp.bfloat16), group_size=2, use_full_reward_baseline=True,
                           kl_only_incorrect=False, **TAUS)
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, [1.5, -1.5])


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="group_size=3"):
        adv([1, 0, 1, 0], None, None, 3)
    with pytest.raises(ValueError, match="inference_logprob_sums"):
        adv([1, 0], [-1, -2], None, 2)
    with pytest.raises(ValueError, match="completion_lengths"):
        compute_advantages(jnp.ones(2), None, None, group_size=2, use_full_reward_baseline=True,
                           kl_only_incorrect=False, length_weighted_mean=True, **TAUS)
    with pytest.raises(ValueError, match="completion_lengths"):
        adv([1, 0, 1, 0], None, None, 2, lengths=[1, 2, 3, 4, 5, 6])


# ---- length-weighted baseline -------------------------------------------------------------------------------------


def test_worked_example_length_weighted_mean():
    # b = (1*10 + 2*30) / 40 = 1.75
    np.testing.assert_allclose(adv([1, 2], None, None, 2, lengths=[10, 30]), [-0.75, 0.25])


def test_length_weighted_mean_equal_lengths_is_the_plain_mean():
    np.testing.assert_allclose(adv(R4, ST4, SS4, 4, lengths=[7] * 4), adv(R4, ST4, SS4, 4), rtol=1e-6)


def test_length_weighted_mean_all_empty_group_falls_back_to_the_mean():
    np.testing.assert_allclose(adv([1, 0, 1, 3], None, None, 2, lengths=[0, 0, 1, 3]), [0.5, -0.5, -1.5, 0.5])


@pytest.mark.parametrize("full", [True, False])
def test_length_weighted_mean_with_and_without_full_baseline(full):
    # the baseline weights whatever R the full-baseline switch composed: with it R holds the KL sums, without not
    lengths = np.array([2, 6, 4, 4], np.float32)
    R = np.array(R4, np.float32) + ((0.1 * np.array(ST4) - 0.2 * np.array(SS4)) if full else 0.0)
    b = np.sum(R * lengths) / lengths.sum()
    np.testing.assert_allclose(adv(R4, ST4, SS4, 4, full=full, teacher_tau=0.1, student_tau=0.2, lengths=lengths),
                               R - b, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 3]), group_size=st.sampled_from([1, 4]), seed=st.integers(0, 2**31 - 1),
       taus=st.tuples(*[st.floats(0, 2)] * 3), full=st.booleans(), gated=st.booleans())
def test_property_groups_sum_to_zero_and_formula(groups, group_size, seed, taus, full, gated):
    rng = np.random.default_rng(seed)
    n = groups * group_size
    r = rng.integers(0, 2, n).astype(np.float32)
    s_t, s_s = (-rng.uniform(0, 50, n).astype(np.float32) for _ in range(2))
    a_tau, t_tau, s_tau = taus
    a = adv(r, s_t, s_s, group_size, full=full, kl_only_incorrect=gated,
            adv_tau=a_tau, teacher_tau=t_tau, student_tau=s_tau)
    np.testing.assert_allclose(a.reshape(groups, group_size).sum(1), 0, atol=1e-3)
    rg = r.reshape(groups, group_size)
    R = a_tau * rg
    if full:
        g = 1 - rg.mean(1, keepdims=True) if gated else 1.0
        R = R + g * (t_tau * s_t - s_tau * s_s).reshape(groups, group_size)
    np.testing.assert_allclose(a, (R - R.mean(1, keepdims=True)).reshape(-1), atol=1e-3, rtol=1e-4)
    # length-weighted: the same R, its L-weighted mean as baseline, so sum(L*A) is 0 in every group
    lengths = rng.integers(1, 50, n).astype(np.float32)
    a = adv(r, s_t, s_s, group_size, full=full, kl_only_incorrect=gated, adv_tau=a_tau, teacher_tau=t_tau,
            student_tau=s_tau, lengths=lengths)
    L = lengths.reshape(groups, group_size)
    np.testing.assert_allclose((a.reshape(groups, group_size) * L).sum(1), 0, atol=5e-2)
    np.testing.assert_allclose(a, (R - (R * L).sum(1, keepdims=True) / L.sum(1, keepdims=True)).reshape(-1),
                               atol=1e-3, rtol=1e-4)


def _numpy_mean_kl_advantages(r, s_t, s_s, lengths, group_size):
    """Oracle: R = r + (sum lpT - sum lpS) / L per sample, minus the group mean."""
    reward = np.asarray(r, np.float64) + (np.asarray(s_t) - np.asarray(s_s)) / np.maximum(lengths, 1)
    grouped = reward.reshape(-1, group_size)
    return (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)


def test_kl_normalize_mean_against_numpy():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, 12).astype(np.float32)
    lengths = rng.integers(0, 50, 12).astype(np.float32)
    s_t, s_s = -rng.random(12) * lengths, -rng.random(12) * lengths
    got = np.asarray(compute_advantages(r, s_t, s_s, group_size=4, completion_lengths=lengths, kl_normalize="mean",
                                        use_full_reward_baseline=True, kl_only_incorrect=False, **TAUS))
    np.testing.assert_allclose(got, _numpy_mean_kl_advantages(r, s_t, s_s, lengths, 4), rtol=1e-5, atol=1e-6)


def test_kl_normalize_mean_does_not_reward_short_answers():
    # the same per-token log-ratio (-0.5) at lengths 2 and 20: 'sum' favours the short one, 'mean' neither
    r, lengths = [0, 0], [2, 20]
    s_t, s_s = [-1.5, -15.0], [-0.5, -5.0]
    np.testing.assert_allclose(adv(r, s_t, s_s, 2), [4.5, -4.5])
    got = compute_advantages(jnp.asarray(r, jnp.float32), jnp.asarray(s_t), jnp.asarray(s_s), group_size=2,
                             completion_lengths=jnp.asarray(lengths, jnp.float32), kl_normalize="mean",
                             use_full_reward_baseline=True, kl_only_incorrect=False, **TAUS)
    np.testing.assert_allclose(got, [0.0, 0.0], atol=1e-6)


def test_kl_normalize_refusals():
    with pytest.raises(ValueError, match="completion_lengths: required with kl_normalize='mean'"):
        compute_advantages(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), group_size=2, kl_normalize="mean",
                           use_full_reward_baseline=True, kl_only_incorrect=False, **TAUS)
    with pytest.raises(ValueError, match="kl_normalize: 'max' is not one of"):
        compute_advantages(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), group_size=2, kl_normalize="max",
                           completion_lengths=jnp.ones(2), use_full_reward_baseline=True, kl_only_incorrect=False,
                           **TAUS)
