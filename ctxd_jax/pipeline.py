"""The streaming rollout pipeline: batches of groups that are sampled, verified and scored as soon as they can be.

Batch s is sampled by exactly one policy version, v(s) = max(s - max_async_level, 0), so sampling runs at most
`max_async_level` versions behind the trainer, and which version sampled what never depends on timing: a run is
deterministic in its seed and a resumed run replays an uninterrupted one. A batch starts sampling the moment its
version is published; each of its groups is verified and sent to the vLLM teacher the moment that group's samples
are back, while the other groups still sample. A batch's prompts are always that step's own prompts.

Several processes (one per host) each run a pipeline over their own share of every batch: the groups g with
g % processes == process (`share`), sampled on their own servers with the same seeds a single process would use.
Their trainer-side scores are collective calls, which every process must make in the same order: with `ordered`,
batch s is scored only once the loop awaits it (`take` or `peek`), when the loop makes no other trainer call.

Every task runs in the caller's `asyncio.TaskGroup`: if any part fails, the others are cancelled and the first error
surfaces; nothing is left running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ctxd_jax import orchestrator as orch
from ctxd_jax.envs import Example
from ctxd_jax.records import Rollout
from ctxd_jax.timeline import Timeline

# After sampling, before the batch is handed over: trainer-side work on the whole batch (teacher scores and/or
# behaviour log-probs computed by the trainer), given the batch's examples, rollouts and policy version; returns
# metrics of the batch.
BatchHook = Callable[[Sequence[Example], list[Rollout], int], Awaitable[dict[str, float]]]


@dataclass
class Batch:
    step: int
    version: int
    rollouts: list[Rollout]
    metrics: dict[str, float] = field(default_factory=dict)  # phase times and the after-sampling hook's


class RolloutPipeline:
    """Produces the batches of steps on demand: `start(s)` schedules batch s, `take(s)` awaits and hands it over."""

    def __init__(self, src: orch.Sources, rng_key, tg: asyncio.TaskGroup, *, async_level: int,
                 model: Callable[[int], str], after_sampling: BatchHook | None = None,
                 timeline: Timeline | None = None, share: tuple[int, int] = (0, 1), ordered: bool = False):
        self.src, self.rng_key, self.tg = src, rng_key, tg
        self.share, self.ordered = share, ordered  # share: (this process, processes)
        self._wanted: dict[int, asyncio.Event] = {}  # batch s may run its trainer-side scores (ordered)
        self.timeline = timeline or Timeline()
        self.async_level, self.model, self.after_sampling = async_level, model, after_sampling
        self.published = -1
        self._version_changed = asyncio.Condition()
        self._tasks: dict[int, asyncio.Task] = {}
        self._sampled: dict[int, asyncio.Event] = {}  # set once batch s needs no student server any more

    def version(self, step: int) -> int:
        """The policy version that samples batch `step`."""
        return max(step - self.async_level, 0)

    def examples(self, step: int) -> list[Example]:
        return orch.step_examples(self.src, step * self.src.prompts_per_step)

    def groups(self, count: int) -> range:
        """This process's groups of a batch of `count` groups."""
        return range(self.share[0], count, self.share[1])

    async def publish(self, version: int) -> None:
        """Version `version` (and every earlier one) may now be sampled."""
        async with self._version_changed:
            self.published = max(self.published, version)
            self._version_changed.notify_all()

    def start(self, step: int, sampled: list[Rollout] | None = None) -> None:
        """Schedules batch `step` (once); `sampled` = its rollouts already sampled (a resumed run's pending batch)."""
        if step not in self._tasks:
            self._sampled[step], self._wanted[step] = asyncio.Event(), asyncio.Event()
            self._tasks[step] = self.tg.create_task(self._produce(step, sampled), name=f"batch {step}")

    async def take(self, step: int) -> Batch:
        """Batch `step`, complete; the pipeline forgets it."""
        self._wanted[step].set()
        batch = await self._tasks[step]
        del self._tasks[step], self._sampled[step], self._wanted[step]
        return batch

    async def peek(self, step: int) -> Batch:
        """Batch `step`, complete, left in the pipeline (for a checkpoint of the batches ahead)."""
        self._wanted[step].set()
        return await self._tasks[step]

    def versions_in_use(self) -> set[int]:
        """Versions that a scheduled batch still samples from (or will, once published)."""
        return {self.version(s) for s, done in self._sampled.items() if not done.is_set()}

    async def sampled_before(self, version: int) -> None:
        """Waits until no batch of a version older than `version` needs the student server (merged weights can only
        be swapped then)."""
        for s, done in list(self._sampled.items()):
            if self.version(s) < version:
                await done.wait()

    def cancel(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    async def _produce(self, step: int, sampled: list[Rollout] | None) -> Batch:
        examples, version = self.examples(step), self.version(step)
        scored_by_vllm = self.src.teacher is not None
        times: dict[str, float] = {}
        if sampled is None:
            async with self._version_changed:
                await self._version_changed.wait_for(lambda: self.published >= version)
            t0 = time.perf_counter()
            seeds = orch.group_seeds(self.rng_key, step, len(examples))
            with self.timeline.span("server"):
                async with asyncio.TaskGroup() as groups:
                    tasks = [groups.create_task(self._group(g, examples[g], seeds[g], version, scored_by_vllm, times,
                                                            t0)) for g in self.groups(len(examples))]
            rollouts = [r for t in tasks for r in t.result()]
            times["time/rollouts"] = time.perf_counter() - t0
        else:  # sampled and verified before a checkpoint; teacher scores are recomputed
            rollouts, t0 = sampled, time.perf_counter()
            if scored_by_vllm:
                n = self.src.group_size
                await asyncio.gather(*(orch.score_group(self.src, examples[g], rollouts[i * n:(i + 1) * n])
                                       for i, g in enumerate(self.groups(len(examples)))))
        if not self.ordered:  # ordered, its scores come later and need its version's LoRA snapshot until then
            self._sampled[step].set()
        if self.after_sampling is not None:
            if self.ordered:
                await self._wanted[step].wait()
            t = time.perf_counter()
            times.update(await self.after_sampling(examples, rollouts, version))
            times["time/trainer_scoring"] = time.perf_counter() - t
        self._sampled[step].set()
        return Batch(step, version, rollouts, times)

    async def _group(self, g: int, example: Example, seed: int, version: int, score: bool, times: dict,
                     t0: float) -> list[Rollout]:
        # Without vLLM's log-probs, group 0 still brings them: the trainer's are checked against them (mismatch).
        rollouts = await orch.sample_group(self.src, example, g, seed, model=self.model(version), version=version,
                                           logprobs=self.src.vllm_logprobs or g == 0)
        times["time/sample"] = max(times.get("time/sample", 0.0), time.perf_counter() - t0)  # the last group's
        t = time.perf_counter()
        orch.verify(self.src, example, rollouts)
        times["time/verify"] = times.get("time/verify", 0.0) + time.perf_counter() - t
        if score:
            await orch.score_group(self.src, example, rollouts)
        return rollouts
