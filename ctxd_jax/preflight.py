"""Checks of what a run reads, before any process starts: the model folders and their tokenizers, the teacher's top-k
against the vocabulary, and the longest prompts against the servers' context length.

`ctxd_jax/config.py` checks the config alone (a dry run); these need the files. Each failure is a
`ConfigError("field: message")`, so the command line prints one line and starts nothing.
"""

from __future__ import annotations

import glob
import json
import os

from ctxd_jax import envs
from ctxd_jax.config import ConfigError, needs_teacher_scores
from ctxd_jax.plan import Plan
from ctxd_jax.inference.deploy import max_model_len, teacher_topk

# Prompts rendered per split to find the longest (Sokoban's 15,000 are built on demand; its prompts differ only in a
# grid of at most max_h x max_w cells, so the first few hundred hold its sizes).
CHECKED_PER_SPLIT = 256
# One of these makes a folder's tokenizer (fast, SentencePiece, or byte-level BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check(config, plan: Plan) -> None:
    """Raises ConfigError on the first problem; `config` is resolved (ctxd_jax.config.resolve)."""
    tokenizer, model_config = load_model_files("model.path", config.model.path)
    check_positions(config.seq_len, model_config, config.model.path)
    if config.teacher.model:
        check_positions(config.seq_len, load_model_files("teacher.model", config.teacher.model)[1],
                        config.teacher.model)
    topk = teacher_topk(config)
    vocab = model_config.get("vocab_size")
    if vocab and topk > vocab:
        raise ConfigError(f"loss.topk: {topk} is more than the model's {vocab} tokens")
    check_lengths(config, plan, tokenizer)


def check_positions(seq_len: int, model_config: dict, path: str) -> None:
    """A training row of seq_len tokens fits the positions the model was built for."""
    limit = model_config.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"seq_len: must be in [1, {limit}] (max_position_embeddings in {path}/config.json), "
                          f"got {seq_len}")


def load_model_files(field: str, path: str):
    """(tokenizer, config.json as a dict) of the local Hugging Face folder `path`."""
    if not os.path.isdir(path):
        raise ConfigError(f"{field}: {path!r} is not a folder (give a local Hugging Face model folder: config.json, "
                          "safetensors weights, tokenizer)")
    try:
        with open(os.path.join(path, "config.json")) as f:
            model_config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: {path} has no readable config.json ({e})") from e
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise ConfigError(f"{field}: {path} has no *.safetensors weights")
    from ctxd_jax.models.hf import check_files

    try:
        check_files(path)
    except ValueError as e:
        raise ConfigError(f"{field}: {' '.join(str(e).split())}") from e
    if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ConfigError(f"{field}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise ConfigError(f"{field}: no usable tokenizer in {path} ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from e
    if not getattr(tokenizer, "chat_template", None):  # prompts are rendered with it
        raise ConfigError(f"{field}: the tokenizer in {path} has no chat template")
    return tokenizer, model_config


def check_lengths(config, plan: Plan, tokenizer) -> None:
    """Every request fits its server's max_model_len: the student's prompt + sampling.max_tokens, and the teacher's
    prompt (its context in place of the student's system message) + the completion + the one token vLLM generates."""
    from ctxd_jax.inference.teacher import render_prompt, teacher_prompt_ids

    from transformers.utils import logging

    env = envs.env_from_config(config)
    longest_student, longest_teacher = 0, 0
    # Who scores teacher prompts: a teacher server, or the trainer (the base model, within the same length).
    trainer_teacher = plan.teacher_scorer == "trainer" and needs_teacher_scores(config)
    teacher_model = plan.teacher.model if plan.teacher is not None else config.model.path if trainer_teacher else None
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a prompt over the tokenizer's model_max_length is what this checks, not a warning
    try:
        for split in ("train", "eval"):
            for example in env.examples(split)[:CHECKED_PER_SPLIT]:
                student = render_prompt(tokenizer, example.messages)
                longest_student = max(longest_student, len(student))
                if teacher_model is not None:
                    teacher = teacher_prompt_ids(tokenizer, env, example, config.teacher.context, student)
                    longest_teacher = max(longest_teacher, len(teacher))
    finally:
        logging.set_verbosity(verbosity)
    new = config.sampling.max_tokens
    limit = max_model_len(config, plan.student.model)
    if longest_student + new > limit:
        raise ConfigError(f"sampling.max_tokens: the longest student prompt ({longest_student} tokens) + {new} new "
                          f"tokens > the server's max_model_len {limit} (seq_len + margin, at most the model's "
                          "max_position_embeddings); lower sampling.max_tokens")
    if teacher_model is not None:
        limit = max_model_len(config, teacher_model)
        if longest_teacher + new + 1 > limit:
            raise ConfigError(
                f"teacher.context: the longest teacher prompt ({longest_teacher} tokens with the context) + {new} "
                f"completion tokens + 1 > the teacher server's max_model_len {limit} (seq_len + margin, at most the "
                "model's max_position_embeddings); shorten the context or lower sampling.max_tokens")
