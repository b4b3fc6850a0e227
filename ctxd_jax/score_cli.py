"""Scores token sequences with a HF checkpoint (+ optional PEFT adapter) through the JAX model.

    python -m ctxd_jax.score_cli --model=DIR [--adapter=DIR] --input=in.jsonl --output=out.jsonl \
        [--dtype=float32|bfloat16] [--batch_tokens=8192]

Each input line is {"tokens": [ids...]}; each output line (same order) is {"logprobs": [...]} with
log p(token_t | tokens_<t) for t >= 1. Sequences are packed several to a row (segment ids) by
ctxd_jax.scoring, in a few bucketed shapes, so the model compiles a few times at most.
"""

import json

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ctxd_jax.models.hf import load_model
from ctxd_jax.scoring import score_rows_jit, score_sequences

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def score(model, seqs: list[list[int]], *, batch_tokens: int = 8192) -> list[np.ndarray]:
    """log p(token_t | tokens_<t), t >= 1, for every sequence (float32 arrays of len(seq) - 1)."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def run(rows):
        return score_rows_jit(lora, rest, rows, graphdef=graphdef, chunk_size=1024)

    return [s.logprobs for s in score_sequences(run, seqs, batch_tokens=batch_tokens)]


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
