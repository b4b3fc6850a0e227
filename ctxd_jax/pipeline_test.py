"""The rollout pipeline against an in-process fake of the client interface (the real servers: tests/test_e2e.py)."""

import asyncio
import random

import jax
import pytest
from transformers import AutoTokenizer

from ctxd_jax import orchestrator as orch
from ctxd_jax.envs import get_env
from ctxd_jax.envs.persona import style_context
from ctxd_jax.pipeline import RolloutPipeline
from ctxd_jax.records import Completion
from ctxd_jax.tiny import write_tiny_checkpoint


class FakeClient:
    """Answers like a vLLM server would, after a random delay: samples are a function of (model, seed)."""

    def __init__(self, delays: random.Random, fail_on_seed: int | None = None):
        self.delays, self.fail_on_seed = delays, fail_on_seed
        self.log: list[tuple] = []  # (event, model or None, seed or None)
        self.in_flight = 0

    async def _pause(self):
        self.in_flight += 1
        try:
            await asyncio.sleep(self.delays.random() * 0.02)
        finally:
            self.in_flight -= 1

    async def sample(self, prompt_ids, n, *, model, max_tokens, temperature, seed, logprobs=True):
        self.log.append(("sample", model, seed))
        await self._pause()
        if seed == self.fail_on_seed:
            raise RuntimeError(f"server died while sampling seed {seed}")
        self.log.append(("sampled", model, seed))
        rng = random.Random(f"{model}/{seed}")
        return [Completion([rng.randrange(3, 300) for _ in range(4)], [-1.0] * 4 if logprobs else None, "length")
                for _ in range(n)]

    async def score(self, ids, start, *, model, topk=0):
        self.log.append(("score", model, None))
        await self._pause()
        return [-0.5] * (len(ids) - start), None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), "qwen3"))


def _sources(tokenizer, client, teacher=True):
    env = get_env("ahoy", seed=0)
    return orch.Sources(env=env, tokenizer=tokenizer, train=env.examples("train"), student=client,
                        teacher=client if teacher else None, teacher_model="base" if teacher else None,
                        context=style_context("ahoy"), max_tokens=4, temperature=1.0, group_size=2,
                        prompts_per_step=3, seed=0)


async def _run(src, steps: int, async_level: int, after_sampling=None, **kwargs):
    """The loop's schedule without a trainer: publish version s + 1 once batch s is taken."""
    batches = []
    async with asyncio.TaskGroup() as tg:
        pipe = RolloutPipeline(src, jax.random.key(0), tg, async_level=async_level, model=lambda v: f"student-v{v}",
                               after_sampling=after_sampling, **kwargs)
        await pipe.publish(0)
        try:
            for step in range(steps):
                for s in range(step, min(step + async_level + 1, steps)):
                    pipe.start(s)
                src.student.log.append(("take", step, None))
                batches.append(await pipe.take(step))
                src.student.log.append(("publish", step + 1, None))
                await pipe.publish(step + 1)
        finally:
            pipe.cancel()
    return batches


def _summary(batches):
    return [(b.step, b.version, [(r.example_id, r.completion_ids, r.reward, r.teacher_logprobs, r.policy_version)
                                 for r in b.rollouts]) for b in batches]


@pytest.mark.parametrize("async_level", [0, 1, 2])
def test_versions_are_pinned_and_runs_do_not_depend_on_timing(tokenizer, async_level):
    runs = []
    for delay_seed in (0, 1):
        client = FakeClient(random.Random(delay_seed))
        runs.append((asyncio.run(_run(_sources(tokenizer, client), 5, async_level)), client.log))
    (batches, log), (other, _) = runs
    assert _summary(batches) == _summary(other)  # other delays, same batches
    assert [b.version for b in batches] == [max(s - async_level, 0) for s in range(5)]
    for b in batches:
        assert len(b.rollouts) == 6 and {r.policy_version for r in b.rollouts} == {b.version}
        assert [r.group for r in b.rollouts] == [0, 0, 1, 1, 2, 2]
        assert b.rollouts[0].teacher_logprobs == [-0.5] * 4
    # each request names its batch's version, and is sent only after that version was published
    published = 0
    for event, model, _ in log:
        if event == "publish":
            published = model
        elif event == "sample":
            assert int(model.rsplit("-v", 1)[1]) <= published
    # the prompts are the steps' own, whatever the lag
    src = _sources(tokenizer, FakeClient(random.Random(0)))
    for b in batches:
        assert [r.example_id for r in b.rollouts[::2]] == [ex.id for ex in orch.step_examples(src, b.step * 3)]


