"""The reference run: Qwen3-4B-Instruct-2507 on Sokoban, context-distilled with the reference's rl.toml settings.

Every argument of the reference (docs/reference.md, "Arguments") sits here at its value in the reference run;
the rest are what the loop needs. Override any field on the command line, e.g.
`python -m ctxd_jax.train --config=configs/rl.py --config.loss.teacher_tau=0.01`. The config is locked: an unknown
key is an error, not a silent new field. Derived values (inferred dp, number of train workers, the process plan) are
not stored here: ctxd_jax/config.py computes them from this and the GPU id flags.
"""

import ml_collections
from ml_collections import config_dict

from ctxd_jax.config import env_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # A local Hugging Face folder (config.json, safetensors, tokenizer): these machines reach no model hub, so
    # download Qwen/Qwen3-4B-Instruct-2507 once and point this at the folder.
    c.model = dict(path="Qwen/Qwen3-4B-Instruct-2507", dtype="bfloat16")
    c.seq_len = 16884
    c.max_steps = 400
    # Sampling of batch n+1 overlaps training on batch n; importance ratios correct the lag.
    c.max_async_level = 1
    c.seed = 42
    c.output_dir = "outputs/rl"

    # Total samples per step, and the group size of the advantage baseline.
    c.batch_size = 256
    c.rollouts_per_example = 16
    # logprobs: who computes each sampled token's behaviour log-prob (the importance ratios' denominator). 'trainer'
    # scores the batch with the sampling version's LoRA in the trainer, so vLLM samples without per-token log-probs
    # (0.93-0.95x its base-model speed through an adapter, against 0.60-0.65x with them; BENCHMARKS.md); one group a
    # batch still brings vLLM's, for the mismatch_kl/vllm metric. 'vllm' asks the sampling server for them.
    c.sampling = dict(max_tokens=8192, temperature=1.0, logprobs="trainer")

    # reward = adv_tau * task + teacher_tau * sum(lp_teacher) - student_tau * sum(lp_student).
    # The only copy of the taus.
    c.loss = dict(
        adv_tau=1.0,
        teacher_tau=1.0,
        student_tau=1.0,
        # Top-k distillation on the teacher's top-k log-probs (0 = off); topk is k, 0 = the full vocabulary (exact:
        # the trainer runs the teacher inside the train step; needs the trainer to score the teacher).
        topk_tau=0.0,
        topk=20,
        # forward: KL(teacher || student) on the top-k support; reverse: KL(student || teacher); jsd: GKD's
        # generalised Jensen-Shannon divergence with weight jsd_beta in (0, 1) on the teacher.
        topk_direction="forward",
        jsd_beta=0.5,
        # Importance-ratio masks: a token outside [low, high] is dropped; geo/sequence drop the whole sample.
        token_mask_low=0.125,
        token_mask_high=8.0,
        geo_mask_low=0.1,
        geo_mask_high=10.0,
        sequence_mask_low=0.0,
        sequence_mask_high=100.0,
        # 'token': one importance ratio per token; 'sequence' (GSPO-like): one per sample, exp(sum of its log-ratios)
        # capped at sequence_clip_high, and each sample's loss divided by its loss-token count.
        ratio_type="token",
        sequence_clip_high=10.0,
        kl_tau=0.0,  # weight of the trainer-vs-sampler KL penalty: each token's coefficient gets -kl_tau * log ratio
    )
    # length_weighted_mean: group baseline sum(R * L) / sum(L), L the completion lengths, instead of the plain mean.
    # kl_normalize: 'sum' (the reference) adds each sample's summed log-probs to its reward, so every token costs KL;
    # 'mean' divides them by its completion length (per-token rates: no reward for short answers).
    c.advantage = dict(use_full_reward_baseline=True, kl_only_incorrect=False, length_weighted_mean=False,
                       kl_normalize="sum")
    # skip_verification: reward 0 for every sample, verifier not run (pure distillation).
    c.buffer = dict(skip_verification=False)

    # context: the teacher's system message (replaces the student's); unset = the environment's own context (for
    # Sokoban our guide); '' = the teacher sees the student's prompt.
    # model: the teacher's HF folder; '' = the student's base model (then one server can serve both).
    # scorer: who computes the teacher's log-probs: 'trainer' (the base model is the teacher: the trainer scores it
    # with LoRA off, no teacher server), 'vllm' (a teacher server's prompt_logprobs), 'auto' (trainer when it can).
    # lora (trainer-scored teacher only): 'off' = the base model; 'live' = the student's LoRA (with the teacher's
    # context: self-distillation); 'ema' = an exponential moving average of the student's LoRA, updated after every
    # step with weight ema_decay on the old average (kept in checkpoints). Either scores a batch when it is trained,
    # with the LoRA being trained (not while the batch is sampled, as the fixed base model can).
    c.teacher = dict(context=config_dict.placeholder(str), eval_baseline=True, model="", scorer="auto", lora="off",
                     ema_decay=0.99)
    # name picks the environment; env.<name> holds its keyword arguments at its own defaults (Sokoban's are the
    # reference run's puzzle and split sizes), e.g. --config.env.name=ahoy --config.env.ahoy.num_eval=32.
    c.env = env_config("sokoban")
    # A reward function that raises or returns no finite number: 'stop' the run (one line naming the example; the
    # checkpoints are kept) or score it 'zero' and count it in the reward/errors metric (ctxd_jax/rewards.py).
    c.env.reward_errors = "stop"
    # env.name=verifiers:ENV_ID (a `verifiers` 0.4 taskset; its config fields are env.args.*): the task field, or
    # FIELD.KEY of a dict field, that is each example's own teacher context ('' = none); eval_fraction: the seeded share
    # of its tasks held out for eval (disjoint from train; 0 = no eval).
    c.env.verifiers = dict(context_key="", eval_fraction=0.1)

    c.optim = dict(
        lr=1e-5, max_norm=1.0, weight_decay=0.0, b1=0.85, b2=0.9, warmup_steps=0,
        schedule="constant",  # constant | linear | cosine (decay to 0 at max_steps, after warmup)
        # A step whose loss or gradient is not finite is skipped (no update); this many in a row stop the run.
        max_nonfinite_steps=3,
    )
    c.lora = dict(
        rank=16, alpha=64.0,
        # The reference's target modules; the only set built (ctxd_jax/config.py refuses any other).
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    # How new weights reach the student server: 'adapter' (PEFT folder + /v1/load_lora_adapter) or 'merged'
    # (W + scale * B @ A written as a full checkpoint and reloaded).
    c.weights = dict(mode="adapter")
    c.trainer = dict(
        tp=1,  # tensor parallelism of the trainer mesh; the rest of the trainer GPUs is data parallel (fsdp)
        remat=True,  # recompute each layer's activations in the backward pass (the reference: checkpointing freq 1)
        micro_batch_rows=1,  # rows of seq_len per gradient-accumulation micro-step, at least one per device; 0 = all
        chunk_size=1024,  # tokens per chunk of the LM head when computing log-probs (never [tokens, vocab] at once)
        # nothing_saveable | save_attention (keep attention's inputs/outputs: fastest on GPU, more memory) | save_mlp
        remat_policy="save_attention",
        attn_impl="auto",  # auto: cuDNN's packed flash attention on GPU, XLA with a dense mask on CPU | xla | cudnn
        # Share of each trainer GPU that JAX may take (XLA_PYTHON_CLIENT_MEM_FRACTION). Where the trainer shares a GPU
        # with vLLM, this plus the servers' gpu_memory_utilization must stay <= 1.
        gpu_memory_fraction=0.9,
        # Shard the frozen base weights over the data-parallel GPUs too (FSDP: least memory). False replicates them,
        # so only the LoRA gradients cross GPUs: faster where the base model fits on each trainer GPU.
        shard_weights=False,
        # CUDA MPS where a server shares the trainer's one GPU, so the GPU runs both processes' kernels side by side
        # instead of taking turns: auto (where the machine allows it; else one line says so), on (required), off.
        mps="auto",
    )

    c.inference = dict(
        # dp: None = inferred as len(inference_gpu_ids) / tp.
        parallel=dict(dp=config_dict.placeholder(int), tp=1),
        gpu_memory_utilization=0.9,
        # uds: each server listens on a Unix socket in a folder only this user can open (vLLM's dev endpoints take
        # no key); tcp: 127.0.0.1:port, for layouts that need a network address (BUILD.md).
        transport="uds",
        port=8000,  # tcp only; the teacher's own server, when there is one, takes port + 1
        api_key="",  # '' = a random key per run
        kv_cache_gb=4,  # CPU only: VLLM_CPU_KVCACHE_SPACE
    )
    # Startup gate: stop before training if vLLM's and the trainer's log-probs of the same samples disagree.
    c.parity = dict(max_mismatch_kl=1e-2, num_prompts=4)

    # samples: samples a prompt at each eval (more = a less noisy reading of the same prompts)
    c.eval = dict(interval=1000, num_examples=1024, samples=1)
    # A run folder (output_dir) that holds a run is never reused silently: resume=True continues it (from its latest
    # checkpoint, refusing a config that changes what the saved state depends on); overwrite=True deletes it first.
    # resume_step: resume from this checkpoint instead of the latest (one that cannot be read is refused, naming the
    # earlier one); later checkpoints are set aside as checkpoints/unused-<step>, not deleted.
    c.ckpt = dict(interval=50, resume=False, overwrite=False, keep=2, resume_step=config_dict.placeholder(int))
    # wandb: W&B project name, '' = off (pip install '.[wandb]'); wandb_entity: its team or user, '' = W&B's default;
    # run_name: the W&B run's display name, '' = W&B's random one. A resumed run continues the same W&B run.
    c.log = dict(tensorboard=True, wandb="", wandb_entity="", run_name="")

    c.lock()
    return c
