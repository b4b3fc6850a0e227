"""Server processes: socket folders, the key, process-group scanning (no vLLM started)."""

import os
import subprocess

import pytest

from ctxd_jax.inference.server import OWNER_FILE, SOCKET_PREFIX, VLLMServer, clean_stale_sockets, group_members


def test_socket_in_a_private_folder_and_no_port():
    s = VLLMServer("/m", name="x")
    assert s.port is None and s.base_url == "http://localhost" and s.address == f"unix:{s.uds}"
    assert os.path.dirname(s.uds) != VLLMServer("/m", name="x").uds  # one folder per server
    assert not os.path.exists(os.path.dirname(s.uds))  # made (0700) only when it starts
    tcp = VLLMServer("/m", name="y", uds=False, port=8123)
    assert tcp.uds is None and tcp.base_url == "http://127.0.0.1:8123" and "--port=8123" in tcp.args


def test_group_members_sees_own_group():
    assert os.getpid() in group_members(os.getpgrp())


def test_the_key_goes_in_the_environment_not_the_command_line(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "inherited")
    keyed = VLLMServer("/m", api_key="-s3cret", uds=True)
    assert keyed.env["VLLM_API_KEY"] == "-s3cret" and not any("s3cret" in a for a in keyed.args)
    assert "VLLM_API_KEY" not in VLLMServer("/m", api_key=None).env  # no key: none inherited either


def test_stale_socket_folders_of_dead_runs_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    folders = {}
    for name, pid in (("dead", dead.pid), ("alive", os.getpid()), ("no-owner", None)):
        folder = tmp_path / f"{SOCKET_PREFIX}{name}"
        folder.mkdir()
        if pid is not None:
            (folder / OWNER_FILE).write_text(str(pid))
        folders[name] = folder
    (tmp_path / "other-dead").mkdir()
    (tmp_path / "other-dead" / OWNER_FILE).write_text(str(dead.pid))
    assert clean_stale_sockets(str(tmp_path)) == [str(folders["dead"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctxd-vllm-alive", "ctxd-vllm-no-owner", "other-dead"]


def test_a_server_that_never_started_leaves_no_socket_folder(tmp_path):
    s = VLLMServer("/m", log_dir=str(tmp_path), uds=True)
    s.args = [str(tmp_path / "no-such-program")]
    with pytest.raises(OSError):
        s.start()
    assert os.path.isdir(os.path.dirname(s.uds))
    s.stop()
    assert not os.path.exists(os.path.dirname(s.uds))
