import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp

from ctxd_jax.loss import compute_loss, default_loss_scale, gather_topk, topk_kl

BOUNDS = dict(token_mask_low=0.125, token_mask_high=8.0, geo_mask_low=0.1, geo_mask_high=10.0,
              sequence_mask_low=0.0, sequence_mask_high=100.0)


def grad_and_loss(lp, mu, lpT, A, g, m, **kw):
    """jax.grad of compute_loss wrt trainer logprobs, plus the loss and metrics."""
    def f(x):
        return compute_loss(x, mu, lpT, A, g, m, **kw)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(lp)
    return np.asarray(grad), float(loss), {k: float(v) for k, v in metrics.items()}


def ref_sample(lp, mu, lpT, A, g, m, *, full, teacher_tau, student_tau, b=BOUNDS):
    """Hand-derived per-sample reference (numpy, 1-D arrays): keep mask and Ahat."""
    m = m.astype(bool)
    r = np.exp(np.where(m, lp - mu, 0.0))
    token = m & ((r < b["token_mask_low"]) | (r > b["token_mask_high"]))
    whole = False
    if m.any():
        geo = np.exp(np.mean((lp - mu)[m]))
        whole = (geo < b["geo_mask_low"] or geo > b["geo_mask_high"]
                 or r[m].min() < b["sequence_mask_low"] or r[m].max() > b["sequence_mask_high"])
    keep = m & ~token & ~whole
    a_hat = A + (0.0 if full or lpT is None else g * (teacher_tau * lpT - student_tau * lp))
    return keep, r, a_hat


def ref_coeff(lp, mu, m, r, a_hat, *, ratio_type="token", kl_tau=0.0, sequence_clip_high=10.0):
    """The per-token coefficient c of -c * grad(lp): ratio * (Ahat - kl_tau * log r); a sequence ratio is
    min(exp(min(sum log r, 10)), clip) over the sample's loss tokens, divided by their count."""
    log_r = np.where(m, lp - mu, 0.0)
    if ratio_type == "sequence":
        ratio = min(np.exp(min(log_r.sum(), 10.0)), sequence_clip_high) / max(m.sum(), 1)
    else:
        ratio = r
    return ratio * (a_hat - kl_tau * log_r)


def rand_tokens(rng, shape, spread=0.3):
    lp = -rng.uniform(0.05, 4, shape).astype(np.float32)
    mu = (lp - rng.normal(0, spread, shape)).astype(np.float32)
    lpT = -rng.uniform(0.05, 4, shape).astype(np.float32)
    return lp, mu, lpT


# ---- the hand-derived gradient ----------------------------------------------------------------------------------


