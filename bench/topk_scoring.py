"""The trainer's teacher top-k: scored positions only (now) against every position of the row (before), one process.

Teacher-shaped sequences (a long prompt, then the completion whose log-probs and top-k are wanted) are scored by
`Trainer.score` with LoRA off, as `score_teacher_in_trainer` does, two ways on the same packed rows:
- `every position`: LM head, softmax and top-k at every position, [rows, T, k] to the host, kept where scored, then
  the top-k turned into Python lists for the rollouts and back to arrays by pack (the path before);
- `scored only`: LM head, softmax and top-k at the completion's positions only, calls dispatched before results are
  fetched, the top-k kept as arrays (ctxd_jax.scoring now).
Both give the same numbers (checked here too). Median seconds of --repeats calls after a compiling one.

    python bench/topk_scoring.py [--num=32 --prompt_tokens=320 --new_tokens=256 --vocab=32768 --topk=20]
    python bench/topk_scoring.py --gpu --num=256 --prompt_tokens=1300 --new_tokens=1024 --shape=0.6b

CPU by default (a tiny random Qwen3 with a --vocab-wide head); --gpu with --shape, a real Qwen3 shape (random
weights, vocab 151936, bfloat16).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num", type=int, default=32, help="sequences a batch")
    p.add_argument("--prompt_tokens", type=int, default=320)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32768, help="the tiny model's head width (CPU)")
    p.add_argument("--layers", type=int, default=2, help="the tiny model's layers (CPU)")
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--shape", default="0.6b", help="with --gpu: a bench/shapes.py Qwen3 shape")
    a = p.parse_args()
    if not a.gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp
    import numpy as np

    from teacher_scoring import timed

    from ctxd_jax.models.hf import load_model
    from ctxd_jax.packing import pack
    from ctxd_jax.records import Rollout
    from ctxd_jax.scoring import every_position, score_rows_jit, score_sequences
    from ctxd_jax.sharding import make_mesh
    from ctxd_jax.tiny import write_tiny_checkpoint
    from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer

    folder = tempfile.mkdtemp(prefix="topk_scoring_")
    if a.gpu:
        from shapes import write_random_checkpoint

        write_random_checkpoint(a.shape, folder)
        dtype = jnp.bfloat16
    else:
        write_tiny_checkpoint(folder, "qwen3_tied", model_vocab_size=a.vocab, num_layers=a.layers)
        dtype = jnp.float32
    model = load_model(folder, lora_rank=8, lora_alpha=16.0, dtype=dtype, param_dtype=dtype)
    trainer = Trainer(model, make_mesh(), OptimConfig(lr=1e-3), StepConfig(chunk_size=1024))
    vocab = trainer.model().lm_head_kernel().shape[1]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, a.prompt_tokens + int(rng.integers(0, 16))).tolist() for _ in range(a.num)]
    completions = [rng.integers(3, vocab, int(rng.integers(a.new_tokens // 2, a.new_tokens + 1))).tolist()
                   for _ in range(a.num)]
    seqs = [pp + c for pp, c in zip(prompts, completions)]
    starts = [len(pp) for pp in prompts]
    lora = trainer.base_lora()

    def then_pack(scores, as_lists: bool):
        """Rollouts carrying the top-k as the teacher scorer leaves them, packed as the train step reads them."""
        rollouts = [Rollout(example_id=str(i), group=i, prompt_ids=pp, completion_ids=c, sampling_logprobs=[0.0] * len(c),
                            finish_reason="length", teacher_logprobs=s.logprobs.tolist(),
                            teacher_topk_ids=s.topk_ids.tolist() if as_lists else s.topk_ids,
                            teacher_topk_logprobs=s.topk_logprobs.tolist() if as_lists else s.topk_logprobs)
                    for i, (pp, c, s) in enumerate(zip(prompts, completions, scores))]
        return pack(rollouts, np.zeros(len(rollouts)), seq_len=max(map(len, seqs)), topk=a.topk)

    def before():
        run = lambda rows: score_rows_jit(lora, trainer.rest, rows, graphdef=trainer.graphdef, chunk_size=1024,
                                          topk=a.topk)
        return score_sequences(every_position(run), seqs, starts=starts, batch_tokens=16384)

    def now():
        return trainer.score(seqs, lora=lora, starts=starts, topk=a.topk)

    old, new = before(), now()
    for o, n in zip(old, new):
        np.testing.assert_array_equal(o.topk_ids, n.topk_ids)
        np.testing.assert_allclose(o.topk_logprobs, n.topk_logprobs, atol=1e-4 if a.gpu else 1e-6)
    rows = [("every position (before)", *timed(before, a.repeats)), ("scored only (now)", *timed(now, a.repeats)),
            ("every position + lists + pack", *timed(lambda: then_pack(before(), True), a.repeats)),
            ("scored only + arrays + pack", *timed(lambda: then_pack(now(), False), a.repeats))]
    tokens = sum(map(len, seqs))
    print(f"\n{a.num} sequences, {tokens} tokens, {tokens - sum(starts)} scored, vocab {vocab}, top-{a.topk}, "
          f"{'GPU ' + a.shape if a.gpu else f'CPU, {a.layers} layers'}; seconds (first call compiles)")
    print(f"{'':32s} {'first':>8s} {'median':>8s} {'vs before':>9s}")
    for i, (label, first, med) in enumerate(rows):
        base = rows[i - i % 2][2]
        print(f"{label:32s} {first:8.2f} {med:8.2f} {med / base:9.2f}")


if __name__ == "__main__":
    main()
