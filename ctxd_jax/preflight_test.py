"""File checks before a run starts, on a real tiny checkpoint (config.json, safetensors, byte-level BPE tokenizer)."""

import json
import os
import shutil

import pytest

from configs import demo
from ctxd_jax.config import ConfigError, resolve
from ctxd_jax.plan import Gpus
from ctxd_jax.preflight import check
from ctxd_jax.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), "qwen3")


def _check(model_dir, **overrides):
    c = demo.get_config()
    c.model.path = model_dir
    c.update_from_flattened_dict(overrides)
    config, plan, _ = resolve(c, Gpus())
    check(config, plan)


def _error(model_dir, **overrides) -> str:
    with pytest.raises(ConfigError) as e:
        _check(model_dir, **overrides)
    return str(e.value)


def test_demo_settings_pass(model_dir):
    _check(model_dir)


def test_model_folder_and_tokenizer(model_dir, tmp_path):
    assert _error(str(tmp_path / "nope")).startswith("model.path: ")
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(model_dir, broken)
    for name in os.listdir(broken):
        if name.startswith("tokenizer"):
            os.remove(broken / name)
    msg = _error(str(broken))
    assert msg.startswith("model.path: ") and "tokenizer in" in msg and str(broken) in msg
    os.remove(broken / "model.safetensors")
    assert _error(str(broken)) == f"model.path: {broken} has no *.safetensors weights"
    assert _error(model_dir, **{"teacher.model": str(tmp_path / "nope")}).startswith("teacher.model: ")


def test_topk_within_the_vocabulary(model_dir):
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    _check(model_dir, **{"loss.topk": vocab})
    assert _error(model_dir, **{"loss.topk": vocab + 1}) == f"loss.topk: {vocab + 1} is more than the model's " \
                                                            f"{vocab} tokens"


def test_longest_prompts_fit_the_servers(model_dir):
    # The servers hold seq_len + 2048 tokens (at most the tiny model's 4096): a long context does not fit.
    msg = _error(model_dir, **{"teacher.context": "Ahoy! " * 3000})
    assert msg.startswith("teacher.context: the longest teacher prompt (") and "max_model_len 2304" in msg
    msg = _error(model_dir, **{"seq_len": 4096, "sampling.max_tokens": 4090})
    assert msg.startswith("sampling.max_tokens: the longest student prompt (") and "max_model_len 4096" in msg


def test_seq_len_within_the_models_positions(model_dir):
    assert _error(model_dir, seq_len=4097).startswith("seq_len: must be in [1, 4096] (max_position_embeddings in ")
    _check(model_dir, seq_len=4096)