@pytest.mark.parametrize("full", [True, False])
def test_gradient_matches_hand_derivation(full):
    rng = np.random.default_rng(0)
    shape = (3, 7)
    lp, mu, lpT = rand_tokens(rng, shape, spread=0.2)  # no token is off-policy-masked at this spread
    A = np.repeat(rng.normal(size=(3, 1)), 7, 1).astype(np.float32)
    g = np.repeat(np.array([[1.0], [0.5], [0.0]], np.float32), 7, 1)
    m = np.ones(shape, bool)
    m[:, :2] = False  # prompt
    m[2, 6] = False  # env token
    taus = dict(teacher_tau=0.7, student_tau=0.3)
    grad, loss, metrics = grad_and_loss(lp, mu, lpT, A, g, m, use_full_reward_baseline=full, **taus)
    r = np.exp(lp - mu)
    # the student term is stop-gradient: it enters Ahat by value only
    a_hat = A if full else A + g * (0.7 * lpT - 0.3 * lp)
    n = m.sum()
    np.testing.assert_allclose(grad, np.where(m, -r * a_hat / n, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, -np.sum(np.where(m, r * a_hat * lp, 0)) / n, rtol=1e-5)
    assert metrics["masked_total"] == 0 and metrics["num_loss_tokens"] == n
    np.testing.assert_allclose(metrics["mismatch_kl"], np.mean((r - np.log(r) - 1)[m]), rtol=1e-4)
    np.testing.assert_allclose(metrics["ratio_mean"], r[m].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["teacher_kl"], (lpT - lp)[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["teacher_seq_kl"], (lpT - lp)[m].sum() / 3, rtol=1e-5)
    np.testing.assert_allclose(metrics["combined_advantage"], a_hat[m].mean(), rtol=1e-5, atol=1e-6)


def test_full_baseline_ignores_kl_gates_and_teacher():
    rng = np.random.default_rng(1)
    lp, mu, lpT = rand_tokens(rng, (2, 5), spread=0.1)
    A = rng.normal(size=(2, 5)).astype(np.float32)
    m = np.ones((2, 5), bool)
    kw = dict(teacher_tau=1.0, student_tau=1.0, use_full_reward_baseline=True)
    g1, l1, _ = grad_and_loss(lp, mu, lpT, A, np.zeros_like(A), m, **kw)
    g2, l2, _ = grad_and_loss(lp, mu, None, A, None, m, **kw)
    np.testing.assert_allclose(g1, g2)
    assert l1 == l2


def test_no_teacher_means_no_token_kl():
    rng = np.random.default_rng(2)
    lp, mu, _ = rand_tokens(rng, (2, 5), spread=0.1)
    A = rng.normal(size=(2, 5)).astype(np.float32)
    m = np.ones((2, 5), bool)
    grad, _, metrics = grad_and_loss(lp, mu, None, A, None, m, teacher_tau=0.0, student_tau=0.0,
                                     use_full_reward_baseline=False)
    np.testing.assert_allclose(grad, -np.exp(lp - mu) * A / 10, rtol=1e-5)
    assert "teacher_kl" not in metrics and metrics["kl_contrib_abs"] == 0


def test_loss_scale_override():
    rng = np.random.default_rng(3)
    lp, mu, lpT = rand_tokens(rng, (2, 5), spread=0.1)
    A = rng.normal(size=(2, 5)).astype(np.float32)
    m = np.ones((2, 5), bool)
    kw = dict(teacher_tau=1.0, student_tau=1.0, use_full_reward_baseline=False)
    g1, l1, _ = grad_and_loss(lp, mu, lpT, A, None, m, **kw)
    g2, l2, _ = grad_and_loss(lp, mu, lpT, A, None, m, loss_scale=40.0, **kw)
    np.testing.assert_allclose(g2, g1 / 4, rtol=1e-6)
    np.testing.assert_allclose(l2, l1 / 4, rtol=1e-6)


# ---- masking -------------------------------------------------------------------------------------------------------


def one_sample(ratios, **kw):
    """A single sample of len(ratios) loss tokens with the given importance ratios and A = 1."""
    log_r = np.log(np.asarray(ratios, np.float32))[None]
    lp = np.full_like(log_r, -1.0)
    return grad_and_loss(lp, lp - log_r, None, np.ones_like(lp), None, np.ones_like(lp, bool),
                         teacher_tau=0.0, student_tau=0.0, use_full_reward_baseline=True, **kw)


def test_token_mask_drops_only_those_tokens_and_keeps_denominator():
    grad, _, m = one_sample([0.1, 1.0, 9.0, 2.0])
    np.testing.assert_allclose(grad[0], [0, -1.0 / 4, 0, -2.0 / 4], rtol=1e-5)
    assert m["masked_token_low"] == 0.25 and m["masked_token_high"] == 0.25 and m["masked_total"] == 0.5
    assert m["masked_geo"] == 0 and m["masked_sequence"] == 0


def test_geo_mask_drops_whole_sample():
    grad, _, m = one_sample([0.01, 0.5, 0.5, 0.5])  # geo mean ~0.13; the 0.01 token is also token-masked
    assert np.all(grad[0, 1:] != 0) and grad[0, 0] == 0
    grad, _, m = one_sample([0.01, 0.5, 0.5, 0.5], geo_mask_low=0.2)
    np.testing.assert_array_equal(grad, 0)
    assert m["masked_geo"] == 1 and m["masked_total"] == 1 and m["masked_token_low"] == 0.25
    grad, _, m = one_sample([5.0, 5.0], geo_mask_high=4.0)
    np.testing.assert_array_equal(grad, 0)
    assert m["masked_geo"] == 1


def test_sequence_mask_drops_whole_sample():
    grad, _, m = one_sample([3.0, 1.0, 1.0, 1.0], sequence_mask_high=2.0)
    np.testing.assert_array_equal(grad, 0)
    assert m["masked_sequence"] == 1 and m["masked_geo"] == 0 and m["masked_token_high"] == 0
    grad, _, m = one_sample([0.3, 1.0], sequence_mask_low=0.5)
    np.testing.assert_array_equal(grad, 0)
    grad, _, m = one_sample([0.3, 1.0])
    assert m["masked_total"] == 0


def test_masks_only_look_at_loss_mask_tokens():
    # a wild ratio on a prompt token must not drop the sample
    lp = np.array([[-1.0, -1.0, -1.0]], np.float32)
    mu = np.array([[-50.0, -1.0, -1.0]], np.float32)
    m = np.array([[False, True, True]])
    grad, _, metrics = grad_and_loss(lp, mu, None, np.ones_like(lp), None, m, teacher_tau=0.0, student_tau=0.0,
                                     use_full_reward_baseline=True)
    np.testing.assert_allclose(grad, [[0, -0.5, -0.5]])
    assert metrics["masked_total"] == 0


# ---- packing ------------------------------------------------------------------------------------------------------


def make_samples(rng, n, max_len, spread):
    out = []
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        lp, mu, lpT = rand_tokens(rng, (length,), spread)
        m = rng.random(length) < 0.8
        out.append(dict(lp=lp, mu=mu, lpT=lpT, A=np.float32(rng.normal()), g=np.float32(rng.random()), m=m))
    return out


def pack(samples, rows, length):
    """First-fit packing into [rows, length] with segment ids; returns arrays and each sample's (row, start)."""
    arrs = {k: np.zeros((rows, length), np.float32) for k in ("lp", "mu", "lpT", "A", "g")}
    m = np.zeros((rows, length), bool)
    seg = np.zeros((rows, length), np.int32)
    fill = [0] * rows
    where = []
    for s in samples:
        n = len(s["lp"])
        row = next(i for i in range(rows) if fill[i] + n <= length)
        sl = slice(fill[row], fill[row] + n)
        for k in arrs:
            arrs[k][row, sl] = s[k]
        m[row, sl] = s["m"]
        seg[row, sl] = seg[row].max() + 1
        where.append((row, fill[row]))
        fill[row] += n
    return arrs, m, seg, where


def check_against_reference(samples, rows, length, full, teacher_tau, student_tau, dtype=jnp.float32, rtol=2e-4,
                            ratio_type="token", kl_tau=0.0, sequence_clip_high=10.0, **bounds):
    b = {**BOUNDS, **bounds}
    arrs, m, seg, where = pack(samples, rows, length)
    options = dict(ratio_type=ratio_type, kl_tau=kl_tau, sequence_clip_high=sequence_clip_high)
    kw = dict(teacher_tau=teacher_tau, student_tau=student_tau, use_full_reward_baseline=full, **options, **bounds)
    cast = {k: jnp.asarray(v, dtype) for k, v in arrs.items()}
    grad, loss, metrics = grad_and_loss(cast["lp"], cast["mu"], cast["lpT"], cast["A"], cast["g"], m,
                                        segment_ids=seg, **kw)
    n = sum(s["m"].sum() for s in samples)
    # the default divisor: loss tokens, or with sequence ratios the rows holding any
    scale = max(n if ratio_type == "token" else (m & (seg > 0)).any(axis=1).sum(), 1)
    ref_loss, dropped = 0.0, 0
    for s, (row, start) in zip(samples, where):
        keep, r, a_hat = ref_sample(s["lp"], s["mu"], s["lpT"], s["A"], s["g"], s["m"], full=full,
                                    teacher_tau=teacher_tau, student_tau=student_tau, b=b)
        coeff = ref_coeff(s["lp"], s["mu"], s["m"], r, a_hat, **options)
        ref_grad = np.where(keep, -coeff / scale, 0)
        got = grad[row, start:start + len(s["lp"])].astype(np.float32)
        np.testing.assert_allclose(got, ref_grad, rtol=rtol, atol=1e-6)
        ref_loss -= np.sum(np.where(keep, coeff * s["lp"], 0)) / scale
        dropped += (s["m"] & ~keep).sum()
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(metrics["masked_total"], dropped / max(n, 1), atol=1e-6)
    return grad, loss, metrics


OPTIONS = {"token": {}, "sequence": dict(ratio_type="sequence", sequence_clip_high=3.0), "kl_tau": dict(kl_tau=0.5),
           "all": dict(ratio_type="sequence", kl_tau=0.5)}


@pytest.mark.parametrize("option,full", [("token", False), ("sequence", True), ("kl_tau", False), ("all", True),
                                         ("all", False)])
def test_packed_rows_equal_one_sample_per_row(option, full):
    rng = np.random.default_rng(4)
    samples = make_samples(rng, 5, 6, spread=1.0)
    taus = dict(teacher_tau=0.5, student_tau=0.25)
    packed_grad, packed_loss, packed_m = check_against_reference(samples, 3, 12, full, **taus, **OPTIONS[option])
    # the same samples unpacked (segment_ids=None), one per row; with the same divisor (the default one counts rows
    # under sequence ratios) the loss, each token's gradient and the metrics are the packed ones
    rows = [pack([s], 1, 6) for s in samples]
    arrs = {k: np.concatenate([r[0][k] for r in rows]) for k in rows[0][0]}
    m = np.concatenate([r[1] for r in rows])
    packed_arrs, packed_mask, seg, where = pack(samples, 3, 12)
    scale = float(default_loss_scale(packed_mask, seg, ratio_type=OPTIONS[option].get("ratio_type", "token")))
    grad, loss, metrics = grad_and_loss(arrs["lp"], arrs["mu"], arrs["lpT"], arrs["A"], arrs["g"], m,
                                        use_full_reward_baseline=full, loss_scale=scale, **taus, **OPTIONS[option])
    np.testing.assert_allclose(loss, packed_loss, rtol=1e-5)
    for i, (s, (row, start)) in enumerate(zip(samples, where)):
        n = len(s["lp"])
        np.testing.assert_allclose(grad[i, :n], packed_grad[row, start:start + n], rtol=1e-5, atol=1e-8)
    for k in packed_m:
        np.testing.assert_allclose(metrics[k], packed_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_padding_segment_is_ignored_even_if_loss_mask_set():
    lp = np.full((1, 4), -1.0, np.float32)
    mu = lp.copy()
    mu[0, 3] = -30.0  # would trip every mask
    seg = np.array([[1, 1, 1, 0]])
    grad, _, metrics = grad_and_loss(lp, mu, None, np.ones_like(lp), None, np.ones_like(lp, bool),
                                     segment_ids=seg, teacher_tau=0.0, student_tau=0.0,
                                     use_full_reward_baseline=True)
    np.testing.assert_allclose(grad, [[-1 / 3, -1 / 3, -1 / 3, 0]], rtol=1e-6)
    assert metrics["masked_total"] == 0 and metrics["num_loss_tokens"] == 3


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), spread=st.sampled_from([0.1, 1.0, 3.0]),
       full=st.booleans(), taus=st.tuples(st.floats(0, 2), st.floats(0, 2)),
       seq_high=st.sampled_from([100.0, 4.0]), ratio_type=st.sampled_from(["token", "sequence"]),
       kl_tau=st.sampled_from([0.0, 0.3]), clip=st.sampled_from([10.0, 1.5, 1e6]))
def test_property_packed_matches_per_sample_reference(seed, n, spread, full, taus, seq_high, ratio_type, kl_tau,
                                                      clip):
    samples = make_samples(np.random.default_rng(seed), n, 6, spread)
    check_against_reference(samples, 3, 12, full, *taus, sequence_mask_high=seq_high, ratio_type=ratio_type,
                            kl_tau=kl_tau, sequence_clip_high=clip)


def test_bfloat16_inputs():
    rng = np.random.default_rng(5)
    samples = make_samples(rng, 4, 6, spread=1.0)
    for s in samples:  # values exactly representable in bfloat16, so the float32 reference sees the same numbers
        for k in ("lp", "mu", "lpT", "A", "g"):
            s[k] = np.asarray(jnp.asarray(s[k], jnp.bfloat16).astype(jnp.float32))
    # the math is float32; only the gradient wrt the bfloat16 input is rounded back to bfloat16
    grad, loss, _ = check_against_reference(samples, 3, 12, False, 1.0, 1.0, dtype=jnp.bfloat16, rtol=1e-2)
    assert np.isfinite(loss) and grad.dtype == jnp.bfloat16


def test_empty_filler_batch_is_zero():
    # all-false loss mask (filler micro-batches): loss 0, zero gradient, finite metrics
    x = np.full((2, 4), -1.0, np.float32)
    grad, loss, metrics = grad_and_loss(x, x - 50.0, x, np.ones_like(x), None, np.zeros_like(x, bool),
                                        teacher_tau=1.0, student_tau=1.0, use_full_reward_baseline=False)
    assert loss == 0 and np.all(grad == 0) and all(np.isfinite(v) for v in metrics.values())
    assert metrics["num_loss_tokens"] == 0 and metrics["num_samples"] == 0


def test_shape_errors_name_the_field():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="inference_logprobs"):
        compute_loss(x, np.zeros((2, 4), np.float32), None, x, None, x, teacher_tau=0.0, student_tau=0.0,
                     use_full_reward_baseline=True)
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        compute_loss(x, x, None, x, None, x, teacher_tau=0.0, student_tau=0.0, use_full_reward_baseline=True,
                     student_topk_logprobs=np.zeros((2, 3, 4), np.float32))


