"""`run(config, plan)`: the whole training run, as its stages.

Start the vLLM servers (loading the JAX model meanwhile), publish the initial weights, check trainer/vLLM parity
(ctxd_jax/parity.py), evaluate the baseline (ctxd_jax/evaluate.py), then per step (`_step`): take the step's batch from the
rollout pipeline (ctxd_jax/pipeline.py, sampling up to `max_async_level` versions ahead), pack, train, publish the
next version (ctxd_jax/inference/handoff.py); then `_evaluate`, log, `_checkpoint`. What a checkpoint holds besides
the trainer's arrays is one small record, `RunState`, including the batches already sampled ahead, so a resumed run
replays what an uninterrupted one would have done. A stop (the command line sets it on SIGINT/SIGTERM) finishes the
current step and saves a checkpoint. Servers stop on every path.

Several processes (one per host, ctxd_jax/hosts.py) all run this same loop, each on its share of every step's groups
with its own servers: it packs its own rows and joins the global train step with them (`Trainer.local`); the step's
metrics are summed over the processes (ctxd_jax/distributed.py), and process 0 alone logs them and writes the run's
files. Each process's sampled-ahead batches are its own: process 0's go into the checkpoint's JSON, the others' into
a file beside it in their own folder (`pending/<step>.json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import sys
import threading
import time
from dataclasses import dataclass

import jax
import numpy as np

from ctxd_jax import distributed, hosts
from ctxd_jax import metrics as metrics_lib
from ctxd_jax import orchestrator as orch
from ctxd_jax.build import load_trainer
from ctxd_jax.checkpoint import Checkpointer, CheckpointError
from ctxd_jax.config import needs_teacher_scores, redacted
from ctxd_jax.envs import env_from_config
from ctxd_jax.evaluate import baseline_table, eval_baseline, evaluate_over_processes
from ctxd_jax.finite import NonFiniteError, Streak, check_finite
from ctxd_jax import rundir
from ctxd_jax.inference.deploy import BASE_NAME, build_servers, teacher_topk
from ctxd_jax.inference import mps
from ctxd_jax.inference.handoff import Publisher
from ctxd_jax.packing import pack
from ctxd_jax.parity import parity_gate
from ctxd_jax.pipeline import RolloutPipeline
from ctxd_jax.scoring import (behaviour_logprobs, score_teacher_in_trainer, score_teacher_prompts,
                              set_teacher_prompts)
from ctxd_jax.records import Rollout
from ctxd_jax.timeline import Timeline
from ctxd_jax.trainer import Trainer, mismatch_kl


def run(config, plan, stop: threading.Event) -> None:
    """`stop` (set by the command line on SIGINT/SIGTERM): finish the step, checkpoint, return. With several
    processes (joined by `distributed.initialize`) every one runs this, with its own servers."""
    out, p = rundir.run_path(config), jax.process_index()
    os.makedirs(hosts.process_dir(out, p), exist_ok=True)
    distributed.check_shared(out)
    if p == 0:
        rundir.mark(out)
    plan = hosts.local_plan(config, plan, p)
    shared_gpu = mps.wanted(config.trainer.mps, plan)
    with mps.daemon(required=config.trainer.mps == "on") if shared_gpu else contextlib.nullcontext():
        deployment = build_servers(config, plan, log_dir=os.path.join(hosts.process_dir(out, p), "logs"),
                                   cpu_core=p % (os.cpu_count() or 1))
        try:
            trainer, tokenizer = start(config, plan, deployment)
            asyncio.run(_main(config, out, deployment, trainer, tokenizer, stop))
        finally:
            deployment.group.stop()


def start(config, plan, deployment) -> tuple[Trainer, object]:
    """Boots the servers while the model loads on the trainer's devices; returns (trainer, tokenizer) once the
    servers are healthy."""
    if plan.trainer.gpu_ids:  # after the servers' environments are built: only the trainer sees these GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(plan.trainer.devices)
        # Before JAX touches the GPU: it must leave the servers sharing these GPUs their share.
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(config.trainer.gpu_memory_fraction)
    for server in deployment.group.servers:
        server.start()
    trainer, tokenizer = load_trainer(config)
    deployment.group.start()  # waits until healthy
    return trainer, tokenizer


@dataclass
class RunState:
    """What a checkpoint holds besides the trainer's arrays (JSON): steps done, the RNG key, and the batches
    sampled ahead of the trainer (steps `step`, `step` + 1, ...; without teacher scores, which are recomputed)."""

    step: int
    rng: list[int]
    pending: list[list[dict]] = dataclasses.field(default_factory=list)

    def meta(self, prompts_per_step: int) -> dict:
        return {"data_position": self.step * prompts_per_step, "rng": self.rng, "pending": self.pending or None}

    @classmethod
    def from_meta(cls, meta: dict) -> "RunState":
        return cls(meta["step"], meta["rng"], meta.get("pending") or [])


_TEACHER_FIELDS = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "teacher_prompt_ids")


@dataclass
class Run:
    """The parts of a run that every stage uses, built once."""

    config: object
    out: str
    src: orch.Sources
    trainer: Trainer
    publisher: Publisher
    ckpt: Checkpointer
    eval_examples: list
    teacher_sampler: tuple | None  # (client, model) that samples the teacher with its context (eval baseline)
    trainer_teacher: bool  # the trainer scores the teacher (LoRA off) after each batch is sampled
    device: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one trainer call at a time
    min_rows: int = 0  # packed rows of the largest batch so far (fewer recompiles without micro-batches)
    snapshots: dict = dataclasses.field(default_factory=dict)  # version -> LoRA state (sampling.logprobs='trainer')
    timeline: Timeline = dataclasses.field(default_factory=Timeline)  # the server's and the trainer's busy periods
    nonfinite: Streak | None = None  # train steps skipped in a row for a non-finite loss or gradient

    async def on_device(self, fn, *args):
        def locked():
            with self.device, self.timeline.span("trainer"):
                return fn(*args)

        return await asyncio.to_thread(locked)


def weights_writer(config, trainer: Trainer):
    """`write(path)`: the trainer's current weights into a folder, as the student servers load them."""
    from ctxd_jax.models.hf import save_adapter, save_merged

    model_path = os.path.expanduser(config.model.path)
    if config.weights.mode == "merged":
        return lambda path: save_merged(trainer.model(), path, src_dir=model_path)
    return lambda path: save_adapter(trainer.model(), path, base_model_name_or_path=model_path)


