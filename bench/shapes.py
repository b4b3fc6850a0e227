"""Real Qwen3 shapes (from the published config.json files) and the FLOP count the benchmarks report."""

QWEN3 = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=6144, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=9728, tie_word_embeddings=True),
    # Not a real model: a few-second CPU check of the benchmark's code paths (e.g. --scaling on fake devices).
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=256, tie_word_embeddings=True, vocab_size=512),
}
COMMON = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_act="silu",
              max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=False,
              torch_dtype="bfloat16")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H100_BF16_PEAK = 989e12  # dense bf16 datasheet peak, the denominator of the reference's MFU


def hf_config(shape: str) -> dict:
    return dict(COMMON, **QWEN3[shape])


def write_random_checkpoint(shape: str, path: str) -> str:
    """A random HF checkpoint of a real shape (a 1,024-token vocabulary inside the real embedding size), written once:
    under a lock, into a scratch folder renamed into place, so runs started together never read a half-written one."""
    import fcntl
    import os
    import shutil

    from ctxd_jax.tiny import write_tiny_checkpoint

    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(path, "model.safetensors")):
            return path
        shutil.rmtree(path, ignore_errors=True)  # a partial folder of a killed writer
        tmp = f"{path}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        c = QWEN3[shape]
        write_tiny_checkpoint(tmp, "qwen3_tied", hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                              num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                              head_dim=c["head_dim"], intermediate_size=c["intermediate_size"], vocab_size=1024,
                              model_vocab_size=c.get("vocab_size", COMMON["vocab_size"]))
        os.rename(tmp, path)
    return path


def non_embedding_params(shape: str) -> int:
    c = QWEN3[shape]
    d, hd, f = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    attn = d * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) + 2 * hd
    return c["num_hidden_layers"] * (attn + 3 * d * f + 2 * d)


def flops_per_token(shape: str, seq_len: int) -> float:
    """The reference's MFU convention: 6·N (N without embeddings, plus the LM head matmul) + causal attention
    fwd+bwd (6·L·Hq·hd·T: QKᵀ and AV, halved for causality, ×3 for backward). With frozen base weights the
    real work is lower (no weight gradients: ~4·N), so this overstates LoRA MFU the same way the reference does."""
    c = QWEN3[shape]
    lm_head = c["hidden_size"] * c.get("vocab_size", COMMON["vocab_size"])
    attn = 6 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"] * seq_len
    return 6 * (non_embedding_params(shape) + lm_head) + attn


if __name__ == "__main__":  # python bench/shapes.py SHAPE PATH: write the random checkpoint ahead of a benchmark
    import sys

    write_random_checkpoint(*sys.argv[1:3])
