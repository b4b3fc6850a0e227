import json
import os

import pytest

pytest.importorskip("gguf")
from ctxd_jax.models import smollm2  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    try:
        smollm2.gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return smollm2.ensure_smollm2(str(tmp_path_factory.mktemp("cache")))


def test_config(hf_dir):
    from ctxd_jax.models.config import ModelConfig

    c = ModelConfig.from_hf(hf_dir)
    assert (c.model_type, c.vocab_size, c.hidden_size, c.num_layers) == ("llama", 49152, 576, 30)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == (9, 3, 64, 1536)
    assert c.tie_word_embeddings and c.rope.theta == 100000.0 and c.rms_norm_eps == pytest.approx(1e-5)
    tc = json.load(open(os.path.join(hf_dir, "tokenizer_config.json")))
    assert (tc["eos_token"], tc["bos_token"], tc["add_bos_token"]) == ("<|im_end|>", "<|im_start|>", False)
    assert "<|im_start|>" in tc["chat_template"]


def test_weights_and_cache(hf_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(hf_dir, "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").shape == (576, 576)
        assert f.get_tensor("model.layers.29.self_attn.k_proj.weight").shape == (192, 576)
    assert len(keys) == 2 + 30 * 9 and "lm_head.weight" not in keys
    mtime = os.path.getmtime(os.path.join(hf_dir, "model.safetensors"))
    assert smollm2.ensure_smollm2(os.path.dirname(hf_dir)) == hf_dir  # cached: not converted again
    assert os.path.getmtime(os.path.join(hf_dir, "model.safetensors")) == mtime


def test_tokenizer_ids(hf_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    assert tok.encode("Hello world, how are you?").ids == [19556, 905, 28, 638, 359, 346, 47]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids == [1, 4093, 198, 6004, 2]
    assert tok.decode(tok.encode("naïve café 🙂\n\tcode()").ids) == "naïve café 🙂\n\tcode()"
