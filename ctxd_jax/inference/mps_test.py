import os
import stat

import pytest

from ctxd_jax.config import ConfigError
from ctxd_jax.inference import mps
from ctxd_jax.plan import Gpus
from ctxd_jax import config as config_lib
from configs import rl


def plan_of(inference: str, trainer: str):
    c = rl.get_config()
    c.model.path = "/nonexistent-model"
    gpus = Gpus(inference=config_lib.parse_gpu_ids("i", inference), teacher=(),
                trainer=config_lib.parse_gpu_ids("t", trainer), visible=None)
    c.trainer.gpu_memory_fraction, c.inference.gpu_memory_utilization = 0.4, 0.5
    return config_lib.resolve(c, gpus)[1]


def test_wanted_only_where_a_server_shares_the_trainers_one_gpu():
    assert mps.wanted("auto", plan_of("0", "0"))
    assert not mps.wanted("off", plan_of("0", "0"))
    assert not mps.wanted("auto", plan_of("0", "1"))  # separate GPUs: nothing to share
    assert not mps.wanted("auto", plan_of("", ""))  # CPU


def fake_control(tmp_path, monkeypatch, exit_code: int):
    """An nvidia-cuda-mps-control on PATH that records its calls and the pipe folder it was given."""
    log = tmp_path / "calls"
    exe = tmp_path / "bin" / mps.CONTROL
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\necho "$* $CUDA_MPS_PIPE_DIRECTORY $(cat)" >> {log}\nexit {exit_code}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{exe.parent}:{os.environ['PATH']}")
    return log


def test_daemon_starts_with_a_private_pipe_and_quits(tmp_path, monkeypatch):
    log = fake_control(tmp_path, monkeypatch, 0)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    with mps.daemon(required=True) as on:
        assert on
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]  # what the servers and the trainer inherit
        assert os.path.isdir(pipe) and "ctxd-mps-" in pipe
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    start, stop = log.read_text().splitlines()
    assert start.startswith(f"-d {pipe}") and stop.strip() == f"{pipe} quit"
    assert not os.path.exists(pipe)


def test_daemon_that_cannot_start(tmp_path, monkeypatch, capsys):
    fake_control(tmp_path, monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"^trainer.mps: 'on' but CUDA MPS cannot start"):
        with mps.daemon(required=True):
            pass
    with mps.daemon(required=False) as on:
        assert not on and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert "take turns" in capsys.readouterr().err
