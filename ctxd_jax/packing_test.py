import numpy as np
import pytest

from ctxd_jax.packing import MAX_SAMPLES_PER_ROW, first_fit_decreasing, pack
from ctxd_jax.records import Rollout


def _rollout(i, p, c, *, teacher=True, topk=0, group=0, temperature=1.0):
    comp = [100 + i * 10 + j for j in range(c)]
    return Rollout(example_id=f"e{i}", group=group, prompt_ids=[50 + i] * p, completion_ids=comp,
                   sampling_logprobs=[-(i + 1) - j / 100 for j in range(c)], finish_reason="stop",
                   temperature=temperature,
                   teacher_logprobs=[-(i + 1) * 10 - j / 100 for j in range(c)] if teacher else None,
                   teacher_topk_ids=[[t, t + 1, t + 2] for t in comp] if topk else None,
                   teacher_topk_logprobs=[[-1.0, -2.0, -3.0]] * c if topk else None)


def test_first_fit_decreasing():
    # 7 opens a bin, 5 opens one, 4 fits beside 5, 3 beside 7, 2 fits nowhere
    assert first_fit_decreasing([3, 7, 5, 2, 4], 10) == [[1, 0], [2, 4], [3]]
    bins = first_fit_decreasing([6, 6, 4, 4, 3, 3, 2], 10)
    assert sorted(sum(bins, [])) == list(range(7))
    assert all(sum([6, 6, 4, 4, 3, 3, 2][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3
    with pytest.raises(ValueError, match="seq_len"):
        first_fit_decreasing([11], 10)


def test_pack_alignment_and_masks():
    rs = [_rollout(0, 3, 4), _rollout(1, 2, 2, temperature=0.7), _rollout(2, 5, 5)]
    batch, stats = pack(rs, advantages=[0.5, -1.0, 2.0], kl_gates=[1.0, 0.25, 0.0], seq_len=16)
    assert stats.samples == 3 and stats.truncated == 0 and stats.filler_rows == 0
    assert batch.tokens.dtype == np.int32 and batch.tokens.shape == (stats.rows, 16)
    seen = 0
    for row in range(stats.rows):
        for seg in range(1, batch.segment_ids[row].max() + 1):
            idx = np.nonzero(batch.segment_ids[row] == seg)[0]
            assert (np.diff(idx) == 1).all()
            toks = batch.tokens[row, idx]
            r = next(r for r in rs if r.prompt_ids[0] == toks[0])
            p = len(r.prompt_ids)
            assert list(toks) == r.prompt_ids + r.completion_ids
            np.testing.assert_array_equal(batch.positions[row, idx], np.arange(len(idx)))
            assert not batch.loss_mask[row, idx[:p]].any() and batch.loss_mask[row, idx[p:]].all()
            np.testing.assert_allclose(batch.sampling_logprobs[row, idx[p:]], r.sampling_logprobs)
            np.testing.assert_allclose(batch.teacher_logprobs[row, idx[p:]], r.teacher_logprobs)
            assert (batch.sampling_logprobs[row, idx[:p]] == 0).all() and (batch.teacher_logprobs[row, idx[:p]] == 0).all()
            i = rs.index(r)
            assert (batch.advantages[row, idx] == [0.5, -1.0, 2.0][i]).all()
            assert (batch.kl_gates[row, idx] == [1.0, 0.25, 0.0][i]).all()
            np.testing.assert_allclose(batch.temperatures[row, idx], r.temperature)
            seen += 1
    assert seen == 3
    pad = batch.segment_ids == 0
    assert not batch.loss_mask[pad].any() and (batch.tokens[pad] == 0).all()
    assert stats.loss_tokens == 11 == batch.loss_mask.sum()
    assert stats.tokens == 21 and 0 < stats.fill <= 1


def test_pack_ffd_rows():
    rs = [_rollout(i, 2, n) for i, n in enumerate([6, 6, 2, 2, 1, 5])]  # lengths 8,8,4,4,3,7 into 10
    batch, stats = pack(rs, np.zeros(6), seq_len=10)
    assert stats.rows == 4  # FFD: [8], [8], [7, 3], [4, 4]
    assert stats.tokens == 34


def test_truncation_keeps_prefix():
    r = _rollout(0, 4, 10)
    batch, stats = pack([r], [1.0], seq_len=8)
    assert stats.truncated == 1 and stats.loss_tokens == 4
    assert list(batch.tokens[0]) == (r.prompt_ids + r.completion_ids)[:8]
    np.testing.assert_allclose(batch.sampling_logprobs[0, 4:], r.sampling_logprobs[:4])
    # prompt longer than seq_len: no loss tokens, still packed
    batch, stats = pack([_rollout(1, 9, 2)], [1.0], seq_len=8)
    assert stats.loss_tokens == 0 and stats.truncated == 1


def test_filler_rows_for_data_parallel():
    rs = [_rollout(i, 3, 3) for i in range(3)]  # 3 rows of 6 in seq_len 8
    batch, stats = pack(rs, [1.0, 2.0, 3.0], seq_len=8, row_multiple=4)
    assert stats.rows == 4 and stats.filler_rows == 1
    filler = [r for r in range(4) if batch.segment_ids[r].max() == 0]
    assert len(filler) == 1
    f = filler[0]
    assert not batch.loss_mask[f].any() and (batch.advantages[f] == 0).all() and (batch.tokens[f] == 0).all()
    _, stats = pack(rs, [1.0, 2.0, 3.0], seq_len=8, row_multiple=2, min_rows=5)
    assert stats.rows == 6 and stats.filler_rows == 3


def test_no_teacher_and_topk():
    batch, _ = pack([_rollout(0, 2, 3, teacher=False)], [0.0], seq_len=8)
    assert batch.teacher_logprobs is None and batch.teacher_topk_ids is None
    r = _rollout(0, 2, 3, topk=3)
    batch, _ = pack([r], [0.0], seq_len=8, topk=2)
    assert batch.teacher_topk_ids.shape == (1, 8, 2)
    np.testing.assert_array_equal(batch.teacher_topk_ids[0, 2:5], np.asarray(r.teacher_topk_ids)[:, :2])
    np.testing.assert_allclose(batch.teacher_topk_logprobs[0, 2:5], [[-1.0, -2.0]] * 3)
    assert (batch.teacher_topk_ids[0, :2] == 0).all()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="advantages"):
        pack([_rollout(0, 2, 2)], [1.0, 2.0], seq_len=8)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        pack([_rollout(0, 2, 2), _rollout(1, 2, 2, teacher=False)], [1.0, 2.0], seq_len=8)


def test_rows_hold_at_most_max_samples():
    lengths = [2] * 200  # short samples that would all fit one row by tokens
    bins = first_fit_decreasing(lengths, 1000)
    assert [len(b) for b in bins] == [MAX_SAMPLES_PER_ROW] * 3 + [200 - 3 * MAX_SAMPLES_PER_ROW]
    assert first_fit_decreasing([2] * 5, 1000, max_items=2) == [[0, 1], [2, 3], [4]]
    batch, stats = pack([_rollout(i, 1, 1) for i in range(70)], advantages=np.zeros(70), seq_len=512)
    assert stats.rows == 2 and int(batch.segment_ids.max()) == MAX_SAMPLES_PER_ROW