def _build(config, out, deployment, trainer: Trainer, tokenizer) -> Run:
    env = env_from_config(config)
    src = orch.Sources(
        env=env, tokenizer=tokenizer, train=env.examples("train"), student=deployment.student_client(),
        teacher=deployment.teacher_client(), teacher_model=deployment.teacher_model, context=config.teacher.context,
        max_tokens=config.sampling.max_tokens, temperature=config.sampling.temperature,
        group_size=config.rollouts_per_example, prompts_per_step=config.batch_size // config.rollouts_per_example,
        seed=config.seed, topk=teacher_topk(config),
        skip_verification=config.buffer.skip_verification, vllm_logprobs=config.sampling.logprobs == "vllm",
        reward_errors=config.env.reward_errors)
    mine = hosts.process_dir(out, jax.process_index())  # each process its own adapter versions, from its own copy
    publisher = Publisher([src.student], os.path.join(mine, "weights"), weights_writer(config, trainer),
                          merged=config.weights.mode == "merged", prefix=deployment.student_model, base_name=BASE_NAME)
    ckpt = rundir.checkpointer(config)  # stores the resolved config, which a resume is checked against
    trainer_teacher = deployment.teacher_scorer == "trainer" and needs_teacher_scores(config)
    return Run(config, out, src, trainer, publisher, ckpt, list(env.examples("eval")[:config.eval.num_examples]),
               deployment.teacher_sampler(), trainer_teacher, nonfinite=Streak(config.optim.max_nonfinite_steps))