# ---- top-k distillation -------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), direction=st.sampled_from(["forward", "reverse"]),
       shift=st.floats(-5, 5))
def test_topk_kl_properties(seed, direction, shift):
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 2, (2, 3, 4)).astype(np.float32)
    t = rng.normal(0, 2, (2, 3, 4)).astype(np.float32)
    mask = np.ones((2, 3), bool)
    kl = np.asarray(topk_kl(s, t, mask, direction=direction))
    assert np.all(kl >= -1e-6)
    # zero when equal on the support, also up to a per-token constant (renormalisation)
    np.testing.assert_allclose(topk_kl(t + np.float32(shift), t, mask, direction=direction), 0, atol=1e-5)
    p, q = jax.nn.softmax(t, -1), jax.nn.softmax(s, -1)
    expect = np.sum(p * (np.log(p) - np.log(q)), -1) if direction == "forward" else \
        np.sum(q * (np.log(q) - np.log(p)), -1)
    np.testing.assert_allclose(kl, expect, rtol=1e-4, atol=1e-5)


def test_topk_kl_gradient_moves_student_towards_teacher():
    s = jnp.zeros((1, 1, 3))
    t = jnp.log(jnp.array([[[0.7, 0.2, 0.1]]]))
    mask = jnp.ones((1, 1), bool)
    for direction in ("forward", "reverse"):
        grad = jax.grad(lambda x: topk_kl(x, t, mask, direction=direction).sum())(s)
        assert grad[0, 0, 0] < 0 < grad[0, 0, 2]  # descent raises the teacher's favourite, lowers the least liked
    grad_fwd = jax.grad(lambda x: topk_kl(x, t, mask).sum())(s)
    np.testing.assert_allclose(grad_fwd[0, 0], jax.nn.softmax(s[0, 0]) - jnp.exp(t[0, 0]), atol=1e-6)
    assert np.all(np.asarray(jax.grad(lambda y: topk_kl(s, y, mask).sum())(t)) == 0)  # teacher is a constant


