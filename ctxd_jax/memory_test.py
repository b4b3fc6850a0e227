import json

import pytest

from bench.shapes import hf_config
from ctxd_jax import memory
from ctxd_jax.config import ConfigError, resolve, validate
from ctxd_jax.config_test import _config
from ctxd_jax.models.config import ModelConfig
from ctxd_jax.plan import Gpus, gpu_memory_mib

SHAPES = {name: ModelConfig.from_dict(hf_config(name)) for name in ("0.6b", "1.7b", "4b")}

# Peaks `bench/trainer_bench.py` printed (peak_bytes_in_use, GiB; bf16, LoRA r16, one row of seq tokens a GPU,
# log-prob chunks of 4,096): (shape, seq, remat policy, GPUs the frozen weights are sharded over, GiB, where).
MEASURED = [
    ("0.6b", 4096, "save_attention", 1, 8.0, "BENCHMARKS.md §1 table, 1×H100, dd0d95d"),
    ("0.6b", 16384, "save_attention", 1, 26.3, "§1 table"),
    ("1.7b", 4096, "save_attention", 1, 10.3, "§1 table"),
    ("1.7b", 16384, "save_attention", 1, 29.8, "§1 table"),
    ("4b", 4096, "save_attention", 1, 21.3, "§1 table"),
    ("4b", 16384, "save_attention", 1, 61.0, "§1 table"),
    ("4b", 16384, "save_mlp", 1, 66.5, "§1 notes, row 5"),
    ("4b", 16384, "save_attention", 1, 65.9, "§4 4×H200 a9c7a40, 1 GPU"),
    ("4b", 16384, "save_attention", 2, 63.1, "§4 4×H200 a9c7a40, FSDP over 2"),
    ("4b", 16384, "save_attention", 4, 60.3, "§4 4×H200 a9c7a40, FSDP over 4"),
    ("1.7b", 16384, "save_attention", 1, 31.6, "§4 4×H200 a9c7a40, 1 GPU"),
    ("1.7b", 16384, "save_attention", 2, 30.4, "§4 4×H200 a9c7a40, FSDP over 2"),
    ("1.7b", 16384, "save_attention", 4, 29.1, "§4 4×H200 a9c7a40, FSDP over 4"),
    ("4b", 16384, "save_attention", 1, 65.8, "§4 2×H100 10c2fa3 and 4×H100 1c4ccb2, replicated, any GPU count"),
    ("4b", 16384, "save_attention", 1, 65.9, "§4 2×H100 10c2fa3, replicated, 2 GPUs"),
    ("1.7b", 16384, "save_attention", 1, 31.7, "§4 4×H100 1c4ccb2, replicated, any GPU count"),
    ("4b", 16384, "nothing_saveable", 1, 45.4, "§4 4×H100 95254c6, replicated, any GPU count"),
    ("1.7b", 16384, "nothing_saveable", 1, 22.8, "§4 4×H100 95254c6, replicated, any GPU count"),
]


def _trainer(shape="4b", seq_len=16384, rows=1, policy="nothing_saveable", chunk_size=4096, shards=1, **kw):
    args = dict(dtype="bfloat16", seq_len=seq_len, rows=rows, remat=True, remat_policy=policy,
                chunk_size=chunk_size, lora_rank=16, shards=shards)
    return memory.trainer_gib(SHAPES[shape], **{**args, **kw})


@pytest.mark.parametrize("shape,seq_len,policy,shards,measured,where", MEASURED)
def test_trainer_estimate_is_safe_and_close_to_each_measured_peak(shape, seq_len, policy, shards, measured, where):
    estimate = _trainer(shape, seq_len, policy=policy, shards=shards)
    assert measured <= estimate <= 1.1 * measured, (where, estimate)


