"""Context distillation against RL, measured: several post-training methods on the same context tasks, budget and
seeds, on one vLLM server started once (each run gets a fresh trainer and its own adapter names).

Per task it measures once: the student's and the teacher's eval reward (base model without / with the task's
context), and the base model's and the teacher's answers to held-out prompts. Per run (method x task x seed) it trains
through the loop itself (`loop._main`, as bench/loop_bench.py does), then scores those answers under the trained
student: forgetting (the base model's own answers) and fidelity (the teacher's answers). bench/evidence_report.py
writes the table and the plots from results.json.

    # CPU, reduced (SmolLM2-135M-Instruct, configs/demo.py, the CPU sizes below):
    python bench/evidence.py --tasks=tutor,ahoy --methods=rl,distill,hybrid_topk --steps=5
    # one GPU, full size (configs/demo_gpu.py: server and trainer share GPU 0; the GPU sizes below):
    python bench/evidence.py --gpu --tasks=tutor --out=/tmp/evidence/tutor   # one task a call: 15 runs
    python bench/evidence_report.py /tmp/evidence /tmp/evidence/*/results.json  # the table and plots of all
"""

import argparse
import asyncio
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What each method changes in the demo config (configs/demo.py: adv_tau 1, teacher/student taus 0.1, topk_tau 1).
METHODS = {
    "rl": {"loss.teacher_tau": 0.0, "loss.student_tau": 0.0, "loss.topk_tau": 0.0},
    "distill": {"loss.adv_tau": 0.0, "loss.topk_tau": 0.0, "buffer.skip_verification": True},
    "hybrid": {"loss.topk_tau": 0.0},
    "hybrid_topk": {"loss.topk_tau": 1.0},
    "trainer_teacher": {"loss.topk_tau": 1.0, "teacher.scorer": "trainer"},
}
SHARED = {"teacher.eval_baseline": False, "ckpt.interval": 0, "ckpt.resume": False, "log.tensorboard": False,
          "parity.num_prompts": 2}
# Sizes by machine (a flag given on the command line wins): CPU keeps the demo's step (~16 s on 2 idle cores).
SIZES = {"cpu": dict(seeds=1, steps=6, prompts=4, max_tokens=16, eval_every=1, eval_examples=24),
         "gpu": dict(seeds=3, steps=20, prompts=16, max_tokens=96, eval_every=2, eval_examples=96)}
HELD_OUT = slice(-16, None)  # the eval split's last prompts: answers for forgetting / fidelity (not the eval ones)


def set_path(config, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def make_config(a, task: str, method: str, seed: int):
    """The resolved config of one run (validated like the command line's)."""
    from configs import demo, demo_gpu
    from ctxd_jax.config import Gpus, resolve

    c = (demo_gpu if a.gpu else demo).get_config()
    sizes = {"max_steps": a.steps, "seed": seed, "env.name": task, "eval.interval": a.eval_every,
             "eval.num_examples": a.eval_examples, "batch_size": a.prompts * c.rollouts_per_example,
             "sampling.max_tokens": a.max_tokens, "output_dir": os.path.join(a.out, task, method, f"seed{seed}")}
    for key, value in {**SHARED, **sizes, **METHODS[method]}.items():
        set_path(c, key, value)
    gpus = Gpus((0,), (0,), (0,)) if a.gpu else Gpus()
    return resolve(c, gpus)[0]


async def reference_answers(env, tokenizer, client, model: str, config) -> dict:
    """Eval reward of the student and the teacher, and their answers to the held-out prompts (token ids, with the
    student's prompt: the sequences the trained student is scored on)."""
    from ctxd_jax.evaluate import evaluate
    from ctxd_jax.inference.teacher import render_prompt

    kw = dict(max_tokens=config.sampling.max_tokens, temperature=config.sampling.temperature, seed=config.seed)
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
                       "reward": r.get("reward/mean")})
    return points


