"""How much GPU memory a run's processes need, in GiB, from the model's shape: the JAX trainer's peak on one GPU
(`trainer_gib`) and what a vLLM server needs to start (`server_gib`). Pure arithmetic on a ModelConfig (read from the
model folder's config.json); ctxd_jax/config.py refuses a plan whose shares cannot hold them.

The trainer's estimate is a fit to the peaks `bench/trainer_bench.py` measured on H100s and H200s (BENCHMARKS.md
sections 1 and 4: `peak_bytes_in_use` after the steps; one row a device, log-probs in chunks of 4,096 tokens), chosen
to sit at or above every one of them and within 10 % of each (ctxd_jax/memory_test.py pins them):

    frozen weights + LoRA state + tokens x (layers x per-layer bytes + VOCAB_BYTES x vocab) + FIXED_GIB

where a token-layer keeps MLP_BYTES a unit of intermediate_size and ATTENTION_BYTES an element of q, k, v and the
attention output (under every remat policy: what the scan keeps of each layer for its backward), plus what the
policy saves besides: `save_attention` the attention kernel's inputs and outputs (SAVE_ATTENTION_BYTES an element),
`save_mlp` the gate and up products. Settings no measurement covers (no remat, the dots policy, trainer.tp > 1, all
rows at once, the full-vocabulary teacher inside the step) get no estimate (None) rather than a guess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from ctxd_jax.config import full_vocab
from ctxd_jax.models.config import ModelConfig

GIB = 2 ** 30
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
# Fitted to the measured peaks (bf16, one row a device, chunks of 4,096): bytes a token keeps, per layer...
MLP_BYTES = 2.85  # ...per unit of intermediate_size
ATTENTION_BYTES = 3.65  # ...per element of q, k, v and the attention output ((2 heads + 2 kv heads) x head_dim)
SAVE_ATTENTION_BYTES = 3.6  # ...more per such element with remat_policy save_attention
VOCAB_BYTES = 0.8  # bytes a token keeps per vocabulary entry (the LM head's share of the row)
FIXED_GIB = 0.7  # the rest: the batch, the optimizer's scalars, XLA's own buffers
# Log-prob chunks above the measured 4,096 tokens add two float32 [tokens, vocab] buffers a token (the logits and
# their gradient); smaller chunks are credited nothing (not measured).
CHUNK_MEASURED = 4096
CHUNK_BUFFERS = 2
# LoRA parameters, their gradient and Adam's two moments, counted in float32 however they are held.
LORA_STATE_BYTES = 16
# Frozen weights sharded over the data-parallel GPUs (FSDP) are all-gathered a layer at a time, the next one
# prefetched; the embedding (and an untied LM head) is gathered whole for the LM head.
GATHERED_LAYERS = 2
# vLLM beside the weights and one sequence's KV cache: the activations of its profiling run, CUDA graphs, the LoRA
# slots and the sampler's buffers (not measured; vLLM itself refuses to start without room for one sequence).
SERVER_OVERHEAD_GIB = 3.0
POLICIES = ("nothing_saveable", "save_attention", "save_mlp")  # the remat policies with an estimate


def read_shape(model_dir: str) -> ModelConfig | None:
    """The model's shape from `model_dir`/config.json; None when there is no such local file or it is not a model
    this code loads (other checks name that)."""
    try:
        with open(os.path.join(os.path.expanduser(model_dir), "config.json")) as f:
            return ModelConfig.from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _attention_width(m: ModelConfig) -> int:
    return (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim


def layer_params(m: ModelConfig) -> int:
    d = m.hidden_size
    return d * (m.num_heads + m.num_kv_heads) * m.head_dim * 2 + 3 * d * m.intermediate_size


def head_params(m: ModelConfig) -> int:
    """The embedding, and the LM head when it is not tied to it."""
    return m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)


def lora_params(m: ModelConfig, rank: int) -> int:
    d, f, q, kv = m.hidden_size, m.intermediate_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return m.num_layers * rank * (2 * (d + q) + 2 * (d + kv) + 3 * (d + f))


def weights_gib(m: ModelConfig, dtype: str, *, shards: int = 1) -> float:
    """Frozen weights held on one GPU: all of them, or (FSDP over `shards` GPUs) a 1/shards slice of the layers plus
    the gathered ones."""
    layers = layer_params(m) * (m.num_layers if shards == 1 else m.num_layers / shards + GATHERED_LAYERS)
    return (layers + head_params(m)) * DTYPE_BYTES[dtype] / GIB


def trainer_gib(m: ModelConfig, *, dtype: str, seq_len: int, rows: int, remat: bool, remat_policy: str,
                chunk_size: int, lora_rank: int, shards: int = 1) -> float | None:
    """The trainer's peak on one GPU for micro-steps of `rows` rows of `seq_len` tokens on it; `shards`: the GPUs
    the frozen weights are sharded over (1 = replicated). None where no measurement covers the settings."""
    if not remat or remat_policy not in POLICIES or rows < 1:
        return None
    scale = DTYPE_BYTES[dtype] / 2  # the fit is of bf16 activations
    width = _attention_width(m)
    layer = MLP_BYTES * m.intermediate_size + ATTENTION_BYTES * width
    if remat_policy == "save_attention":
        layer += SAVE_ATTENTION_BYTES * width
    elif remat_policy == "save_mlp":
        layer += 2 * DTYPE_BYTES[dtype] * m.intermediate_size  # gate and up
    tokens = rows * seq_len
    per_token = m.num_layers * layer * scale + VOCAB_BYTES * m.vocab_size * scale
    chunk = max(0, min(chunk_size, tokens) - CHUNK_MEASURED) * CHUNK_BUFFERS * 4 * m.vocab_size
    return (weights_gib(m, dtype, shards=shards) + lora_params(m, lora_rank) * LORA_STATE_BYTES / GIB
            + (tokens * per_token + chunk) / GIB + FIXED_GIB)


def kv_cache_gib(m: ModelConfig, dtype: str, tokens: int) -> float:
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * DTYPE_BYTES[dtype] * tokens / GIB


def server_gib(m: ModelConfig, *, dtype: str, max_model_len: int, tp: int = 1) -> float:
    """What a vLLM server needs on each of its `tp` GPUs to start: its share of the weights, the KV cache of one
    max_model_len sequence, and SERVER_OVERHEAD_GIB."""
    return (weights_gib(m, dtype) + kv_cache_gib(m, dtype, max_model_len)) / tp + SERVER_OVERHEAD_GIB


def rows_per_gpu(micro_batch_rows: int, data_parallel: int) -> int:
    """Rows a trainer GPU holds in a micro-step (0 = all rows at once: not known before packing)."""
    return math.ceil(micro_batch_rows / data_parallel) if micro_batch_rows else 0


@dataclasses.dataclass(frozen=True)
class Need:
    """What one process needs of one GPU: `gib` (None: not estimated) of its `share` (the config `field`)."""

    field: str
    who: str
    share: float
    gib: float | None
    what: str  # the settings the estimate is of


def _trainer_need(config, dp: int, remat_policy: str | None = None) -> Need:
    t, m = config.trainer, read_shape(config.model.path)
    policy, rows = remat_policy or t.remat_policy, rows_per_gpu(t.micro_batch_rows, dp)
    # full_vocab: the teacher's forward inside the step, not measured
    gib = None if m is None or t.tp > 1 or full_vocab(config) else trainer_gib(
        m, dtype=config.model.dtype, seq_len=config.seq_len, rows=rows, remat=t.remat, remat_policy=policy,
        chunk_size=t.chunk_size, lora_rank=config.lora.rank, shards=dp if t.shard_weights else 1)
    what = f"{rows or 'all'} row(s) of {config.seq_len} a micro-step, remat {policy if t.remat else 'off'}"
    return Need("trainer.gpu_memory_fraction", "trainer", t.gpu_memory_fraction, gib, what)


def _server_need(config, server, who: str) -> Need:
    from ctxd_jax.inference.deploy import max_model_len

    m, length = read_shape(server.model), max_model_len(config, server.model)
    gib = None if m is None else server_gib(m, dtype=config.model.dtype, max_model_len=length, tp=server.tp)
    return Need("inference.gpu_memory_utilization", who, config.inference.gpu_memory_utilization, gib,
                f"weights + one {length}-token sequence + overhead")


def needs(config, plan, dp: int) -> dict[int, list[Need]]:
    """Every GPU of the plan (config.gpu_users) and what each process on it needs (its share, the estimate where
    there is one; `dp` the trainer mesh's data-parallel size); each process estimated once."""
    from ctxd_jax.config import gpu_users

    users = gpu_users(config, plan)
    estimated = {server: _server_need(config, server, who)
                 for on_gpu in users.values() for who, _, server in on_gpu if server is not None}
    estimated[None] = _trainer_need(config, dp)
    return {gpu: [estimated[server] for _, _, server in on_gpu] for gpu, on_gpu in users.items()}


def suggestion(config, dp: int, need: Need, others: float, limit: float, gpu_gib: float) -> str:
    """What would fit instead of `need` refused (others: the other shares of its GPU; limit: the most they and it
    may sum to)."""
    if need.who == "trainer" and config.trainer.remat_policy != "nothing_saveable":
        least = _trainer_need(config, dp, "nothing_saveable").gib
        if least is not None and least <= need.share * gpu_gib:
            return f"trainer.remat_policy=nothing_saveable fits (~{least:.1f} GiB)"
    share = math.ceil(need.gib / gpu_gib * 100) / 100
    if share + others <= limit + 1e-9:
        return f"{need.field}={share:g} fits beside the GPU's other shares ({others:g})"
    rest = ("a shorter seq_len, fewer trainer.micro_batch_rows, or trainer.shard_weights over more trainer GPUs"
            if need.who == "trainer" else "give the server GPUs of its own, or more of them (inference.parallel.tp)")
    if share > limit:
        return f"that is more than the GPU can give ({limit:g}); {rest}"
    return f"it needs {need.field} >= {share:g}, leaving {limit - share:.2f} for the GPU's other shares; {rest}"
