"""The training loop over several processes, one per host (which process runs what: ctxd_jax/hosts.py).

Process 0 runs `loop.run` with a `Lead`: its Trainer and Checkpointer become stand-ins that first send every other
process the same call (a train step with that process's own rows of the batch; a scoring call, teacher or behaviour
log-probs, with its sequences and which LoRA state to score under), all under one lock, so every process makes the
same collective calls in the same order; its student client becomes a pool over its own server and one stand-in per
other process, which forwards sampling requests to that process's server and has that process write and load each
adapter version itself. Every other process runs `follow`: it starts its server, loads its shard of the trainer and
then does what process 0 sends (`Worker`), until process 0 says stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import shutil
import socket
import sys
import threading
import weakref

from ctxd_jax import hostlink, hosts, loop, rundir
from ctxd_jax.checkpoint import CheckpointError, Checkpointer
from ctxd_jax.inference.deploy import build_servers
from ctxd_jax.inference.handoff import load_adapter, write_fresh


def run(config, plan, settings: hosts.Settings, stop: threading.Event) -> None:
    """The run of this process: the whole loop for one process, else process 0's (`stop` ends the run of all) or a
    follower's part, once `distributed.initialize(settings)` has joined them. With several processes, a run that
    fails must end with `exit_now`."""
    if not settings.several:
        return loop.run(config, plan, stop)
    out = rundir.run_path(config)
    if settings.leader:
        os.makedirs(out, exist_ok=True)
        link = hostlink.Leader(settings.num_processes, hostlink.coordinator_host(), out)
        loop.run(config, plan, stop, lead=Lead(link))
        link.close()  # the followers finish and exit; all meet in the shutdown barrier
    else:
        follow(config, plan, settings, out, hostlink.Follower(settings.process_id, socket.gethostname()))


def exit_now(status: int) -> None:
    """Ends a process of several that failed: the others may be waiting in a collective for it, so it exits at once
    (they see the link close and stop too) rather than in jax.distributed's shutdown barrier, which would wait
    minutes for them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class Lead:
    """Process 0's side: what `loop.run` swaps in for its trainer, student client and checkpointer."""

    def __init__(self, link: hostlink.Leader):
        self.link = link
        self._lock = threading.Lock()  # one collective call at a time, sent in the order it runs here

    def mirror(self, method: str, args_of, local):
        """Sends `method` with `args_of(process)` to every other process, then runs `local()` here; returns its
        result once every process has done its part."""
        with self._lock:
            sent = [self.link.call(p, "main", method, *args_of(p)) for p in self.link.followers]
            result = local()
        for reply in sent:
            reply.result()
        return result

    def attach(self, deployment, trainer):
        """(deployment, trainer, checkpointer factory) for the loop: the other hosts' servers join the student
        client's pool; trainer and checkpoint calls reach every process."""
        remote = [RemoteStudent(self.link, p) for p in self.link.followers]
        return dataclasses.replace(deployment, remote_students=remote), LeadTrainer(trainer, self), self.checkpointer

    def checkpointer(self, config) -> "LeadCheckpointer":
        """The run's checkpointer, opened in every process."""
        return rundir.checkpointer(config, make=lambda directory, **kw: LeadCheckpointer(self, directory, **kw))


class Lora:
    """A LoRA state the loop scores under, by name in every process: `key` 'base' (LoRA off: each process's
    Trainer.base_lora()) or a snapshot's number; `state` this process's copy (None for 'base')."""

    def __init__(self, key, state=None):
        self.key, self.state = key, state


BASE = Lora("base")


class LeadTrainer:
    """Process 0's Trainer: `step`, `logprobs`, `snapshot_lora` and `score` run on every process's devices, each
    process given its own rows of a train batch; a snapshot is kept by every process until process 0's is dropped."""

    def __init__(self, trainer, lead: Lead):
        self._trainer, self._lead = trainer, lead
        self._keys = itertools.count()
        self._snapshots = weakref.WeakValueDictionary()  # key -> a Lora of a snapshot still referenced here

    def __getattr__(self, name):  # everything else is this process's own (row_multiple, model(), state_arrays())
        return getattr(self._trainer, name)

    def step(self, batch):
        return self._rows("step", batch)

    def logprobs(self, batch):
        return self._rows("logprobs", batch)

    def _rows(self, method: str, batch):
        t = self._trainer
        return self._lead.mirror(f"trainer.{method}", lambda p: (t.share(batch, p),),
                                 lambda: getattr(t, method)(t.share(batch, 0)))

    def snapshot_lora(self) -> Lora:
        """A snapshot in every process; the others drop theirs of snapshots no longer referenced here."""
        key, alive = next(self._keys), sorted(self._snapshots)
        snap = self._lead.mirror("trainer.snapshot", lambda p: (key, alive),
                                 lambda: Lora(key, self._trainer.snapshot_lora()))
        self._snapshots[key] = snap
        return snap

    def base_lora(self) -> Lora:
        return BASE

    def score(self, seqs, *, lora: Lora, **kwargs):
        state = self._trainer.base_lora if lora is BASE else (lambda: lora.state)
        return self._lead.mirror("trainer.score", lambda p: (seqs, lora.key, kwargs),
                                 lambda: self._trainer.score(seqs, lora=state(), **kwargs))