def test_trainer_grows_with_tokens_and_policy_order():
    for policy in memory.POLICIES:
        seqs = [_trainer(seq_len=s, policy=policy) for s in (1024, 4096, 16384, 32768)]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        rows = [_trainer(seq_len=4096, rows=r, policy=policy) for r in (1, 2, 4)]
        assert rows == sorted(rows) and len(set(rows)) == len(rows)
    least, attention, mlp = (_trainer(policy=p) for p in memory.POLICIES)
    assert least < attention and least < mlp
    assert _trainer(chunk_size=8192) > _trainer(chunk_size=4096) == _trainer(chunk_size=1024)
    assert _trainer(dtype="float32") > _trainer()
    # FSDP: less the more GPUs share the frozen weights; a larger rank: more LoRA state
    assert _trainer(shards=4) < _trainer(shards=2) < _trainer()
    assert _trainer(lora_rank=64) > _trainer()


def test_trainer_without_a_measured_setting_has_no_estimate():
    assert _trainer(remat=False) is None
    assert _trainer(policy="dots_with_no_batch_dims_saveable") is None
    assert _trainer(rows=memory.rows_per_gpu(0, 1)) is None  # all rows at once: unknown before packing
    assert memory.rows_per_gpu(3, 2) == 2


def test_server_weights_plus_one_sequence():
    m = SHAPES["4b"]
    # 4B: ~4.0e9 bf16 parameters = 7.5 GiB; 144 KiB of KV cache a token (36 layers, 8 kv heads of 128, K and V)
    assert memory.weights_gib(m, "bfloat16") == pytest.approx(7.49, abs=0.01)
    assert memory.kv_cache_gib(m, "bfloat16", 1) * 2 ** 20 == pytest.approx(144)
    need = memory.server_gib(m, dtype="bfloat16", max_model_len=16384)
    assert need == pytest.approx(7.49 + 2.25 + memory.SERVER_OVERHEAD_GIB, abs=0.01)
    assert memory.server_gib(m, dtype="bfloat16", max_model_len=32768) > need
    assert memory.server_gib(m, dtype="bfloat16", max_model_len=16384, tp=2) < need


def test_read_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config("1.7b")))
    assert memory.read_shape(str(tmp_path)) == SHAPES["1.7b"]
    assert memory.read_shape(str(tmp_path / "missing")) is None  # a hub id or a folder not here: no estimate
    (tmp_path / "config.json").write_text("{}")
    assert memory.read_shape(str(tmp_path)) is None


# config validation of the plan (config.check_memory_plan) and the query behind it

H100_MIB = 81559  # nvidia-smi's memory.total of an H100 80GB HBM3
ONE_GPU_4B = dict(inference__gpu_memory_utilization=0.3, trainer__gpu_memory_fraction=0.62,
                  trainer__remat_policy="nothing_saveable")  # the reference's 4B, rows of 16k, on one GPU


def _four_b(tmp_path, **overrides):
    (tmp_path / "config.json").write_text(json.dumps(hf_config("4b")))
    return _config(model__path=str(tmp_path), **{**ONE_GPU_4B, **overrides})