def _restore(run: Run) -> RunState:
    config, ckpt = run.config, run.ckpt
    state = RunState(0, np.asarray(jax.random.key_data(jax.random.key(config.seed))).tolist())
    latest = ckpt.latest_step() if config.ckpt.resume_step is None else config.ckpt.resume_step
    if config.ckpt.resume and latest is not None:
        try:
            arrays, meta = ckpt.restore(run.trainer.state_arrays(), latest)
            check_finite(arrays, f"{ckpt.directory}/{latest} cannot be resumed")
        except (CheckpointError, NonFiniteError) as e:
            raise CheckpointError(f"{e}; {rundir.fallback(ckpt.steps(), latest)}") from e
        run.trainer.load_state_arrays(arrays)
        state = RunState.from_meta(meta)
        if jax.process_index():
            try:
                with open(rundir.pending_path(run.out, jax.process_index(), state.step)) as f:
                    state.pending = json.load(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{ckpt.directory}/{state.step}: this process's sampled-ahead batches cannot "
                                      f"be read ({e})") from e
        print(f"resumed from {ckpt.directory}/{state.step} (data position {state.step * run.src.prompts_per_step})",
              file=sys.stderr)
    return state


async def _main(config, out, deployment, trainer: Trainer, tokenizer, stop: threading.Event) -> None:
    run = _build(config, out, deployment, trainer, tokenizer)
    state = _restore(run)
    baseline, logger, leader = None, None, jax.process_index() == 0
    try:
        await _publish(run, state.step)
        await parity_gate(config, run.src, trainer, run.publisher.model(state.step), state.step)
        if config.teacher.eval_baseline and state.step == 0 and run.eval_examples:
            baseline = await eval_baseline(config, run.src, run.eval_examples, run.publisher.model(0),
                                           run.teacher_sampler)
            if leader:
                print(baseline_table(baseline), file=sys.stderr)
                metrics_lib.write_json(out, "eval_baseline.json", baseline)
        logger = None if not leader else metrics_lib.MetricsLogger(out, total_steps=config.max_steps, start_step=state.step,
                                           tensorboard=config.log.tensorboard, wandb_project=config.log.wandb,
                                           wandb_entity=config.log.wandb_entity, run_name=config.log.run_name,
                                           run_config=redacted(config).to_dict())
        await _train(run, state, logger, stop)
    finally:
        if logger is not None:
            logger.close()
        run.ckpt.close()
        for client in (run.src.student, run.src.teacher, (run.teacher_sampler or (None,))[0]):
            if client is not None:
                await client.aclose()
        if leader:
            if baseline is None:
                baseline = metrics_lib.read_json(os.path.join(out, "eval_baseline.json"))
            metrics_lib.plot(out, baseline=baseline)


async def _train(run: Run, state: RunState, logger, stop: threading.Event) -> None:
    """The steps, with the rollout pipeline running ahead; returns after max_steps or a stop (checkpoint saved)."""
    config, k = run.config, run.config.max_async_level
    key = jax.random.wrap_key_data(np.asarray(state.rng, np.uint32))
    try:
        async with asyncio.TaskGroup() as tg:
            trainer_side = run.trainer_teacher or config.sampling.logprobs == "trainer"
            hook = functools.partial(_after_sampling, run) if trainer_side else None
            share = (jax.process_index(), jax.process_count())
            pipe = RolloutPipeline(run.src, key, tg, async_level=k, model=run.publisher.model, after_sampling=hook,
                                   timeline=run.timeline, share=share, ordered=share[1] > 1)
            await pipe.publish(state.step)
            for i, batch in enumerate(state.pending):
                pipe.start(state.step + i, sampled=[Rollout(**r) for r in batch])
            synced = distributed.sent_bytes
            try:
                while state.step < config.max_steps:
                    for s in range(state.step, min(state.step + k + 1, config.max_steps)):
                        pipe.start(s)
                    m = await _step(run, pipe, state)
                    if config.eval.interval and state.step % config.eval.interval == 0 and run.eval_examples:
                        m.update(await _evaluate(run, state.step))
                    t0 = m.pop("_t0")
                    m["time/step"] = time.perf_counter() - t0
                    m.update(run.timeline.busy(t0, t0 + m["time/step"]))
                    samples = m.pop("_samples")
                    # What this process exchanged with the others since the last step (a few numbers per call).
                    m["hosts/sync_bytes"], synced = distributed.sent_bytes - synced, distributed.sent_bytes
                    if logger is not None:
                        logger.log(state.step, m, samples=samples)
                    # One process stopped (a signal reaches one host, or all): every process stops after this step.
                    stopping = await run.on_device(lambda: bool(distributed.gather(stop.is_set()).any()))
                    done = state.step >= config.max_steps or stopping
                    if done or (config.ckpt.interval and state.step % config.ckpt.interval == 0):
                        await _checkpoint(run, pipe, state)
                    if done:
                        break
            finally:
                pipe.cancel()
    except BaseExceptionGroup as group:  # report the first failure, not a tree of cancellations
        raise _first_error(group) from None
    if jax.process_index() == 0:
        _export_final(run)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


