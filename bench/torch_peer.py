"""The PyTorch peer: transformers + PEFT LoRA train step on a random Qwen3 of a real shape, bf16, SDPA.

Prints one JSON line: {"impl": "torch", "shape", "seq_len", "tokens_per_s", "step_s", "peak_gib"}.
Run by bench/trainer_bench.py in its own process (JAX and torch would fight over GPU memory in one).
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model

from shapes import LORA_TARGETS, hf_config


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="0.6b")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--checkpointing", type=int, default=1)
    a = p.parse_args()

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**hf_config(a.shape))
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=64, target_modules=LORA_TARGETS, lora_dropout=0.0))
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = torch.randint(0, cfg.vocab_size, (1, a.seq_len), device="cuda")

    def step():
        # Same objective shape as ours: per-token log-probs of the sequence, weighted (policy-gradient style).
        logits = model(input_ids=tokens).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
        loss = -(lp * 0.01).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({"impl": "torch", "shape": a.shape, "seq_len": a.seq_len, "step_s": med,
                      "tokens_per_s": a.seq_len / med, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))


if __name__ == "__main__":
    main()
