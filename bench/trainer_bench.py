"""Trainer throughput: our jitted LoRA train step against the PyTorch peer (transformers + PEFT), same GPU, same run.

    python bench/trainer_bench.py --shapes=0.6b,1.7b,4b --seq_lens=4096,16384 [--out=results.json]

Each measurement runs in its own process (JAX and torch would fight over GPU memory in one). Random weights of real
Qwen3 shapes, bf16, LoRA r16 / alpha 64 on all seven projections, one packed row per step, AdamW + clipping.
Warm-up steps excluded; the median of --steps is reported. The table is printed last.

Scaling over the GPUs of one host (JAX only; one packed row of seq_len per GPU, so each GPU's work stays fixed):

    python bench/trainer_bench.py --scaling=1,2,4,8 --shapes=1.7b --seq_lens=16384

prints tokens/s, tokens/s per GPU and efficiency (per-GPU tokens/s over the 1-GPU run's); `--peer=4b:16384` adds
the PyTorch peer on one GPU for those shape:seq pairs, in the same invocation. On CPU, check the code path with fake
devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 ... --shapes=tiny --seq_lens=64 --attn_impl=xla.
What crosses devices in a step (every collective of the compiled step with its bytes and runs, and the loops' trip
counts; compiled, not run; `--layers=1` compiles faster with the same per-layer table):

    python bench/trainer_bench.py --one=1.7b:16384 --hlo_collectives=4

Several hosts: run `--one=SHAPE:SEQ --devices=0` on every host with CTXD_COORDINATOR_ADDRESS, CTXD_NUM_PROCESSES,
CTXD_PROCESS_ID set (ctxd_jax/distributed.py; launch/two_hosts_trainer_bench.sh).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from shapes import H100_BF16_PEAK, flops_per_token, hf_config  # noqa: E402


def build(shape: str, seq_len: int, docs: int, remat: bool, attn_impl: str | None, chunk_size: int,
          remat_policy: str, devices: int = 1, shard_weights: bool = False, layers: int = 0):
    """The benchmark's trainer on a mesh of the first `devices` devices (0 = all, of every process) and its batch:
    one row of seq_len tokens per device. `layers` > 0 replaces the shape's layer count (a cheaper compile)."""
    from ctxd_jax import distributed

    distributed.initialize()  # several hosts when CTXD_* are set; before JAX touches a device
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ctxd_jax import sharding
    from ctxd_jax.models.config import ModelConfig
    from ctxd_jax.models.transformer import Transformer
    from ctxd_jax.packing import TrainBatch
    from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer

    cfg = ModelConfig.from_dict(dict(hf_config(shape), **({"num_hidden_layers": layers} if layers else {})))
    model = Transformer(cfg, lora_rank=16, lora_alpha=64, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                        remat=remat, remat_policy=remat_policy, attn_impl=attn_impl, rngs=nnx.Rngs(0))
    all_devices = jax.devices()
    if devices > len(all_devices):
        raise ValueError(f"--devices={devices}: only {len(all_devices)} devices")
    mesh = sharding.make_mesh(all_devices[:devices or len(all_devices)])
    sharding.shard_model(model, mesh, shard_weights=shard_weights)
    trainer = Trainer(model, mesh, OptimConfig(lr=1e-5, max_norm=1.0),
                      StepConfig(teacher_tau=0.0, student_tau=0.0, chunk_size=chunk_size))
    rng = np.random.default_rng(0)
    doc = seq_len // docs
    rows = mesh.devices.size  # one row per device: the batch grows with the mesh (weak scaling)
    seg, pos = np.zeros((rows, seq_len), np.int32), np.zeros((rows, seq_len), np.int32)  # the rest: padding
    seg[:, :doc * docs] = np.repeat(np.arange(1, docs + 1, dtype=np.int32), doc)
    pos[:, :doc * docs] = np.tile(np.arange(doc, dtype=np.int32), docs)
    ones = np.ones((rows, seq_len), np.float32)
    batch = TrainBatch(
        tokens=rng.integers(0, cfg.vocab_size, (rows, seq_len), dtype=np.int32), positions=pos, segment_ids=seg,
        loss_mask=np.ones((rows, seq_len), bool), sampling_logprobs=-ones * 11.0, advantages=ones * 0.01,
        kl_gates=ones, temperatures=ones)
    return trainer, batch