async def _step(run: Run, pipe: RolloutPipeline, state: RunState) -> dict:
    """Trains on batch `state.step` and publishes the next policy version; returns the step's metrics."""
    config, t0 = run.config, time.perf_counter()
    batch = await pipe.take(state.step)
    t_wait = time.perf_counter() - t0
    current, group = batch.rollouts, config.rollouts_per_example
    if run.trainer_teacher and config.teacher.lora != "off":
        # The live or EMA teacher of the version being trained, whenever the batch was sampled: the run (and a resume
        # of it) does not depend on how sampling and training interleave.
        trainer = run.trainer
        await run.on_device(lambda: score_teacher_prompts(trainer, current, run.src.topk, trainer.teacher_lora()))
    adv, gates = orch.advantages(current, group_size=group, loss=config.loss, advantage=config.advantage)
    packed, stats = pack(current, adv, gates, seq_len=config.seq_len, row_multiple=run.trainer.local_row_multiple,
                         topk=run.src.topk, min_rows=run.min_rows, teacher_rows=run.trainer.step_config.full_vocab)
    t = time.perf_counter()
    rows = await run.on_device(run.trainer.local, packed)  # this process's part of the step's global batch
    t_to_device = time.perf_counter() - t  # its turn on the device included: a scoring call may hold it
    # Without micro-batches every row count is a new compile: keep the largest seen (shapes only grow).
    run.min_rows = len(rows.batch.tokens) if not config.trainer.micro_batch_rows else 0
    t, version = time.perf_counter(), state.step + 1
    # The new version's device work in the step's own turn on the device: a batch scored as the step ends would
    # otherwise go first and hold back the next batch's sampling (seconds a step on one GPU).
    train = await run.on_device(_train_and_prepare, run, rows, version)
    t_train = time.perf_counter() - t
    run.nonfinite.update(version, bool(train["nonfinite_skipped"]))
    t = time.perf_counter()
    if run.publisher.merged:  # one version at a time on the server: older batches must be done sampling
        await pipe.sampled_before(version)
    await run.publisher.publish(version)
    await pipe.publish(version)
    keep = pipe.versions_in_use()
    await run.publisher.retire(keep)
    run.snapshots = {v: lora for v, lora in run.snapshots.items() if v in keep or v == version}
    t_publish = time.perf_counter() - t
    state.step = version
    totals = dict(orch.rollout_totals(current, group), adv=float(np.abs(adv).sum()), gates=float(gates.sum()),
                  tokens=stats.tokens, cut=stats.truncated)
    totals = await run.on_device(distributed.reduce, totals, ("length_max",))  # over every process's share
    m = dict(orch.rollout_metrics(current, group, totals), **train, **batch.metrics)
    n = totals["samples"]
    m.update({"adv/abs_mean": totals["adv"] / n, "kl_gate/mean": totals["gates"] / n,
              "pack/rows": rows.rows, "pack/fill": totals["tokens"] / (rows.rows * config.seq_len),
              "pack/truncated": totals["cut"], "time/wait": t_wait, "time/to_device": t_to_device,
              "time/train": t_train, "time/publish": t_publish,
              "tokens/s_train": totals["tokens"] / t_train, "policy_version": version, "_t0": t0})
    m["_samples"] = {"example_ids": [ex.id for ex in pipe.examples(batch.step)], "policy_version": batch.version,
                     "completion": run.src.tokenizer.decode(current[0].completion_ids, skip_special_tokens=True)}
    return m


