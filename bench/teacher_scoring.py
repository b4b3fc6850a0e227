"""Teacher scoring, trainer vs vLLM: seconds to get the teacher's log-probs (and top-k) of a batch of completions.

The teacher is the base model with the ahoy context (its worked turns repeated until the teacher prompt has at least
--prompt_tokens tokens). Completions are sampled from the base model on the student prompts. Then the same
(teacher prompt, completion) pairs are scored
- by a vLLM server (prompt_logprobs, one request per completion, as orchestrator.score_teacher sends them; a CPU
  server with LoRA enabled takes them one at a time, like the run's shared student+teacher server);
- by the JAX trainer with LoRA off (ctxd_jax.scoring.score_teacher_in_trainer; first call = compile).

    python bench/teacher_scoring.py [MODEL_DIR] [--num=16 --new_tokens=16 --topk=20 --prompt_tokens=250]
    python bench/teacher_scoring.py MODEL_DIR --gpu --dtype=bfloat16 --num=256 --new_tokens=1024

MODEL_DIR defaults to a tiny random Qwen3 (ctxd_jax/tiny.py). --gpu: server and trainer share GPU 0 (a teacher
server without LoRA, 0.45 of the memory each). Table printed last.
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def teacher_context(env, tok, example, min_tokens: int) -> str:
    """The env's context with its worked turns repeated until the teacher prompt has >= min_tokens tokens."""
    from ctxd_jax.inference.teacher import render_prompt

    _, turns = env.default_context.split("<<user>>", 1)
    context = env.default_context
    while len(render_prompt(tok, env.teacher_messages(example, context))) < min_tokens:
        context += "\n<<user>>" + turns
    return context


async def vllm_scores(client, rollouts, prompts, *, topk: int):
    from ctxd_jax.inference.teacher import score_completion

    return await asyncio.gather(*(score_completion(client, model="base", teacher_prompt_ids=prompts[r.group],
                                                   completion_ids=r.completion_ids, topk=topk) for r in rollouts))


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of the next `repeats`) in seconds."""
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times[0], statistics.median(times[1:])


def run(a, model_dir: str, log_dir: str) -> list[tuple[str, float, float]]:
    import jax.numpy as jnp
    import numpy as np
    from transformers import AutoTokenizer

    from ctxd_jax.envs import get_env
    from ctxd_jax.inference.client import Client
    from ctxd_jax.inference.server import VLLMServer
    from ctxd_jax.inference.teacher import render_prompt
    from ctxd_jax.models.hf import load_model
    from ctxd_jax.orchestrator import Sources, sample
    from ctxd_jax.scoring import score_teacher_in_trainer
    from ctxd_jax.sharding import make_mesh
    from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    env = get_env("ahoy")
    group = 4
    examples = list(env.examples("train")[:max(1, a.num // group)])
    context = teacher_context(env, tok, examples[0], a.prompt_tokens)
    prompts = [render_prompt(tok, env.teacher_messages(ex, context)) for ex in examples]
    dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    server = VLLMServer(model_dir, name="teacher-bench", served_name="base", gpu_ids=(0,) if a.gpu else None,
                        lora_rank=0 if a.gpu else 8, gpu_memory_utilization=0.45,
                        max_model_len=max(2048, 2 * a.prompt_tokens + a.new_tokens), dtype=a.dtype, kv_cache_gib=1,
                        log_dir=log_dir)
    trainer = Trainer(load_model(model_dir, lora_rank=8, lora_alpha=16.0, dtype=dtype, param_dtype=dtype),
                      make_mesh(), OptimConfig(lr=1e-3), StepConfig())
    rows = []
    with server:
        client = Client.for_server(server)
        src = Sources(env=env, tokenizer=tok, train=examples, student=client, student_model="base", teacher=None,
                      teacher_model=None, context=context, max_tokens=a.new_tokens, temperature=1.0,
                      group_size=group, prompts_per_step=len(examples), seed=0)
        rollouts = asyncio.run(sample(src, examples, list(range(len(examples))), version=0))
        for k in (a.topk, 0):
            served = []
            first, median = timed(lambda: served.append(asyncio.run(vllm_scores(client, rollouts, prompts,
                                                                                 topk=k))), a.repeats)
            rows.append((f"vLLM prompt_logprobs, top-{k}", first, median))
            first, median = timed(lambda: score_teacher_in_trainer(trainer, tok, env, examples, rollouts, context,
                                                                   topk=k), a.repeats)
            rows.append((f"trainer, LoRA off, top-{k}", first, median))
            diff = max(np.max(np.abs(np.subtract(r.teacher_logprobs, s.logprobs)), initial=0.0)
                       for r, s in zip(rollouts, served[-1]))
            print(f"top-{k}: max |trainer - vLLM| teacher log-prob {diff:.2e}", file=sys.stderr)
    # The same with no server process beside the trainer (a CPU server's idle threads may still take cores).
    first, median = timed(lambda: score_teacher_in_trainer(trainer, tok, env, examples, rollouts, context,
                                                           topk=a.topk), a.repeats)
    rows.append((f"trainer, top-{a.topk}, server stopped", first, median))
    n_tokens = sum(len(r.completion_ids) for r in rollouts)
    print(f"\n{len(rollouts)} completions ({n_tokens} tokens) after teacher prompts of {len(prompts[0])} tokens, "
          f"{model_dir}, {a.dtype}, {'GPU' if a.gpu else 'CPU'}:")
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--num", type=int, default=16, help="completions (groups of 4)")
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--prompt_tokens", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--gpu", action="store_true")
    a = p.parse_args()
    if a.gpu:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.45"  # before JAX starts: the server takes the rest
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model
        if model_dir is None:
            from ctxd_jax.tiny import write_tiny_checkpoint
            model_dir = write_tiny_checkpoint(os.path.join(tmp, "tiny"), "qwen3", std=0.1)
        rows = run(a, os.path.expanduser(model_dir), tmp)
    print(f"{'teacher scores':34s}{'first call s':>14s}{'then s':>10s}")
    for name, first, median in rows:
        print(f"{name:34s}{first:14.2f}{median:10.2f}")


if __name__ == "__main__":
    main()