class Slower:
    """Delays that grow call by call (0.1 s, 0.2 s, ...): the groups' samples come back far apart."""

    def __init__(self):
        self.calls = 0

    def random(self):
        self.calls += 1
        return 5.0 * self.calls


def test_groups_stream_to_the_teacher_while_others_sample(tokenizer):
    client = FakeClient(Slower())
    asyncio.run(_run(_sources(tokenizer, client), 1, 0))
    events = [e for e, _, _ in client.log]
    # a group went to the teacher before the last group's samples came back
    assert events.index("score") < max(i for i, e in enumerate(events) if e == "sampled")


def test_a_failure_cancels_everything_and_surfaces_first(tokenizer):
    src = _sources(tokenizer, FakeClient(random.Random(0)))
    bad_seed = orch.group_seeds(jax.random.key(0), 2, 3)[1]  # a group of batch 2
    src.student.fail_on_seed = bad_seed

    async def main():
        with pytest.raises(ExceptionGroup) as e:
            await _run(src, 6, 1)
        # nothing of the pipeline is left running
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        return e.value

    group = asyncio.run(main())
    leaves = []

    def walk(g):
        for x in g.exceptions:
            walk(x) if isinstance(x, BaseExceptionGroup) else leaves.append(x)

    walk(group)
    assert [str(x) for x in leaves] == [f"server died while sampling seed {bad_seed}"]


def test_resumed_batches_are_rescored_not_resampled(tokenizer):
    client = FakeClient(random.Random(0))
    src = _sources(tokenizer, client)
    (first,) = asyncio.run(_run(src, 1, 0))
    for r in first.rollouts:
        r.teacher_logprobs = None

    async def main():
        async with asyncio.TaskGroup() as tg:
            pipe = RolloutPipeline(src, jax.random.key(0), tg, async_level=1, model=lambda v: f"student-v{v}")
            pipe.start(0, sampled=first.rollouts)  # no version published: it must not sample
            return await pipe.take(0)

    client.log.clear()
    batch = asyncio.run(main())
    assert [e for e, _, _ in client.log] == ["score"] * 6  # no "sample"
    assert batch.rollouts[0].teacher_logprobs == [-0.5] * 4


def test_trainer_side_hook_fills_what_vllm_did_not_send(tokenizer):
    """sampling.logprobs='trainer': only group 0 asks vLLM for log-probs; the hook sees the whole sampled batch with
    its version before the trainer does, and its metrics land in the batch's."""
    src = _sources(tokenizer, FakeClient(random.Random(0)), teacher=False)
    src.vllm_logprobs = False
    seen = []

    async def hook(examples, rollouts, version):
        seen.append((len(examples), version, [r.sampling_logprobs is not None for r in rollouts]))
        for r in rollouts:
            r.sampling_logprobs = [-2.0] * len(r.completion_ids)
        return {"mismatch_kl/vllm": 0.5}

    batches = asyncio.run(_run(src, 3, 1, after_sampling=hook))
    assert seen == [(3, v, [True, True, False, False, False, False]) for v in (0, 0, 1)]
    for b in batches:
        assert b.metrics["mismatch_kl/vllm"] == 0.5 and "time/trainer_scoring" in b.metrics
        assert all(r.sampling_logprobs == [-2.0] * 4 for r in b.rollouts)


def test_each_process_samples_its_share_and_scores_it_in_the_loops_order(tokenizer):
    """Two processes' pipelines (groups g % 2) sample exactly one process's groups between them; `ordered`, a batch's
    trainer-side hook runs only once the loop takes it."""
    one = asyncio.run(_run(_sources(tokenizer, FakeClient(random.Random(0)), teacher=False), 2, 1))
    parts, logs = [], []
    for process in range(2):
        client = FakeClient(random.Random(process))

        async def hook(examples, rollouts, version, client=client):
            client.log.append(("hook", rollouts[0].group, None))
            return {}

        parts.append(asyncio.run(_run(_sources(tokenizer, client, teacher=False), 2, 1, after_sampling=hook,
                                      share=(process, 2), ordered=True)))
        logs.append(client.log)
    for step, batch in enumerate(one):
        groups = {p: part[step].rollouts for p, part in enumerate(parts)}
        assert [r.group for r in groups[0]] == [0, 0, 2, 2] and [r.group for r in groups[1]] == [1, 1]
        mine = sorted(groups[0] + groups[1], key=lambda r: r.group)
        assert [r.completion_ids for r in mine] == [r.completion_ids for r in batch.rollouts]
    for log in logs:
        order = [event for event, _, _ in log if event in ("take", "hook")]
        assert order == ["take", "hook", "take", "hook"], order