def test_the_4b_memory_plan_fits_one_h100(tmp_path):
    one = Gpus(inference=(0,), trainer=(0,), memory_mib=H100_MIB)
    _, plan, _ = resolve(_four_b(tmp_path), one)
    assert plan.memory == ("memory of GPU 0 (79.6 GiB): student server ~13.1 GiB of its 0.3 (23.9 GiB); "
                           "trainer ~47.4 GiB of its 0.62 (49.4 GiB)",)
    assert plan.memory[0] in plan.describe()
    # the same split with save_attention: refused, naming what fits
    with pytest.raises(ConfigError, match=r"^trainer.gpu_memory_fraction: 0.62 of GPU 0 \(49.4 of 79.6 GiB\) cannot "
                                          r"hold the trainer's ~68.3 GiB \(1 row\(s\) of 16884 a micro-step, remat "
                                          r"save_attention\); trainer.remat_policy=nothing_saveable fits \(~47.4 GiB\)$"):
        validate(_four_b(tmp_path, trainer__remat_policy="save_attention"), one)
    with pytest.raises(ConfigError, match=r"^trainer.gpu_memory_fraction: 0.5 of GPU 0 .* ~47.4 GiB .*; "
                                          r"trainer.gpu_memory_fraction=0.6 fits beside the GPU's other shares \(0.3\)"):
        validate(_four_b(tmp_path, trainer__gpu_memory_fraction=0.5), one)
    with pytest.raises(ConfigError, match=r"^inference.gpu_memory_utilization: 0.1 of GPU 0 \(8.0 of 79.6 GiB\) cannot "
                                          r"hold the student server's ~13.1 GiB \(weights \+ one 18932-token "
                                          r"sequence \+ overhead\); inference.gpu_memory_utilization=0.17 fits"):
        validate(_four_b(tmp_path, inference__gpu_memory_utilization=0.1), one)
    with pytest.raises(ConfigError, match=r"^trainer.gpu_memory_fraction: 0.62 .* it needs trainer.gpu_memory_fraction "
                                          r">= 0.7\d, leaving 0.2\d for the GPU's other shares; a shorter seq_len"):
        validate(_four_b(tmp_path, seq_len=22000), one)
    with pytest.raises(ConfigError, match=r"~8\d.\d GiB .* that is more than the GPU can give \(1\); a shorter seq_len"):
        validate(_four_b(tmp_path, seq_len=32768), one)


def test_the_trainer_mesh_spans_every_process(tmp_path):
    """On several hosts the trainer's mesh is its GPUs on all of them: with shard_weights the frozen weights are
    sharded over every process's GPUs, so a share that one process alone could not give fits when four share them."""
    c = _four_b(tmp_path, trainer__gpu_memory_fraction=0.55, trainer__shard_weights=True)
    with pytest.raises(ConfigError, match=r"^trainer.gpu_memory_fraction: 0.55 .* ~47.4 GiB .*_fraction=0.6 fits"):
        validate(c, Gpus(inference=(0,), trainer=(0,), memory_mib=H100_MIB))
    with pytest.raises(ConfigError, match=r"~44.4 GiB .*_fraction=0.56 fits"):
        validate(c, Gpus(inference=(0,), trainer=(0,), memory_mib=H100_MIB, processes=2))
    _, plan, _ = resolve(c, Gpus(inference=(0,), trainer=(0,), memory_mib=H100_MIB, processes=4))
    assert plan.memory[0].endswith("trainer ~42.7 GiB of its 0.55 (43.8 GiB)")


def test_memory_plan_unknown_is_not_checked(tmp_path):
    saving = dict(trainer__remat_policy="save_attention")
    assert resolve(_four_b(tmp_path, **saving), Gpus(inference=(0,), trainer=(0,)))[1].memory == ()  # no nvidia-smi
    _, plan, _ = resolve(_config(**ONE_GPU_4B), Gpus(inference=(0,), trainer=(0,), memory_mib=H100_MIB))  # a hub id
    assert plan.memory == ("memory of GPU 0 (79.6 GiB): student server not estimated of its 0.3 (23.9 GiB); "
                           "trainer not estimated of its 0.62 (49.4 GiB)",)
    full_vocab = dict(saving, loss__topk_tau=1.0, loss__topk=0)  # the teacher inside the step: not measured
    _, plan, _ = resolve(_four_b(tmp_path, **full_vocab), Gpus(inference=(0,), trainer=(0,), memory_mib=H100_MIB))
    assert plan.memory[0].endswith("trainer not estimated of its 0.62 (49.4 GiB)")


def test_gpu_memory_query(tmp_path, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text('#!/bin/sh\n[ "$4" = "0,2" ] && printf "81559\\n143771\\n"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_memory_mib(("0", "2")) == 81559 and gpu_memory_mib(("1",)) is None and gpu_memory_mib(()) is None
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert gpu_memory_mib(("0",)) is None
