"""Context distillation against RL, measured: several post-training methods on the same context tasks, budget and
seeds. Worker processes each start one vLLM server and take runs (task x method x seed) one after the other, each
with a fresh trainer and its own adapter names; `--gpus` with `--workers` per GPU spreads them over a machine.

Per task it measures once (the first worker to need it; every run of the task is scored against the same answers):
the student's and the teacher's eval reward (base model without / with the task's context), and the base model's and
the teacher's answers to held-out prompts. Per run it trains through the loop itself (`loop._main`, as
bench/loop_bench.py does), then scores those answers under the trained student: forgetting (the base model's own
answers) and fidelity (the teacher's answers). bench/evidence_report.py writes the table and the plots.

results.json in --out is the record (bench/evidence_store.py): each finished run is added at once, under a lock, and
copied to every --export folder, so a killed or timed-out command keeps its finished runs, and running the same
command again skips them (runs that failed are retried). `--time_limit` stops the command in time to write the
report: no worker starts a run it would not finish by then (judged by its longest run so far), and the workers still
running at the limit are stopped (their runs are redone next time). A worker whose server dies starts a fresh one
(at most MAX_RESTARTS times; the dead one's log is kept as logs/vllm-wN.crashK.log) and tries the run it was in once
more, if that fits the time limit with the start-up; the failed try's row names the first error line of the server's
log. `--redo=m1,m2` drops the stored runs of these methods first (e.g. after a fix that changes them). Compiled steps
are reused across runs: a JAX compilation cache in --out/cache, shared by the workers (the first run of a method
compiles, later ones load).

Seconds: workers that share a GPU (or CPU cores) slow each other down, so "training seconds" compare methods within
one command's table, not against other machines or other worker counts. Each row records its worker and GPU.

    # CPU, reduced (SmolLM2-135M-Instruct, configs/demo.py, the CPU sizes below; one worker):
    python bench/evidence.py --tasks=tutor,ahoy --methods=rl,distill,hybrid_topk --steps=5
    # GPUs (configs/demo_gpu.py's memory shares; 2 workers a GPU: each keeps the trainer's share, the servers split
    # the rest; the GPU sizes below): all 60 runs, resumable, each call at most ~9 minutes
    python bench/evidence.py --gpus=0,1,2,3 --workers=2 --tasks=tutor,ahoy,cheers,caps --out=ev --export=$OUT \
        --time_limit=540
    python bench/evidence_report.py ev ev/results.json  # the table and plots again
    # Each arm at its own learning rate: a sweep on a tuning seed (one --out per lr), then the chosen lrs
    python bench/evidence.py --first_seed=7 --seeds=1 --set=optim.lr=1e-3 --out=sweep/lr1e-3 ...
    python bench/evidence_sweep.py sweep/lr*/results.json   # prints --lr=rl=...,distill=...
    # Any task the command line takes: --tasks=NAME (built-in, dataset, module:Class, verifiers:ID), --set its fields
    python bench/evidence.py --tasks=dataset --set=env.dataset.path=my.jsonl --methods=rl,distill_topk
BENCHMARKS.md section 6 gives the device commands in full.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

from evidence_worker import CompileCounter, WorkerServer, use_compile_cache  # noqa: E402
from evidence_args import (HELD_OUT, SHARED_GPU_KV_GIB, check, make_config, parse,  # noqa: E402
                           run_list)
from evidence_store import Store, run_key  # noqa: E402

REPORT_S = 30  # what --time_limit keeps back for the report and the export
MAX_RESTARTS = 2  # a worker's server restarts after it died (vLLM crashes are rare; a server that keeps dying ends it)

async def reference_answers(env, tokenizer, client, model: str, config) -> dict:
    """Eval reward of the student and the teacher, and their answers to the held-out prompts (token ids, with the
    student's prompt: the sequences the trained student is scored on)."""
    from ctxd_jax.evaluate import evaluate
    from ctxd_jax.inference.teacher import render_prompt

    kw = dict(max_tokens=config.sampling.max_tokens, temperature=config.sampling.temperature, seed=config.seed,
              samples=config.eval.samples)
    examples = list(env.examples("eval")[:config.eval.num_examples])
    held = list(env.examples("eval")[HELD_OUT])
    out = {"student": await evaluate(env, tokenizer, examples, client, model=model, **kw),
           "teacher": await evaluate(env, tokenizer, examples, client, model=model, context=config.teacher.context,
                                     **kw)}
    for who, context in (("base_answers", None), ("teacher_answers", config.teacher.context)):
        seqs = []
        for i, ex in enumerate(held):
            messages = env.teacher_messages(ex, context) if context else ex.messages
            comp = (await client.sample(render_prompt(tokenizer, messages), 1, model=model, seed=config.seed + i,
                                        max_tokens=config.sampling.max_tokens, logprobs=False))[0]
            seqs.append((render_prompt(tokenizer, ex.messages), list(comp.token_ids)))
        out[who] = seqs
    return out


def answer_loglik(trainer, seqs, lora) -> float:
    """Mean log-likelihood per answer token of (prompt, answer) pairs under the trainer's model with `lora`."""
    scores = trainer.score([p + c for p, c in seqs], lora=lora, starts=[len(p) for p, _ in seqs])
    total = sum(float(s.logprobs.sum()) for s in scores)
    return total / max(sum(len(c) for _, c in seqs), 1)


def curve(config) -> list[dict]:
    """Per step: cumulative training seconds (without eval), cumulative sampled tokens, eval reward when measured."""
    from ctxd_jax.metrics import read_jsonl

    points, secs, tokens = [], 0.0, 0.0
    for r in read_jsonl(os.path.join(config.output_dir, "metrics.jsonl")):
        secs += r.get("time/step", 0.0) - r.get("time/eval", 0.0)
        tokens += r.get("completion_len/mean", 0.0) * config.batch_size
        points.append({"step": r["step"], "seconds": secs, "tokens": tokens, "eval": r.get("eval/reward"),
                       "reward": r.get("reward/mean"), "completion_len": r.get("completion_len/mean")})
    return points


def run_one(config, key: str, server, refs, counter: CompileCounter) -> dict:
    from ctxd_jax import loop
    from ctxd_jax.build import load_trainer
    from ctxd_jax.inference.deploy import STUDENT_ADAPTER, on_running_server

    shutil.rmtree(config.output_dir, ignore_errors=True)  # what a stopped try of this run left
    before = dict(counter.counts)
    trainer, tokenizer = load_trainer(config)
    # Pure RL gets no teacher, so it pays for no teacher scoring (its seconds are its own). Each run's adapters get
    # names of their own: a server that served another run never serves its weights.
    deployment = on_running_server(config, server, f"{STUDENT_ADAPTER}-{key}")
    t = time.perf_counter()
    asyncio.run(loop._main(config, config.output_dir, deployment, trainer, tokenizer, threading.Event()))
    wall = time.perf_counter() - t
    jit = counter.since(before)
    kept = {f"{who}_{when}": answer_loglik(trainer, refs[who], lora)
            for who in ("base_answers", "teacher_answers")
            for when, lora in (("before", trainer.base_lora()), ("after", trainer.lora))}
    return {"curve": curve(config), "wall_s": wall, "jit": jit, "samples": first_and_last(config), **kept}


def first_and_last(config) -> dict:
    """The completions the run logged (samples.jsonl, its folder keeps them all) at its first and last step."""
    from ctxd_jax.metrics import read_jsonl

    rows = list(read_jsonl(os.path.join(config.output_dir, "samples.jsonl")))
    return {} if not rows else {"first": rows[0], "last": rows[-1]}


def work(a) -> None:
    """One worker: its server, then runs not yet done nor taken, until none is left or the deadline is near. A dead
    server is restarted (at most MAX_RESTARTS times) and the run it failed is tried once more."""
    use_compile_cache(os.path.join(a.out, "cache", "jax"))
    counter = CompileCounter()
    from ctxd_jax.envs import env_from_config
    from ctxd_jax.inference.client import Client
    from ctxd_jax.inference.deploy import BASE_NAME
    from ctxd_jax.inference.server import VLLMServer
    from transformers import AutoTokenizer

    store, tag = Store(a.out, tuple(a.export)), f"w{a.worker}"
    gpu = os.environ["CUDA_VISIBLE_DEVICES"] if a.gpus else None
    first = make_config(a, *run_list(a)[0])
    shared_gpu = ["--kv-cache-memory-bytes=%d" % (SHARED_GPU_KV_GIB << 30)] if a.gpus and a.workers > 1 else []

    def new_server():
        return VLLMServer(first.model.path, name=tag, served_name=BASE_NAME, gpu_ids=None if gpu is None else (gpu,),
                          cpu_core=None if a.gpus else a.worker % os.cpu_count(), lora_rank=first.lora.rank,
                          max_loras=first.max_async_level + 2,
                          gpu_memory_utilization=first.inference.gpu_memory_utilization,
                          kv_cache_gib=first.inference.kv_cache_gb, max_model_len=first.seq_len + 2048,
                          dtype=first.model.dtype, log_dir=os.path.join(a.out, "logs"), max_logprobs=first.loss.topk,
                          cache_dir=os.path.join(a.out, "cache", tag), extra_args=shared_gpu)
    tokenizer = AutoTokenizer.from_pretrained(first.model.path)

    def measure(task, server):
        config = make_config(a, task, run_list(a)[0][1], 42)

        async def refs():
            async with Client.for_server(server) as c:
                return await reference_answers(env_from_config(config), tokenizer, c, BASE_NAME, config)

        out = asyncio.run(refs())
        print(f"{task}: student {out['student']['reward']:.3f} teacher {out['teacher']['reward']:.3f}", flush=True)
        return out

    def late(seconds: float) -> bool:
        """Whether work of `seconds` started now would end after the deadline."""
        if a.deadline and time.time() + seconds > a.deadline:
            print(f"{tag}: stops before the time limit (it needs {seconds:.0f} s)", flush=True)
            return True
        return False

    longest, todo, retried = 0.0, run_list(a), set()
    with WorkerServer(new_server, MAX_RESTARTS, timeout=900) as ws:
        while todo:
            task, method, seed = todo.pop(0)
            key = run_key(task, method, seed)
            if late(longest):
                break
            if key not in retried and (key in store.done() or not store.claim(key)):
                continue
            if not ws.server.alive():
                if not ws.restarts_left:
                    ws.server.check_alive()  # past its restarts, a dead server ends the worker
                if late(ws.start_s + longest):
                    break
                crash = ws.restart()
                print(f"{tag}: restarted its server ({ws.restarts_left} restarts left); the dead one's log: {crash}",
                      flush=True)
            t, since = time.perf_counter(), ws.log_size()
            row = {"task": task, "method": method, "seed": seed, "worker": tag, "gpu": gpu}
            try:
                refs = store.task_refs(task, lambda: measure(task, ws.server))
                row.update(run_one(make_config(a, task, method, seed), key, ws.server, refs, counter))
            except Exception as e:  # report and go on with the other runs
                traceback.print_exc()  # the whole story, in the worker's log
                row["error"] = (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]
                row.update(ws.failure(since))
            longest = max(longest, time.perf_counter() - t)
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
            store.add_run(row)
            if "error" in row and not ws.server.alive() and key not in retried:
                retried.add(key)  # the server's death may be what failed it: once more, on a fresh server
                todo.insert(0, (task, method, seed))


def worker_envs(a) -> list[dict]:
    """The environment of each worker: its GPU (and the trainer's memory share) or the CPU."""
    from configs import demo_gpu

    if not a.gpus:
        return [dict(os.environ, CUDA_VISIBLE_DEVICES="") for _ in range(a.workers)]
    share = str(demo_gpu.get_config().trainer.gpu_memory_fraction)  # before JAX starts in the worker
    return [dict(os.environ, CUDA_VISIBLE_DEVICES=g, XLA_PYTHON_CLIENT_MEM_FRACTION=share)
            for _ in range(a.workers) for g in a.gpus.split(",")]


def coordinate(a, argv: list[str]) -> None:
    """Starts the workers, waits for them (until --time_limit), then writes the report and exports it."""
    store = Store(a.out, tuple(a.export))
    dropped = store.start({**vars(a), "gpu": bool(a.gpus)})
    if a.redo:
        print(f"--redo: dropped {dropped} stored runs of {', '.join(a.redo)}"
              + ("" if dropped else " (none, or this command resumed: its redone runs are kept)"), flush=True)
    todo = [r for r in run_list(a) if run_key(*r) not in store.done()]
    deadline = time.time() + a.time_limit - REPORT_S if a.time_limit else 0
    envs = worker_envs(a)[:len(todo)]
    print(f"{len(todo)} runs to do on {len(envs)} workers", flush=True)
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    procs = []
    for k, env in enumerate(envs):
        log = open(os.path.join(a.out, "logs", f"worker{k}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, f"--worker={k}",
                                       f"--deadline={deadline}"], env=env, stderr=log))
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 1) if deadline else None)
    except subprocess.TimeoutExpired:
        print("time limit: stopping the workers (their runs are redone next time)", flush=True)
    finally:
        for p in procs:  # a worker's server stops with it (it gets SIGTERM when its parent dies)
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    failed = [f"worker{k} exit {p.returncode}" for k, p in enumerate(procs) if p.returncode]
    print("\n".join(failed or ["workers done"]), flush=True)
    finish(a, store, len(envs))


