import re

import pytest

from configs import rl
from ctxd_jax import hosts
from ctxd_jax.config import ConfigError, resolve
from ctxd_jax.plan import Gpus

SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
         "SLURM_LOCALID": "0"}


def test_settings_from_ctxd_or_slurm_variables():
    assert hosts.settings_from_env({}) == hosts.Settings()
    assert not hosts.Settings().several
    s = hosts.settings_from_env({"CTXD_COORDINATOR_ADDRESS": "h0:1", "CTXD_NUM_PROCESSES": "2", "CTXD_PROCESS_ID": "1"})
    assert s == hosts.Settings("h0:1", 2, 1) and s.several and not s.leader
    # inside srun: JAX finds the coordinator from the same variables
    assert hosts.settings_from_env(SLURM) == hosts.Settings("", 4, 2, source="SLURM")
    assert hosts.settings_from_env(dict(SLURM, SLURM_NTASKS="1", SLURM_PROCID="0")) == hosts.Settings("", 1, 0, "SLURM")
    # CTXD_* wins over SLURM (e.g. one process per node started by a script inside an allocation)
    assert hosts.settings_from_env(dict(SLURM, CTXD_NUM_PROCESSES="1")) == hosts.Settings()
    assert hosts.settings_from_env({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}) == hosts.Settings()


@pytest.mark.parametrize("env, message", [
    ({"CTXD_NUM_PROCESSES": "2"}, "CTXD_COORDINATOR_ADDRESS: needed"),
    ({"CTXD_NUM_PROCESSES": "two"}, "CTXD_NUM_PROCESSES: 'two' is not"),
    ({"CTXD_NUM_PROCESSES": "2", "CTXD_PROCESS_ID": "2", "CTXD_COORDINATOR_ADDRESS": "h:1"}, "CTXD_PROCESS_ID: 2 is"),
    (dict(SLURM, SLURM_PROCID="4"), "SLURM_PROCID: 4 is not in [0, 4)"),
])
def test_bad_settings(env, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        hosts.settings_from_env(env)


def _resolved(gpus=Gpus(), **overrides):
    c = rl.get_config()
    c.update_from_flattened_dict(overrides)
    config, plan, _ = resolve(c, gpus)
    return config, plan


TCP_VLLM_TEACHER = {"inference.transport": "tcp", "teacher.scorer": "vllm"}


def test_every_process_starts_the_plans_servers_on_ports_of_its_own():
    config, plan = _resolved(Gpus(inference=(0, 1), teacher=(2,), trainer=(3, 4)), **TCP_VLLM_TEACHER)
    assert hosts.local_plan(config, plan, 0) is plan
    ports = {config.inference.port, config.inference.port + 1}  # process 0: student, teacher
    for p in (1, 2, 3):
        mine = hosts.local_plan(config, plan, p)
        assert mine.student.roles == plan.student.roles and mine.teacher.roles == plan.teacher.roles
        assert mine.student.gpu_ids == (0, 1) and mine.student.dp == 2 and mine.trainer == plan.trainer
        assert not {mine.student.port, mine.teacher.port} & ports
        ports |= {mine.student.port, mine.teacher.port}
    # private Unix sockets (the default): no ports at all, the same plan everywhere
    config, plan = _resolved(Gpus(inference=(0, 1), teacher=(2,), trainer=(3, 4)))
    assert hosts.local_plan(config, plan, 1) is plan


def test_each_process_takes_a_whole_share_of_the_groups():
    config, plan = _resolved(**{"batch_size": 12, "rollouts_per_example": 2})
    hosts.check(config, plan, hosts.Settings("h:1", 3, 0))
    with pytest.raises(ConfigError, match=r"^batch_size: 12 samples are 6 groups .* for 4 processes"):
        hosts.check(config, plan, hosts.Settings("h:1", 4, 0))


def test_merged_weights_are_refused_with_several_processes():
    # over uds: merged weights over tcp are refused for one process too (their dev endpoints take no key)
    config, plan = _resolved(Gpus(inference=(0,), teacher=(1,), trainer=(2,)), **{"weights.mode": "merged",
                                                                                  "teacher.scorer": "vllm"})
    hosts.check(config, plan, hosts.Settings())
    with pytest.raises(ConfigError, match="^weights.mode: 'merged' is not built for several processes"):
        hosts.check(config, plan, hosts.Settings("h:1", 2, 0))


def test_a_gpu_shared_with_a_trainer_of_several_processes_keeps_room_for_nccl():
    """One trainer GPU a process looks like no mesh to that process, but the processes' trainers form one."""
    shares = {"inference.gpu_memory_utilization": 0.5, "trainer.gpu_memory_fraction": 0.45}
    config, plan = _resolved(Gpus(inference=(0,), trainer=(0,)), **shares)
    hosts.check(config, plan, hosts.Settings())
    with pytest.raises(ConfigError, match=r"^inference.gpu_memory_utilization: GPU 0 is shared .*0.95 > 0.85"):
        hosts.check(config, plan, hosts.Settings("h:1", 2, 0))


def test_describe_names_every_process():
    config, plan = _resolved(Gpus(inference=(0,), teacher=(1,), trainer=(2, 3)), **TCP_VLLM_TEACHER,
                             **{"batch_size": 12, "rollouts_per_example": 2})
    assert hosts.describe(config, plan, hosts.Settings()) == plan.describe()
    text = hosts.describe(config, plan, hosts.Settings("h0:1234", 3, 1))
    assert "3 processes from CTXD_* variables" in text and "this is process 1" in text and "h0:1234" in text
    assert "every process (each on its own host, the same program): 2 of each step's 6 groups" in text
    assert "vLLM server [teacher]" in text and "(process p: ports + 2 p)" in text
    assert "the 6 GPUs of all 3 processes, num_train_workers=6" in text