class LeadCheckpointer:
    """Process 0's Checkpointer: every process opens, saves, restores and closes its own with it (orbax: each
    process writes its shards into the shared folder; the JSON metadata, the loop's RunState, only process 0)."""

    def __init__(self, lead: Lead, directory: str, *, keep: int, config: dict | None):
        self._lead, self.directory = lead, directory
        self._inner = self._lead.mirror("ckpt.open", lambda p: (directory, keep),
                                        lambda: Checkpointer(directory, keep=keep, config=config))

    def latest_step(self) -> int | None:
        return self._inner.latest_step()

    def steps(self) -> list[int]:
        return self._inner.steps()

    def save(self, step: int, arrays, meta: dict) -> str:
        return self._lead.mirror("ckpt.save", lambda p: (step,), lambda: self._inner.save(step, arrays, meta))

    def restore(self, target, step: int | None = None):
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        return self._lead.mirror("ckpt.restore", lambda p: (step,), lambda: self._inner.restore(target, step))

    def close(self) -> None:
        self._lead.mirror("ckpt.close", lambda p: (), self._inner.close)


class RemoteStudent:
    """Another process's student server, as a member of process 0's ClientPool."""

    def __init__(self, link: hostlink.Leader, process: int):
        self.link, self.process = link, process

    async def _call(self, lane: str, method: str, *args):
        return await asyncio.wrap_future(self.link.call(self.process, lane, method, *args))

    async def sample(self, prompt_ids, n: int, **kwargs):
        return await self._call("server", "sample", list(prompt_ids), n, kwargs)

    async def models(self) -> list[str]:
        return await self._call("server", "models")

    async def load_adapter(self, name: str, path: str) -> None:
        # In order after the trainer step it follows: that process writes the version from its own weights.
        await self._call("main", "adapter.load", name, os.path.basename(path))

    async def unload_adapter(self, name: str) -> None:
        await self._call("main", "adapter.unload", name)

    async def aclose(self) -> None:
        pass


class Worker:
    """A follower's part: trainer calls on its rows, checkpoints, adapter versions of its own server ('main'
    requests, in order, on the calling thread) and sampling requests to its server (concurrently, on its own event
    loop)."""

    def __init__(self, config, trainer, deployment, weights_root: str):
        self.trainer, self.root = trainer, weights_root
        self.write = loop.weights_writer(config, trainer)
        self.client = deployment.student_client()
        self.ckpt: Checkpointer | None = None
        self.snapshots: dict[int, object] = {}  # process 0's snapshot numbers -> this process's LoRA snapshots
        self.folders: dict[str, str] = {}  # adapter name -> its folder
        self.served = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="worker-loop", daemon=True).start()

    def _wait(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def main(self, method: str, *args):
        part, _, name = method.partition(".")
        if part == "trainer" and name in ("step", "logprobs"):
            getattr(self.trainer, name)(*args)  # the results are process 0's
        elif method == "trainer.snapshot":
            key, alive = args
            self.snapshots = {k: v for k, v in self.snapshots.items() if k in alive}
            self.snapshots[key] = self.trainer.snapshot_lora()
        elif method == "trainer.score":
            seqs, key, kwargs = args
            lora = self.trainer.base_lora() if key == BASE.key else self.snapshots[key]
            self.trainer.score(seqs, lora=lora, **kwargs)
        elif method == "ckpt.open":
            self.ckpt = Checkpointer(args[0], keep=args[1])
        elif method == "ckpt.save":
            self.ckpt.save(args[0], self.trainer.state_arrays(), {})  # the metadata is process 0's to write
        elif method == "ckpt.restore":
            arrays, _ = self.ckpt.restore(self.trainer.state_arrays(), args[0])
            self.trainer.load_state_arrays(arrays)
        elif method == "ckpt.close":
            self.ckpt.close()
        elif method == "adapter.load":
            name, folder = args
            path = os.path.join(self.root, folder)
            write_fresh(path, self.write)
            self._wait(load_adapter(self.client, name, path))
            self.folders[name] = path
        elif method == "adapter.unload":
            self._wait(self.client.unload_adapter(args[0]))
            shutil.rmtree(self.folders.pop(args[0]), ignore_errors=True)
        else:
            raise ValueError(f"unknown request {method!r}")

    def server(self, method: str, args, done) -> None:
        if method == "sample":
            prompt_ids, n, kwargs = args
            self.served += 1
            coro = self.client.sample(prompt_ids, n, **kwargs)
        elif method == "models":
            coro = self.client.models()
        else:
            done(False, f"unknown request {method!r}")
            return

        def reply(future):
            error = future.exception()
            done(error is None, future.result() if error is None else f"{type(error).__name__}: {error}")

        asyncio.run_coroutine_threadsafe(coro, self.loop).add_done_callback(reply)

    def close(self) -> None:
        self._wait(self.client.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)


def follow(config, plan, settings: hosts.Settings, out: str, link: hostlink.Follower) -> None:
    """Process `settings.process_id` > 0: its student server and trainer shard, driven by process 0 until it stops."""
    p = settings.process_id
    mine, local = hosts.process_dir(out, p), hosts.local_plan(config, plan, p)
    deployment = build_servers(config, local, log_dir=os.path.join(mine, "logs"), cpu_core=p % (os.cpu_count() or 1))
    try:
        trainer, _ = loop.start(config, local, deployment)
        worker = Worker(config, trainer, deployment, os.path.join(mine, "weights"))
        link.serve(worker.main, worker.server)
        worker.close()
        print(f"process {p}: stopped by process 0; served {worker.served} sampling requests", file=sys.stderr)
    finally:
        deployment.group.stop()
