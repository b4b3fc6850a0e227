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
    assert msg == f"model.path: {broken} has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json)"
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


def _copy(model_dir, tmp_path, name):
    broken = tmp_path / name
    shutil.copytree(model_dir, broken)
    return broken


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_broken_weights_are_refused_from_their_headers(model_dir, tmp_path):
    weights = os.path.join(model_dir, "model.safetensors")
    unsupported = _copy(model_dir, tmp_path, "gpt2")
    _edit_config(unsupported, model_type="gpt2")
    assert "model_type 'gpt2' is not supported" in _error(str(unsupported))
    truncated = _copy(model_dir, tmp_path, "truncated")
    with open(weights, "rb") as f:
        (truncated / "model.safetensors").write_bytes(f.read()[:4096])
    assert _error(str(truncated)).startswith(f"model.path: {truncated}/model.safetensors: cannot be read ")
    shards = _copy(model_dir, tmp_path, "shards")
    os.rename(shards / "model.safetensors", shards / "model-00001-of-00002.safetensors")
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    assert _error(str(shards)) == (f"model.path: {shards}/model-00002-of-00002.safetensors: missing (named in "
                                   "model.safetensors.index.json)")
    wrong = _copy(model_dir, tmp_path, "wrong-shape")
    _edit_config(wrong, intermediate_size=json.loads((wrong / "config.json").read_text())["intermediate_size"] + 8)
    msg = _error(str(wrong))
    assert msg.startswith(f"model.path: {wrong}/model.safetensors: tensor 'model.layers.0.mlp.") and "config.json gives" \
        in msg


def test_teacher_context_too_long_for_the_trainer_scorer(model_dir):
    msg = _error(model_dir, **{"teacher.context": "Ahoy! " * 3000, "teacher.scorer": "trainer"})
    assert msg.startswith("teacher.context: the longest teacher prompt (")