def test_topk_kl_masked_tokens_are_zero_and_finite():
    s = np.array([[[np.nan] * 3, [0.0, -1.0, -2.0]]], np.float32)
    t = np.array([[[-np.inf] * 3, [-0.5, -np.inf, -1.0]]], np.float32)  # a -inf teacher entry is fine too
    mask = np.array([[False, True]])
    kl, grad = jax.value_and_grad(lambda x: topk_kl(x, t, mask).sum())(s)
    assert np.isfinite(kl) and np.all(np.isfinite(grad)) and np.all(grad[0, 0] == 0)


def test_gather_topk():
    logits = jnp.arange(24.0).reshape(1, 2, 12)
    ids = jnp.array([[[3, 0], [11, 5]]])
    np.testing.assert_array_equal(gather_topk(logits, ids), [[[3, 0], [23, 17]]])


def test_compute_loss_topk_term():
    rng = np.random.default_rng(6)
    lp, mu, lpT = rand_tokens(rng, (2, 5), spread=0.1)
    A = rng.normal(size=(2, 5)).astype(np.float32)
    m = np.ones((2, 5), bool)
    m[:, 0] = False
    s_topk = rng.normal(size=(2, 5, 3)).astype(np.float32)
    t_topk = rng.normal(size=(2, 5, 3)).astype(np.float32)
    kw = dict(teacher_tau=1.0, student_tau=1.0, use_full_reward_baseline=True)
    base, _ = compute_loss(lp, mu, lpT, A, None, m, **kw)
    off, _ = compute_loss(lp, mu, lpT, A, None, m, student_topk_logprobs=s_topk, teacher_topk_logprobs=t_topk, **kw)
    np.testing.assert_allclose(off, base, rtol=1e-6)  # topk_tau defaults to 0
    for direction in ("forward", "reverse"):
        def f(x):
            return compute_loss(lp, mu, lpT, A, None, m, student_topk_logprobs=x, teacher_topk_logprobs=t_topk,
                                topk_tau=0.5, topk_direction=direction, **kw)
        (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(s_topk)
        kl = np.asarray(topk_kl(s_topk, t_topk, m, direction=direction))
        np.testing.assert_allclose(metrics["topk_kl"], kl[m].mean(), rtol=1e-5)
        np.testing.assert_allclose(loss, base + 0.5 * kl[m].mean(), rtol=1e-5)
        expect = jax.grad(lambda x: topk_kl(x, t_topk, m, direction=direction).sum())(s_topk) * 0.5 / m.sum()
        np.testing.assert_allclose(grad, expect, rtol=1e-5, atol=1e-7)
    # with sequence ratios the top-k term is a token mean per sample like the rest, and the rows divide it
    kw["ratio_type"] = "sequence"
    base, _ = compute_loss(lp, mu, lpT, A, None, m, **kw)
    loss, _ = compute_loss(lp, mu, lpT, A, None, m, student_topk_logprobs=s_topk, teacher_topk_logprobs=t_topk,
                           topk_tau=0.5, **kw)
    kl = np.where(m, np.asarray(topk_kl(s_topk, t_topk, m)), 0.0)
    np.testing.assert_allclose(loss, base + 0.5 * np.sum(kl.sum(1) / m.sum(1)) / 2, rtol=1e-5)
