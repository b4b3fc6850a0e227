"""Scores token sequences with a HF checkpoint (+ optional PEFT adapter) through the JAX model.

    python -m ctxd_jax.score --model=DIR [--adapter=DIR] --input=in.jsonl --output=out.jsonl \
        [--dtype=float32|bfloat16] [--batch_tokens=8192]

Each input line is {"tokens": [ids...]}; each output line (same order) is {"logprobs": [...]} with
log p(token_t | tokens_<t) for t >= 1. Sequences are packed several to a row (segment ids), in one fixed batch
shape, so the model compiles once.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ctxd_jax.models.hf import load_model
from ctxd_jax.models.logprobs import token_logprobs
from ctxd_jax.packing import first_fit_decreasing

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIN_ROW = 128


def read_sequences(path: str) -> list[list[int]]:
    seqs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tokens = json.loads(line)["tokens"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'tokens' list ({e})") from e
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
                raise ValueError(f"{path}:{n}: 'tokens' must be a non-empty list of ints")
            seqs.append(tokens)
    return seqs


def batch_shape(lengths: list[int], batch_tokens: int) -> tuple[int, int]:
    """(rows per call, row length): rows fit the longest sequence (a power of two >= MIN_ROW), and at most as many
    rows as `batch_tokens` allows."""
    row = max(MIN_ROW, 1 << (max(lengths) - 1).bit_length())
    return max(1, batch_tokens // row), row


@nnx.jit
def _score_rows(model, tokens, positions, segment_ids):
    logprobs, _ = token_logprobs(model, tokens, positions, segment_ids, jnp.ones(tokens.shape, jnp.float32))
    return logprobs


def score(model, seqs: list[list[int]], *, batch_tokens: int = 8192) -> list[np.ndarray]:
    """log p(token_t | tokens_<t), t >= 1, for every sequence (float32 arrays of len(seq) - 1)."""
    if not seqs:
        return []
    lengths = [len(s) for s in seqs]
    rows_per_call, row_len = batch_shape(lengths, batch_tokens)
    rows = first_fit_decreasing(lengths, row_len)
    rows_per_call = min(rows_per_call, len(rows))  # no all-padding rows when everything fits in one call
    out: list[np.ndarray | None] = [None] * len(seqs)
    for start in range(0, len(rows), rows_per_call):
        group = rows[start:start + rows_per_call]
        tokens = np.zeros((rows_per_call, row_len), np.int32)
        positions = np.zeros_like(tokens)
        segments = np.zeros_like(tokens)
        spans = []
        for r, row in enumerate(group):
            offset = 0
            for seg, i in enumerate(row, 1):
                n = lengths[i]
                tokens[r, offset:offset + n] = seqs[i]
                positions[r, offset:offset + n] = np.arange(n)
                segments[r, offset:offset + n] = seg
                spans.append((i, r, offset, n))
                offset += n
        logprobs = np.asarray(jax.device_get(_score_rows(model, tokens, positions, segments)))
        for i, r, offset, n in spans:
            out[i] = logprobs[r, offset + 1:offset + n]
    return out


FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Hugging Face checkpoint folder.")
flags.DEFINE_string("adapter", None, "PEFT LoRA adapter folder (optional).")
flags.DEFINE_string("input", None, "JSONL with {\"tokens\": [...]} per line.")
flags.DEFINE_string("output", None, "JSONL written with {\"logprobs\": [...]} per line.")
flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute and parameter dtype.")
flags.DEFINE_integer("batch_tokens", 8192, "Tokens per forward call (rows x row length).")


def main(argv):
    del argv
    dtype = DTYPES[FLAGS.dtype]
    model = load_model(FLAGS.model, adapter_dir=FLAGS.adapter, dtype=dtype, param_dtype=dtype)
    results = score(model, read_sequences(FLAGS.input), batch_tokens=FLAGS.batch_tokens)
    with open(FLAGS.output, "w") as f:
        for lp in results:
            f.write(json.dumps({"logprobs": [float(x) for x in lp]}) + "\n")


if __name__ == "__main__":
    flags.mark_flags_as_required(["model", "input", "output"])
    app.run(main)
