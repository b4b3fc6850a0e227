"""The start-up gate: vLLM and the trainer must give the same log-probs to the same samples before training starts
(a wrong model folder, tokenizer, chat template or dtype shows up here, not as a slowly diverging run)."""

from __future__ import annotations

import asyncio
import dataclasses
import sys

import numpy as np

from ctxd_jax import distributed
from ctxd_jax import orchestrator as orch
from ctxd_jax.packing import pack
from ctxd_jax.trainer import Trainer, mismatch_kl


class ParityError(RuntimeError):
    pass


async def parity_gate(config, src: orch.Sources, trainer: Trainer, model: str, version: int) -> float:
    """Samples a few completions and scores them with the trainer; stops the run if the mismatch KL is too big."""
    n = config.parity.num_prompts
    if n <= 0:
        return 0.0
    examples = list(src.env.examples("eval")[:n]) or list(src.train[:n])
    one = dataclasses.replace(src, group_size=1)
    # Several processes: each checks its own server on the same prompts, and all stop if one is off.
    rollouts = await orch.sample(one, examples, [config.seed + i for i in range(len(examples))], model=model,
                                 version=version)
    batch, _ = pack(rollouts, np.zeros(len(rollouts)), seq_len=config.seq_len, row_multiple=trainer.local_row_multiple)
    logprobs = await asyncio.to_thread(lambda: trainer.logprobs(trainer.local(batch))[:len(batch.tokens)])
    kl = mismatch_kl(logprobs, batch.sampling_logprobs, batch.loss_mask)
    kl = await asyncio.to_thread(lambda: float(distributed.gather(kl).max()))
    bound = config.parity.max_mismatch_kl
    print(f"parity gate: mismatch KL between vLLM and the trainer {kl:.2e} (bound {bound:.0e})", file=sys.stderr)
    if not kl <= bound:
        raise ParityError(
            f"parity.max_mismatch_kl: vLLM's and the trainer's log-probs of the same {len(rollouts)} samples differ "
            f"(mismatch KL {kl:.3g} > {bound:.3g}); check the model folder, tokenizer/chat template and model.dtype")
    return kl
