"""Servers built from the Plan: shared student+teacher server vs separate ones (nothing is started)."""

import pytest

from configs.rl import get_config
from ctxd_jax.config import resolve
from ctxd_jax.plan import Gpus
from ctxd_jax.inference.deploy import BASE_NAME, STUDENT_ADAPTER, TEACHER_NAME, build_servers


VLLM = {"teacher.scorer": "vllm"}


def _deploy(gpus, **overrides):
    config = get_config()
    config.unlock()
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    config, plan, _ = resolve(config, gpus)
    return build_servers(config, plan, log_dir="/tmp")


def test_shared_server_serves_student_adapter_and_base_teacher():
    d = _deploy(Gpus(inference=(0,), teacher=(0,), trainer=(1,)), **VLLM)
    assert d.teacher is d.student and d.group.servers == [d.student]
    assert (d.student_model, d.teacher_model) == (STUDENT_ADAPTER, BASE_NAME)
    client, model = d.teacher_sampler()
    assert client.server is d.student and model == BASE_NAME and d.teacher_client().server is d.student
    assert d.student.model_dir == "Qwen/Qwen3-4B-Instruct-2507"  # a hub id is not made a path
    assert "--enable-lora" in d.student.args and d.student.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert d.student.uds and "--max-logprobs=20" in d.student.args  # topk_tau 0: vLLM's default


def test_trainer_scored_teacher_has_no_server_and_samples_the_student_base():
    for gpus in (Gpus(), Gpus(inference=(0,), trainer=(1,)), Gpus(inference=(0,), teacher=(2,), trainer=(1,))):
        d = _deploy(gpus)
        assert d.group.servers == [d.student] and d.teacher is None and d.teacher_client() is None
        assert d.student.name == "student" and d.student_model == STUDENT_ADAPTER
        client, model = d.teacher_sampler()
        assert client.server is d.student and model == BASE_NAME
    pure_rl = _deploy(Gpus(inference=(0,), trainer=(1,)), **VLLM, **{"loss.teacher_tau": 0.0, "loss.student_tau": 0.0})
    assert pure_rl.teacher is None and pure_rl.teacher_sampler() is None  # no teacher to sample


def test_separate_teacher_server():
    d = _deploy(Gpus(inference=(0, 1), teacher=(2,), trainer=(3,)), **VLLM)
    assert d.group.servers == [d.student, d.teacher] and d.teacher_model == TEACHER_NAME
    assert d.teacher_sampler()[0].server is d.teacher and d.teacher_sampler()[1] == TEACHER_NAME
    assert d.teacher.env["CUDA_VISIBLE_DEVICES"] == "2" and d.teacher.uds != d.student.uds
    assert "--data-parallel-size=2" in d.student.args
    assert "--enable-lora" not in d.teacher.args and d.teacher.api_key == d.student.api_key
    tcp = _deploy(Gpus(inference=(0, 1), teacher=(2,), trainer=(3,)), **VLLM, **{"inference.transport": "tcp"})
    assert (tcp.student.port, tcp.teacher.port, tcp.teacher.uds) == (8000, 8001, None)


def test_servers_get_the_devices_their_gpu_ids_index():
    d = _deploy(Gpus(inference=(0, 1), teacher=(1,), trainer=(2,), visible=("4", "5", "6")), **VLLM,
                **{"inference.gpu_memory_utilization": 0.45})
    assert d.student.env["CUDA_VISIBLE_DEVICES"] == "4,5" and d.teacher.env["CUDA_VISIBLE_DEVICES"] == "5"


def test_servers_allow_the_teachers_topk():
    d = _deploy(Gpus(inference=(0,), teacher=(1,), trainer=(2,)), **VLLM, **{"loss.topk_tau": 1.0, "loss.topk": 64})
    assert "--max-logprobs=64" in d.teacher.args


def test_merged_mode_needs_own_teacher():
    with pytest.raises(ValueError, match="weights.mode"):
        _deploy(Gpus(inference=(0,), teacher=(0,), trainer=(1,)), **{"weights.mode": "merged"}, **VLLM)
    d = _deploy(Gpus(inference=(0,), teacher=(1,), trainer=(2,)), **{"weights.mode": "merged"}, **VLLM)
    assert d.student_model == BASE_NAME and d.student.env["VLLM_SERVER_DEV_MODE"] == "1"