def jax_step_time(shape: str, seq_len: int, steps: int, *args, **kwargs) -> dict:
    """One train step's time (median of `steps` after two warm-up steps); the rest of the arguments are build's."""
    import jax

    trainer, batch = build(shape, seq_len, *args, **kwargs)
    for _ in range(2):
        trainer.step(batch)  # compile + warm-up; step() ends with a host read, so it is synchronous
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.step(batch)
        times.append(time.perf_counter() - t)
    stats = jax.local_devices()[0].memory_stats() or {}
    med = statistics.median(times)
    rows, n = batch.tokens.shape[0], trainer.mesh.devices.size
    return {"impl": "jax", "shape": shape, "seq_len": seq_len, "devices": n, "processes": jax.process_count(),
            "device_kind": jax.local_devices()[0].device_kind, "step_s": med, "tokens_per_s": rows * seq_len / med,
            "tokens_per_s_per_device": seq_len / med, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def hlo_collectives(shape: str, seq_len: int, *args, **kwargs) -> None:
    """Prints every collective of the step's compiled programs (ctxd_jax/hlo.py), the LoRA gradient's bytes (the one
    transfer a data-parallel step needs) and the while loops' trip counts (with one row a device, none should grow
    with the device count)."""
    import jax

    from ctxd_jax import hlo

    trainer, batch = build(shape, seq_len, *args, **kwargs)
    lora_bytes = sum(x.size * 4 for x in jax.tree.leaves(trainer.lora))  # float32 gradients
    print(f"{shape} seq {seq_len}, {trainer.mesh.devices.size} devices ({jax.devices()[0].device_kind}); "
          f"LoRA gradient: {lora_bytes:,} bytes")
    for name, compiled in trainer.compiled_step(batch).items():
        text = compiled.as_text()
        print(f"\n[{name}]\n{hlo.table(hlo.collectives(text))}")
        for runs, trips, where in hlo.loops(text):
            print(f"while loop: {trips or '?'} trips, {runs} run(s)  <- {where[-80:]}")


def run_one(args: list[str], timeout: float = 600) -> dict:
    """Runs this script (or the torch peer) in a subprocess and returns its JSON line, or an error record."""
    # The GPU is the benchmark's alone: let XLA take 95% of it (its default preallocation is 75%).
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95"))
    try:
        p = subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=HERE, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # one stuck run must not eat the others' time
        return {"error": f"timed out after {timeout:.0f} s: {(e.stderr or b'')[-500:]!r}"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (p.stderr or p.stdout)[-1500:]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="0.6b,1.7b,4b")
    p.add_argument("--seq_lens", default="4096,16384")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--docs", type=int, default=1, help="samples packed in the row (1 = the peer's workload)")
    p.add_argument("--remat", type=int, default=1)
    p.add_argument("--remat_policy", default="nothing_saveable")
    p.add_argument("--attn_impl", default="cudnn")
    p.add_argument("--chunk_size", type=int, default=4096)
    p.add_argument("--impls", default="jax,torch")
    p.add_argument("--devices", type=int, default=1, help="with --one: mesh over this many devices (0 = all)")
    p.add_argument("--shard_weights", type=int, default=0, help="FSDP-shard the frozen weights (trainer.shard_weights)")
    p.add_argument("--scaling", default="", help="device counts, e.g. 1,2,4,8: the JAX scaling table")
    p.add_argument("--peer", default="", help="with --scaling: shape:seq_len pairs for the torch peer on one GPU")
    p.add_argument("--timeout", type=float, default=600, help="seconds per measurement (its own process)")
    p.add_argument("--one", default="", help="run one JAX measurement shape:seq_len here (a JSON line)")
    p.add_argument("--hlo_collectives", type=int, default=0,
                   help="with --one: print the step's collectives on this many devices (compile only, no run)")
    p.add_argument("--layers", type=int, default=0, help="with --hlo_collectives: layers of the shape (0 = its own)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.one and a.hlo_collectives:
        shape, seq_len = a.one.split(":")
        hlo_collectives(shape, int(seq_len), a.docs, bool(a.remat), a.attn_impl or None, a.chunk_size,
                        a.remat_policy, a.hlo_collectives, bool(a.shard_weights), a.layers)
        return
    if a.one:
        shape, seq_len = a.one.split(":")
        print(json.dumps(jax_step_time(shape, int(seq_len), a.steps, a.docs, bool(a.remat),
                                       a.attn_impl or None, a.chunk_size, a.remat_policy, a.devices,
                                       bool(a.shard_weights))))
        return
    flags = [f"--steps={a.steps}", f"--docs={a.docs}", f"--remat={a.remat}", f"--remat_policy={a.remat_policy}",
             f"--attn_impl={a.attn_impl}", f"--chunk_size={a.chunk_size}", f"--shard_weights={a.shard_weights}"]
    if a.scaling:
        scaling(a, flags)
        return

    rows = []
    for shape in a.shapes.split(","):
        for seq_len in map(int, a.seq_lens.split(",")):
            row = {"shape": shape, "seq_len": seq_len}
            if "jax" in a.impls:
                row["jax"] = run_one([__file__, f"--one={shape}:{seq_len}", *flags], a.timeout)
            if "torch" in a.impls:
                row["torch"] = run_one(torch_args(shape, seq_len, a.steps), a.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)

    errors = {f"{r['shape']}:{r['seq_len']}:{k}": v["error"][-400:] for r in rows for k, v in r.items()
              if isinstance(v, dict) and "error" in v}
    for k, e in errors.items():
        print(f"[{k}] {e}")

    print(f"\n{'shape':>5} {'seq':>6} | {'jax tok/s':>9} {'MFU':>5} {'GiB':>5} | {'torch tok/s':>11} {'MFU':>5} "
          f"{'GiB':>5} | {'jax/torch':>9}")
    for r in rows:
        f = flops_per_token(r["shape"], r["seq_len"])
        cells = []
        for impl in ("jax", "torch"):
            m = r.get(impl, {})
            tps = m.get("tokens_per_s")
            cells.append(f"{tps:9.0f} {tps * f / H100_BF16_PEAK:5.1%} {m['peak_gib']:5.1f}" if tps else
                         f"{'n/a' if not m else 'error':>9} {'':5} {'':5}")
        jt, tt = r.get("jax", {}).get("tokens_per_s"), r.get("torch", {}).get("tokens_per_s")
        ratio = f"{jt / tt:9.2f}" if jt and tt else f"{'':9}"
        print(f"{r['shape']:>5} {r['seq_len']:>6} | {cells[0]} | {cells[1]:>23} | {ratio}")


def torch_args(shape: str, seq_len: int, steps: int) -> list[str]:
    return ["torch_peer.py", f"--shape={shape}", f"--seq_len={seq_len}", f"--steps={steps}"]


def scaling(a, flags: list[str]) -> None:
    """The JAX step on 1, 2, 4, ... devices of this host, each count in its own process; the torch peer on one GPU
    for the --peer pairs; then the tables."""
    rows, peers = [], []
    for shape in a.shapes.split(","):
        for seq_len in map(int, a.seq_lens.split(",")):
            for n in map(int, a.scaling.split(",")):
                m = dict(run_one([__file__, f"--one={shape}:{seq_len}", f"--devices={n}", *flags], a.timeout),
                         shape=shape, seq_len=seq_len, devices=n)
                rows.append(m)
                print(json.dumps(m), flush=True)
    for pair in filter(None, a.peer.split(",")):
        shape, seq_len = pair.split(":")
        peers.append(dict(run_one(torch_args(shape, int(seq_len), a.steps), a.timeout), shape=shape,
                          seq_len=int(seq_len)))
        print(json.dumps(peers[-1]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"scaling": rows, "peer": peers}, f, indent=1)
    print(f"\nJAX train step, one row of seq tokens per device ({a.docs} sample(s) a row), attention "
          f"{a.attn_impl or 'xla'}, remat {a.remat_policy if a.remat else 'off'}")
    print(f"{'shape':>5} {'seq':>6} {'devices':>7} | {'tok/s':>9} {'tok/s/dev':>9} {'MFU':>5} {'GiB':>5} | "
          f"{'efficiency':>10}  device")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>5} {r['seq_len']:>6} {r['devices']:>7} | error: {r['error'][-300:]}")
            continue
        base = next((b for b in rows if b["shape"] == r["shape"] and b["seq_len"] == r["seq_len"]
                     and b["devices"] == 1 and "error" not in b), None)
        eff = f"{r['tokens_per_s_per_device'] / base['tokens_per_s_per_device']:10.1%}" if base else f"{'':10}"
        mfu = r["tokens_per_s_per_device"] * flops_per_token(r["shape"], r["seq_len"]) / H100_BF16_PEAK
        print(f"{r['shape']:>5} {r['seq_len']:>6} {r['devices']:>7} | {r['tokens_per_s']:9.0f} "
              f"{r['tokens_per_s_per_device']:9.0f} {mfu:5.1%} {r['peak_gib']:5.1f} | {eff}  {r['device_kind']}")
    if peers:
        peer_table(rows, peers)


def peer_table(rows: list[dict], peers: list[dict]) -> None:
    print(f"\n{'shape':>5} {'seq':>6} | {'torch tok/s':>11} {'GiB':>5} | {'jax 1-device tok/s':>18} | {'jax/torch':>9}")
    for p in peers:
        jax_one = next((r for r in rows if r["shape"] == p["shape"] and r["seq_len"] == p["seq_len"]
                        and r["devices"] == 1 and "error" not in r), {})
        if "error" in p:
            print(f"{p['shape']:>5} {p['seq_len']:>6} | torch error: {p['error'][-300:]}")
            continue
        jt = jax_one.get("tokens_per_s")
        print(f"{p['shape']:>5} {p['seq_len']:>6} | {p['tokens_per_s']:11.0f} {p['peak_gib']:5.1f} | "
              f"{jt or float('nan'):18.0f} | {jt / p['tokens_per_s'] if jt else float('nan'):9.2f}")


if __name__ == "__main__":
    main()