async def _publish(run: Run, version: int) -> None:
    """The trainer's current weights become policy `version` on the student servers."""
    await run.on_device(_prepare, run, version)
    await run.publisher.publish(version)


def _prepare(run: Run, version: int) -> None:
    """On the device, before `version` is published: its weights are finite, and when the trainer computes the
    behaviour log-probs, a LoRA snapshot of it to score its batches with."""
    check_finite(run.trainer.lora, f"adapter version {version} not published")
    if run.config.sampling.logprobs == "trainer":
        run.snapshots[version] = run.trainer.snapshot_lora()


def _train_and_prepare(run: Run, rows, version: int) -> dict:
    metrics = run.trainer.step(rows)
    _prepare(run, version)
    return metrics


async def _after_sampling(run: Run, examples, rollouts: list[Rollout], version: int) -> dict:
    return await run.on_device(_score_on_trainer, run, examples, rollouts, version)


def _score_on_trainer(run: Run, examples, rollouts: list[Rollout], version: int) -> dict:
    """Trainer-side scores of a sampled batch: behaviour log-probs under the sampling version's snapshot (a batch
    resumed from a checkpoint already has them), teacher log-probs (and top-k) with the teacher's LoRA state."""
    out = {}
    if version in run.snapshots:
        trainer_lps = behaviour_logprobs(run.trainer, rollouts, run.snapshots[version])
        served = [(r.sampling_logprobs, lp) for r, lp in zip(rollouts, trainer_lps) if r.sampling_logprobs]
        if served:  # vLLM's own log-probs of some groups: how far the trainer's are from them
            vllm, mine = (np.concatenate(x) for x in zip(*served))
            out["mismatch_kl/vllm"] = mismatch_kl(mine, vllm, np.ones(vllm.shape, bool))
        for r, lp in zip(rollouts, trainer_lps):
            r.sampling_logprobs = lp
    src = run.src
    if run.trainer_teacher and run.config.teacher.lora == "off":
        score_teacher_in_trainer(run.trainer, src.tokenizer, src.env, examples, rollouts, src.context, src.topk)
    elif run.trainer_teacher:  # a teacher that learns scores the batch when it is trained (_step)
        set_teacher_prompts(src.tokenizer, src.env, examples, rollouts, src.context)
    return out


async def _evaluate(run: Run, step: int) -> dict:
    config, t = run.config, time.perf_counter()
    runs = {"eval": (run.src.student, run.publisher.model(step), None)}
    r = (await evaluate_over_processes(config, run.src, run.eval_examples, runs))["eval"]
    return {"eval/reward": r["reward"], "eval/completion_len": r["completion_len"],
            "time/eval": time.perf_counter() - t}


async def _checkpoint(run: Run, pipe: RolloutPipeline, state: RunState) -> None:
    """Saves the trainer and the batches already sampled ahead (they are awaited: their versions are published)."""
    ahead = range(state.step, min(state.step + run.config.max_async_level, run.config.max_steps))
    state.pending = [[{k: v for k, v in dataclasses.asdict(r).items() if k not in _TEACHER_FIELDS}
                      for r in (await pipe.peek(s)).rollouts] for s in ahead]
    meta = state.meta(run.src.prompts_per_step)
    arrays = run.trainer.state_arrays()
    await run.on_device(check_finite, arrays, f"checkpoint at step {state.step} not written")
    if jax.process_index():  # process 0's batches are in the JSON (orbax writes it from process 0 alone)
        kept = run.ckpt.steps()[-run.config.ckpt.keep:]
        await asyncio.to_thread(rundir.save_pending, run.out, jax.process_index(), state.step, state.pending, kept)
    await asyncio.to_thread(run.ckpt.save, state.step, arrays, meta)


def _export_final(run: Run) -> None:
    """The last version's weights at a stable path, `<output_dir>/final` (the hand-off folders come and go)."""
    latest = run.publisher.latest
    if latest is None:
        return
    rundir.swap_in_final(run.out, run.publisher.path(latest))