def run_one(config, server, refs) -> dict:
    from ctxd_jax import loop
    from ctxd_jax.config import needs_teacher_scores, teacher_scorer
    from ctxd_jax.inference.deploy import BASE_NAME, STUDENT_ADAPTER, Deployment
    from ctxd_jax.inference.server import ServerGroup

    trainer, tokenizer = loop._load_trainer(config)
    scorer = teacher_scorer(config)
    # Pure RL gets no teacher, so it pays for no teacher scoring (its seconds are its own).
    teacher = server if scorer == "vllm" and needs_teacher_scores(config) else None
    deployment = Deployment(ServerGroup([]), server, teacher, STUDENT_ADAPTER, BASE_NAME if teacher else None, scorer)
    t = time.perf_counter()
    asyncio.run(loop._main(config, config.output_dir, deployment, trainer, tokenizer, threading.Event()))
    wall = time.perf_counter() - t
    kept = {f"{who}_{when}": answer_loglik(trainer, refs[who], lora)
            for who in ("base_answers", "teacher_answers")
            for when, lora in (("before", trainer.base_lora()), ("after", trainer.lora))}
    return {"curve": curve(config), "wall_s": wall, **kept}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="ahoy,tutor")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, help="seeds per cell: 42, 43, ...")
    p.add_argument("--steps", type=int)
    p.add_argument("--prompts", type=int, help="prompts a step (x the config's rollouts_per_example)")
    p.add_argument("--max_tokens", type=int)
    p.add_argument("--eval_every", type=int)
    p.add_argument("--eval_examples", type=int)
    p.add_argument("--gpu", action="store_true", help="one GPU, configs/demo_gpu.py (default: CPU, configs/demo.py)")
    p.add_argument("--out", default="/tmp/evidence")
    a = p.parse_args()
    for key, value in SIZES["gpu" if a.gpu else "cpu"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if not a.gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:  # before JAX starts: the trainer leaves the server its share of the one GPU
        from configs import demo_gpu

        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(demo_gpu.get_config().trainer.gpu_memory_fraction)
    from ctxd_jax.envs import get_env
    from ctxd_jax.inference.client import Client
    from ctxd_jax.inference.deploy import BASE_NAME
    from ctxd_jax.inference.server import ServerGroup, VLLMServer
    from transformers import AutoTokenizer

    tasks, methods = a.tasks.split(","), a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"error: --methods: unknown {unknown} (known: {', '.join(METHODS)})")
    first = make_config(a, tasks[0], methods[0], 42)
    os.makedirs(a.out, exist_ok=True)
    server = VLLMServer(first.model.path, name="student+teacher", served_name=BASE_NAME,
                        gpu_ids=(0,) if a.gpu else None, lora_rank=first.lora.rank,
                        max_loras=first.max_async_level + 2, gpu_memory_utilization=first.inference.gpu_memory_utilization,
                        kv_cache_gib=first.inference.kv_cache_gb, max_model_len=first.seq_len + 2048,
                        dtype=first.model.dtype, log_dir=a.out, max_logprobs=first.loss.topk)
    tokenizer = AutoTokenizer.from_pretrained(first.model.path)
    results = {"args": vars(a), "tasks": {}, "runs": []}
    path = os.path.join(a.out, "results.json")
    with ServerGroup([server], timeout=900):
        for task in tasks:
            config = make_config(a, task, methods[0], 42)

            async def refs_of(config=config, task=task):
                async with Client.for_server(server) as c:
                    return await reference_answers(get_env(task), tokenizer, c, BASE_NAME, config)

            refs = asyncio.run(refs_of())
            results["tasks"][task] = {k: refs[k] for k in ("student", "teacher")}
            print(f"{task}: student {refs['student']['reward']:.3f} teacher {refs['teacher']['reward']:.3f}",
                  flush=True)
            for method in methods:
                for seed in range(42, 42 + a.seeds):
                    row = {"task": task, "method": method, "seed": seed}
                    try:
                        row.update(run_one(make_config(a, task, method, seed), server, refs))
                    except Exception as e:  # report and go on with the other runs
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
                    results["runs"].append(row)
                    with open(path, "w") as f:
                        json.dump(results, f, indent=1)
    from evidence_report import report

    print(report(a.out, path))


if __name__ == "__main__":
    main()
