"""`run(config, plan)`: the whole training run (issue 7).

Start the vLLM servers (loading the JAX model meanwhile), publish the initial adapter, check trainer/vLLM parity,
evaluate the baseline, then per step: pack the step's rollouts, train, hand the new adapter to the student server,
log, checkpoint. With `max_async_level >= 1` the next batch is sampled (with the previous adapter) while the trainer
trains; the adapter is published only once that batch is sampled, so every batch is exactly one policy version
behind, whatever the timing, and a resumed run replays what an uninterrupted one would have done. The checkpoint
then also holds that sampled-but-untrained batch (without teacher scores, which are recomputed).
Ctrl-C finishes the current step, saves a checkpoint and stops; a second Ctrl-C aborts. Servers stop on every path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from ctxd_jax import metrics as metrics_lib
from ctxd_jax import orchestrator as orch
from ctxd_jax.checkpoint import Checkpointer
from ctxd_jax.envs import get_env
from ctxd_jax.evaluate import baseline_table, evaluate
from ctxd_jax.inference import handoff
from ctxd_jax.inference.deploy import build_servers
from ctxd_jax.packing import pack
from ctxd_jax.records import Rollout
from ctxd_jax.trainer import LOSS_KEYS, OptimConfig, StepConfig, Trainer, mismatch_kl


class ParityError(RuntimeError):
    pass


def optim_config(config) -> OptimConfig:
    o = config.optim
    return OptimConfig(lr=o.lr, max_norm=o.max_norm, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                       warmup_steps=o.warmup_steps, schedule=o.schedule, total_steps=max(config.max_steps, 1))


def step_config(config) -> StepConfig:
    loss, t = config.loss, config.trainer
    return StepConfig(teacher_tau=loss.teacher_tau, student_tau=loss.student_tau,
                      use_full_reward_baseline=config.advantage.use_full_reward_baseline,
                      topk_tau=loss.topk_tau, topk_direction=loss.topk_direction,
                      masks=tuple((k, float(loss[k])) for k in LOSS_KEYS),
                      micro_batch_rows=t.micro_batch_rows, chunk_size=t.chunk_size)


def run(config, plan, stop: threading.Event) -> None:
    """`stop` (set by the command line on SIGINT/SIGTERM): finish the step, checkpoint, return."""
    out = os.path.abspath(os.path.expanduser(config.output_dir))
    os.makedirs(out, exist_ok=True)
    deployment = build_servers(config, plan, log_dir=os.path.join(out, "logs"))
    if plan.trainer.gpu_ids:  # after the servers' environments are built: only the trainer sees these GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, plan.trainer.gpu_ids))
        # Before JAX touches the GPU: it must leave the servers sharing these GPUs their share.
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(config.trainer.gpu_memory_fraction)
    try:
        for server in deployment.group.servers:  # boot the servers while the model loads
            server.start()
        trainer, tokenizer = _load_trainer(config)
        deployment.group.start()  # waits until healthy
        asyncio.run(_main(config, out, deployment, trainer, tokenizer, stop))
    finally:
        deployment.group.stop()


def _load_trainer(config):
    from transformers import AutoTokenizer

    from ctxd_jax.models.hf import load_model
    from ctxd_jax.sharding import make_mesh

    path = os.path.expanduser(config.model.path)
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    mesh = make_mesh(tp=config.trainer.tp)
    model = load_model(path, lora_rank=config.lora.rank, lora_alpha=config.lora.alpha, dtype=dtype, param_dtype=dtype,
                       mesh=mesh, seed=config.seed, remat=config.trainer.remat,
                       remat_policy=config.trainer.remat_policy, attn_impl=_attn_impl(config.trainer.attn_impl))
    return Trainer(model, mesh, optim_config(config), step_config(config)), AutoTokenizer.from_pretrained(path)


def _attn_impl(name: str) -> str | None:
    if name == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else None
    return None if name == "xla" else name


async def _main(config, out, deployment, trainer: Trainer, tokenizer, stop: threading.Event) -> None:
    model_path = os.path.expanduser(config.model.path)
    args = config.env.get("args")
    env = get_env(config.env.name, **(args.to_dict() if args is not None else {}))
    group = config.rollouts_per_example
    per_step = config.batch_size // group
    topk = config.loss.topk if config.loss.topk_tau > 0 else 0
    src = orch.Sources(
        env=env, tokenizer=tokenizer, train=env.examples("train"), student=deployment.student_client(),
        student_model=deployment.student_model, teacher=deployment.teacher_client(),
        teacher_model=deployment.teacher_model, context=config.teacher.context,
        max_tokens=config.sampling.max_tokens, temperature=config.sampling.temperature, group_size=group,
        prompts_per_step=per_step, seed=config.seed, topk=topk, skip_verification=config.buffer.skip_verification)
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=config.ckpt.keep)
    rng_key = jax.random.key(config.seed)
    step, position, pending = 0, 0, None
    latest = ckpt.latest_step()
    if config.ckpt.resume and latest is not None:
        arrays, meta = ckpt.restore(trainer.state_arrays(), latest)
        trainer.load_state_arrays(arrays)
        step, position = meta["step"], meta["data_position"]
        rng_key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        if meta.get("pending"):
            pending = [Rollout(**r) for r in meta["pending"]]
            await orch.score_teacher(src, orch.step_examples(src, position - per_step), pending)
        print(f"resumed from {ckpt.directory}/{step} (data position {position})", file=sys.stderr)
    elif latest is not None:
        print(f"starting fresh: removing old checkpoints in {ckpt.directory} (resume with --config.ckpt.resume)",
              file=sys.stderr)
        ckpt.close()
        shutil.rmtree(ckpt.directory)
        ckpt = Checkpointer(ckpt.directory, keep=config.ckpt.keep)

    weights_root = os.path.join(out, "weights")

    async def publish(version: int) -> None:
        from ctxd_jax.models.hf import save_adapter, save_merged

        path = handoff.new_step_dir(weights_root, version)
        if config.weights.mode == "merged":
            await asyncio.to_thread(save_merged, trainer.model(), path, src_dir=model_path)
            await handoff.publish_merged([src.student], path, root=weights_root, version=str(version))
        else:
            await asyncio.to_thread(save_adapter, trainer.model(), path, base_model_name_or_path=model_path)
            await handoff.publish_adapter([src.student], src.student_model, path, root=weights_root)

    async def make(s: int, version: int):
        """Batch `s`, sampled by the adapter the server holds now (`version`)."""
        nonlocal position
        start, position = position, position + per_step
        return await orch.produce(src, rng_key, s, start, version=version)

    def save(s: int, next_batch) -> None:
        teacher_keys = {"teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"}  # re-scored on resume
        meta = {"data_position": position, "rng": np.asarray(jax.random.key_data(rng_key)).tolist(),
                "pending": None if next_batch is None else [
                    {k: v for k, v in dataclasses.asdict(r).items() if k not in teacher_keys} for r in next_batch]}
        ckpt.save(s, trainer.state_arrays(), meta)

    eval_examples = list(env.examples("eval")[:config.eval.num_examples])
    await publish(step)
    await parity_gate(config, src, trainer, step)
    baseline = None
    if config.teacher.eval_baseline and step == 0 and eval_examples:
        baseline = await eval_baseline(config, src, eval_examples)
        print(baseline_table(baseline), file=sys.stderr)
        metrics_lib.write_json(out, "eval_baseline.json", baseline)

    logger = metrics_lib.MetricsLogger(out, total_steps=config.max_steps, start_step=step,
                                       tensorboard=config.log.tensorboard, wandb_project=config.log.wandb,
                                       run_config=config.to_dict())
    try:
        current, times = pending, {}  # a resumed pending batch was sampled before the stop
        if current is None and step < config.max_steps:
            current, times = await make(step, step)
        min_rows = 0
        while step < config.max_steps:
            t0 = time.perf_counter()
            lag = config.max_async_level >= 1 and step + 1 < config.max_steps
            next_task = asyncio.create_task(make(step + 1, step)) if lag else None
            adv, gates = orch.advantages(current, group_size=group, loss=config.loss, advantage=config.advantage)
            batch, stats = pack(current, adv, gates, seq_len=config.seq_len, row_multiple=trainer.row_multiple,
                                topk=topk, min_rows=min_rows)
            # Without micro-batches every row count is a new compile: keep the largest seen (shapes only grow).
            min_rows = stats.rows if not config.trainer.micro_batch_rows else 0
            t = time.perf_counter()
            train = await asyncio.to_thread(trainer.step, batch)
            t_train = time.perf_counter() - t
            nxt, times_next = await next_task if next_task is not None else (None, {})
            t = time.perf_counter()
            await publish(step + 1)
            t_publish = time.perf_counter() - t
            step += 1
            m = dict(orch.rollout_metrics(current, group), **train)
            m.update({"adv/abs_mean": float(np.abs(adv).mean()), "kl_gate/mean": float(gates.mean()),
                      "pack/rows": stats.rows, "pack/fill": stats.fill, "pack/truncated": stats.truncated,
                      **times, "time/train": t_train, "time/publish": t_publish,
                      "tokens/s_train": stats.tokens / t_train, "policy_version": step})
            if config.eval.interval and step % config.eval.interval == 0 and eval_examples:
                t = time.perf_counter()
                r = await evaluate(env, tokenizer, eval_examples, src.student, model=src.student_model,
                                   max_tokens=config.sampling.max_tokens, temperature=config.sampling.temperature,
                                   seed=config.seed)
                m.update({"eval/reward": r["reward"], "eval/completion_len": r["completion_len"],
                          "time/eval": time.perf_counter() - t})
            m["time/step"] = time.perf_counter() - t0
            logger.log(step, m, samples={
                "example_ids": [r.example_id for r in current[::group]], "policy_version": current[0].policy_version,
                "completion": tokenizer.decode(current[0].completion_ids, skip_special_tokens=True)})
            done = step >= config.max_steps or stop.is_set()
            if done or (config.ckpt.interval and step % config.ckpt.interval == 0):
                await asyncio.to_thread(save, step, nxt)
            if done:
                break
            current, times = (nxt, times_next) if nxt is not None else await make(step, step)
        if stop.is_set():
            print(f"stopped at step {step}; resume with --config.ckpt.resume", file=sys.stderr)
    finally:
        logger.close()
        ckpt.close()
        for client in (src.student, src.teacher):
            if client is not None:
                await client.aclose()
        if baseline is None:
            baseline = metrics_lib.read_json(os.path.join(out, "eval_baseline.json"))
        metrics_lib.plot(out, baseline=baseline)


async def parity_gate(config, src: orch.Sources, trainer: Trainer, version: int) -> float:
    """Samples a few completions and scores them with the trainer; stops the run if the mismatch KL is too big."""
    n = config.parity.num_prompts
    if n <= 0:
        return 0.0
    examples = list(src.env.examples("eval")[:n]) or list(src.train[:n])
    one = dataclasses.replace(src, group_size=1)
    rollouts = await orch.sample(one, examples, [config.seed + i for i in range(len(examples))], version=version)
    batch, _ = pack(rollouts, np.zeros(len(rollouts)), seq_len=config.seq_len, row_multiple=trainer.row_multiple)
    logprobs = await asyncio.to_thread(trainer.logprobs, batch)
    kl = mismatch_kl(logprobs, batch.sampling_logprobs, batch.loss_mask)
    bound = config.parity.max_mismatch_kl
    print(f"parity gate: mismatch KL between vLLM and the trainer {kl:.2e} (bound {bound:.0e})", file=sys.stderr)
    if not kl <= bound:
        raise ParityError(
            f"parity.max_mismatch_kl: vLLM's and the trainer's log-probs of the same {len(rollouts)} samples differ "
            f"(mismatch KL {kl:.3g} > {bound:.3g}); check the model folder, tokenizer/chat template and model.dtype")
    return kl


async def eval_baseline(config, src: orch.Sources, examples) -> dict[str, dict[str, float]]:
    """The student without context (base weights) and, if there is one, the teacher with its context."""
    kw = dict(max_tokens=config.sampling.max_tokens, temperature=config.sampling.temperature, seed=config.seed)
    jobs = {"student": evaluate(src.env, src.tokenizer, examples, src.student, model=src.student_model, **kw)}
    if src.teacher is not None:
        jobs["teacher"] = evaluate(src.env, src.tokenizer, examples, src.teacher, model=src.teacher_model,
                                   context=src.context, **kw)
    return dict(zip(jobs, await asyncio.gather(*jobs.values())))
