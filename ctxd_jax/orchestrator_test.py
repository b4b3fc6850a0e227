import jax
import ml_collections
import numpy as np

from ctxd_jax import orchestrator as orch
from ctxd_jax.records import Rollout


def test_prompt_indices_cover_each_epoch_once_and_resume_exactly():
    first = orch.prompt_indices(0, 10, 10, seed=3)
    assert sorted(first) == list(range(10))
    assert orch.prompt_indices(0, 25, 10, seed=3)[:10] == first
    # any split of the stream gives the same prompts (what a resumed run relies on)
    assert orch.prompt_indices(0, 7, 10, 3) + orch.prompt_indices(7, 18, 10, 3) == orch.prompt_indices(0, 25, 10, 3)
    assert orch.prompt_indices(10, 10, 10, 3) != first  # a new permutation per epoch
    assert orch.prompt_indices(0, 10, 10, 4) != first


def test_group_seeds_are_a_function_of_key_and_step():
    key = jax.random.key(1)
    assert orch.group_seeds(key, 2, 4) == orch.group_seeds(jax.random.key(1), 2, 4)
    assert orch.group_seeds(key, 2, 4) != orch.group_seeds(key, 3, 4)
    assert len(set(orch.group_seeds(key, 0, 8))) == 8


def _r(group, reward, n=3, teacher=-2.0):
    return Rollout(str(group), group, [1, 2], list(range(n)), [-1.0] * n, "stop", reward=reward,
                   teacher_logprobs=[teacher] * n)


def test_advantages_and_metrics():
    rs = [_r(0, 1.0), _r(0, 0.0), _r(1, 0.0), _r(1, 0.0)]
    loss = ml_collections.ConfigDict(dict(adv_tau=1.0, teacher_tau=0.0, student_tau=0.0))
    adv_cfg = ml_collections.ConfigDict(dict(use_full_reward_baseline=True, kl_only_incorrect=True,
                                             length_weighted_mean=False, kl_normalize="sum"))
    adv, gates = orch.advantages(rs, group_size=2, loss=loss, advantage=adv_cfg)
    np.testing.assert_allclose(adv, [0.5, -0.5, 0.0, 0.0])
    np.testing.assert_allclose(gates, [0.5, 0.5, 1.0, 1.0])
    # the lengths that weight the baseline are the completions' token counts
    adv_cfg.length_weighted_mean = True
    adv, _ = orch.advantages([_r(0, 1.0, n=10), _r(0, 2.0, n=30)], group_size=2, loss=loss, advantage=adv_cfg)
    np.testing.assert_allclose(adv, [-0.75, 0.25])
    # kl_normalize='mean': the KL terms are per-token rates (teacher -2 vs student -1 a token, any length)
    loss.teacher_tau = loss.student_tau = 1.0
    adv_cfg.length_weighted_mean, adv_cfg.kl_normalize = False, "mean"
    adv, _ = orch.advantages([_r(0, 0.0, n=10), _r(0, 0.0, n=30)], group_size=2, loss=loss, advantage=adv_cfg)
    np.testing.assert_allclose(adv, [0.0, 0.0], atol=1e-6)
    adv_cfg.kl_normalize = "sum"
    adv, _ = orch.advantages([_r(0, 0.0, n=10), _r(0, 0.0, n=30)], group_size=2, loss=loss, advantage=adv_cfg)
    np.testing.assert_allclose(adv, [10.0, -10.0])
    loss.teacher_tau = loss.student_tau = 0.0
    m = orch.rollout_metrics(rs, 2)
    assert m["reward/mean"] == 0.25 and m["reward/group_any_solved"] == 0.5 and m["reward/group_all_solved"] == 0.0
    assert m["teacher_kl/seq"] == 3.0  # sum(-1) - sum(-2) over 3 tokens


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class _Env:
    def reward(self, example, text):
        return {"0": 1.0, "0 1": float("nan")}.get(text, 0.5)


def test_verify_checks_each_reward():
    import pytest

    from ctxd_jax.envs import Example
    from ctxd_jax.rewards import RewardError

    ex = Example("e1", (), {})
    rs = [_r(0, 0.0, n=1), _r(0, 0.0, n=2), _r(0, 0.0, n=3)]
    src = orch.Sources(_Env(), _Tok(), [ex], None, None, None, "", 8, 1.0, 3, 1, 0, reward_errors="zero")
    orch.verify(src, ex, rs)
    assert [r.reward for r in rs] == [1.0, 0.0, 0.5] and [r.reward_error for r in rs] == [False, True, False]
    assert orch.rollout_metrics(rs, 3)["reward/errors"] == 1.0
    src.reward_errors = "stop"
    with pytest.raises(RewardError, match=r"example 'e1' is nan \(not a finite number\)"):
        orch.verify(src, ex, rs)