def finish(a, store: Store, workers: int) -> None:
    """The table and plots of results.json, and the workers' log tails, in --out and every --export folder."""
    from evidence_report import report
    from ctxd_jax.inference.server import tail

    logs = os.path.join(a.out, "workers.log")
    with open(logs, "w") as f:
        for k in range(workers):
            f.write(f"==> worker{k} <==\n{tail(os.path.join(a.out, 'logs', f'worker{k}.log'), 100)}\n")
    left = [run_key(*r) for r in run_list(a) if run_key(*r) not in store.done()]
    text = report(a.out, store.path) + (f"\nnot done ({len(left)}): {' '.join(left)}" if left else "\nall runs done")
    print(text, flush=True)
    with open(os.path.join(a.out, "evidence_report.md"), "w") as f:
        f.write(text + "\n")
    pngs = [os.path.join(a.out, f"evidence_{t}.png") for t in store.read()["tasks"]]
    store.export(logs, os.path.join(a.out, "evidence_report.md"), os.path.join(a.out, "evidence_samples.md"),
                 *[p for p in pngs if os.path.exists(p)])


def main():
    argv = sys.argv[1:]
    a = parse(argv, __doc__.splitlines()[0])
    if a.worker is not None:
        return work(a)
    check(a)
    coordinate(a, argv)


if __name__ == "__main__":
    main()
