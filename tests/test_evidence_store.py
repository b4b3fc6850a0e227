"""bench/evidence.py's record and its reuse of compiled steps, without servers: results.json shared by worker
processes (bench/evidence_store.py), and a fresh trainer loading its steps from the JAX compilation cache."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from bench.evidence_store import Store, run_key

ARGS = {"steps": 2, "prompts": 4, "max_tokens": 16, "eval_every": 1, "eval_examples": 24, "gpu": False}


def _take_and_record(out, keys, worker):
    store = Store(out)
    for key in keys:
        if store.claim(key):
            task, method, seed = key.split("-")
            store.add_run({"task": task, "method": method, "seed": int(seed[4:]), "worker": worker})


def test_workers_take_each_run_once_and_every_row_lands(tmp_path):
    out, export = str(tmp_path / "out"), str(tmp_path / "export")
    Store(out, (export,)).start(ARGS)
    keys = [run_key("t", m, s) for s in range(42, 52) for m in ("a", "b")]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_take_and_record, args=(out, keys, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    runs = Store(out).read()["runs"]
    assert sorted(run_key(r["task"], r["method"], r["seed"]) for r in runs) == sorted(keys)
    assert Store(out).done() == set(keys)


def test_a_rerun_skips_done_runs_retries_failed_ones_and_keeps_its_settings(tmp_path):
    out, export = str(tmp_path / "out"), str(tmp_path / "export")
    store = Store(out, (export,))
    store.start(ARGS)
    assert store.claim("t-a-seed42") and not store.claim("t-a-seed42")
    store.add_run({"task": "t", "method": "a", "seed": 42, "wall_s": 1.0})
    store.add_run({"task": "t", "method": "b", "seed": 42, "error": "boom"})
    assert store.done() == {"t-a-seed42"}
    with open(os.path.join(export, "results.json")) as f:  # exported after every change
        assert len(json.load(f)["runs"]) == 2

    store.start(ARGS)  # the same command again: claims of the stopped one are cleared, the record is kept
    assert store.claim("t-a-seed42")
    store.add_run({"task": "t", "method": "b", "seed": 42, "wall_s": 2.0})
    runs = store.read()["runs"]
    assert len(runs) == 2 and "error" not in runs[1] and store.done() == {"t-a-seed42", "t-b-seed42"}
    with pytest.raises(SystemExit, match="steps=2"):
        store.start(dict(ARGS, steps=20))


def test_redo_drops_a_methods_runs_once_and_a_resumed_command_keeps_what_it_redid(tmp_path):
    store = Store(str(tmp_path))
    store.start(ARGS)
    for method, seed in (("a", 42), ("b", 42), ("a", 43), ("b", 43)):
        store.add_run({"task": "t", "method": method, "seed": seed, "wall_s": 1.0})
    store.add_run({"task": "u", "method": "b", "seed": 42, "error": "boom"})
    assert store.start(dict(ARGS, redo=["b"])) == 3  # every task and seed of b, failed tries too
    assert store.done() == {"t-a-seed42", "t-a-seed43"}
    store.add_run({"task": "t", "method": "b", "seed": 42, "wall_s": 2.0})  # redone
    assert store.start(dict(ARGS, redo=["b"])) == 0  # the same command again resumes: the redone run stays
    assert store.start(dict(ARGS, redo=["a", "b"])) == 2  # only a is new to this redo
    assert store.done() == {"t-b-seed42"}
    store.start(ARGS)
    assert store.start(dict(ARGS, redo=["b"])) == 1  # a later command asks for b again: dropped again
    assert store.read()["args"]["redo"] == ["b"]


def test_task_references_are_measured_once(tmp_path):
    store, calls = Store(str(tmp_path)), []
    store.start(ARGS)
    for _ in range(2):
        refs = store.task_refs("t", lambda: calls.append(1) or {"student": {"reward": 0.1}})
    assert calls == [1] and refs == {"student": {"reward": 0.1}}
    assert store.read()["tasks"]["t"] == refs


SECOND_TRAINER = """
import json, sys
sys.path.insert(0, "bench")
from evidence_worker import CompileCounter, use_compile_cache
if sys.argv[2]:
    use_compile_cache(sys.argv[2])
counter = CompileCounter()
from ctxd_jax.models.hf import load_model
from ctxd_jax.sharding import make_mesh
from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer
from ctxd_jax.trainer_test import _batch

for run in range(2):  # two runs of the same shapes, each with a fresh trainer (as bench/evidence.py's workers do)
    model = load_model(sys.argv[1], lora_rank=4, lora_alpha=8.0, seed=run)
    before = dict(counter.counts)
    Trainer(model, make_mesh(), OptimConfig(lr=1e-2, total_steps=4), StepConfig(topk_tau=0.0)).step(_batch())
print(json.dumps(counter.since(before)))
"""


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no_cache"])
def test_a_second_trainer_loads_its_compiled_step(tmp_path, cached):
    from ctxd_jax.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(str(tmp_path / "tiny"), "qwen3")
    cache = str(tmp_path / "jax_cache") if cached else ""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SECOND_TRAINER, model, cache], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    second = json.loads(out.stdout.strip().splitlines()[-1])
    if cached:  # its first step compiles nothing: every executable comes from the cache
        assert second["compiles"] == 0 and second["cache_hits"] > 0, second
    else:
        assert second["compiles"] > 0, second
