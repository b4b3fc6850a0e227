"""The trainer a config describes: the model loaded onto its mesh with LoRA, the optimizer and the step settings."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from ctxd_jax.config import full_vocab
from ctxd_jax.optim import OptimConfig
from ctxd_jax.trainer import LOSS_KEYS, StepConfig, Trainer


def optim_config(config) -> OptimConfig:
    o = config.optim
    return OptimConfig(lr=o.lr, max_norm=o.max_norm, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                       warmup_steps=o.warmup_steps, schedule=o.schedule, total_steps=max(config.max_steps, 1))


def step_config(config) -> StepConfig:
    loss, t = config.loss, config.trainer
    return StepConfig(teacher_tau=loss.teacher_tau, student_tau=loss.student_tau,
                      use_full_reward_baseline=config.advantage.use_full_reward_baseline,
                      topk_tau=loss.topk_tau, topk_direction=loss.topk_direction, ratio_type=loss.ratio_type,
                      masks=tuple((k, float(loss[k])) for k in LOSS_KEYS),
                      micro_batch_rows=t.micro_batch_rows, chunk_size=t.chunk_size,
                      full_vocab=full_vocab(config), jsd_beta=loss.jsd_beta, teacher_lora=config.teacher.lora,
                      ema_decay=config.teacher.ema_decay)


def load_trainer(config):
    """(Trainer, tokenizer) of `config`: the model loaded onto the trainer's mesh, with LoRA, the optimizer and the
    step settings."""
    from transformers import AutoTokenizer

    from ctxd_jax.models.hf import load_model
    from ctxd_jax.sharding import make_mesh

    path = os.path.expanduser(config.model.path)
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    mesh = make_mesh(tp=config.trainer.tp)
    model = load_model(path, lora_rank=config.lora.rank, lora_alpha=config.lora.alpha, dtype=dtype, param_dtype=dtype,
                       mesh=mesh, seed=config.seed, remat=config.trainer.remat,
                       remat_policy=config.trainer.remat_policy, attn_impl=_attn_impl(config.trainer.attn_impl),
                       shard_weights=config.trainer.shard_weights)
    return Trainer(model, mesh, optim_config(config), step_config(config)), AutoTokenizer.from_pretrained(path)


def _attn_impl(name: str) -> str | None:
    if name == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else None
    return None if name == "xla" else name
