"""Where a run's processes ran and what its student server did, read from outside the run (bench/layouts.py).

`Monitor(pid)` polls, while the command-line run `pid` lives, its process tree (/proc) and `nvidia-smi`: each
process's role, its CUDA_VISIBLE_DEVICES and the most memory it held on each GPU. `adapter_evidence(run_dir)` reads
the run's vLLM logs: the adapters each server loaded and unloaded, and which of its engines generated tokens.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import threading

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LOADED = re.compile(r"Loaded new LoRA adapter: name '([^']+)'")
REMOVED = re.compile(r"Removed LoRA adapter: name '([^']+)'")
# vLLM's periodic per-engine stats line; an engine that generated shows a non-zero rate.
ENGINE_RATE = re.compile(r"Engine (\d+): .*Avg generation throughput: ([\d.]+) tokens/s")


def _read(path: str, binary: bool = False):
    try:
        with open(path, "rb" if binary else "r") as f:
            return f.read()
    except OSError:
        return None


def process_tree(root: int) -> dict[int, int]:
    """{pid: parent pid} of `root` and every live descendant (servers run in sessions of their own but stay its
    children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        stat = _read(f"/proc/{entry}/stat") if entry.isdigit() else None
        if stat:
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = {root: 0}, [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out[child] = pid
            todo.append(child)
    return out


def cmdline(pid: int) -> list[str]:
    raw = _read(f"/proc/{pid}/cmdline", binary=True) or b""
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def visible_devices(pid: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES a process started with (a process that sets it later, as the trainer does before JAX
    starts, still shows the inherited value here)."""
    raw = _read(f"/proc/{pid}/environ", binary=True) or b""
    for item in raw.split(b"\0"):
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return item.split(b"=", 1)[1].decode()
    return None


def role(pid: int, root: int, servers: dict[int, str]) -> str:
    """A readable role: the run itself (the trainer), a vLLM server by its served name, or a server's worker."""
    args = cmdline(pid)
    if pid == root:
        return "CLI + JAX trainer"
    if SERVER_MODULE in args:
        served = next((a.split("=", 1)[1] for a in args if a.startswith("--served-model-name=")), "?")
        servers[pid] = {"base": "student server", "teacher": "teacher server"}.get(served, f"server {served}")
        return servers[pid]
    comm = (_read(f"/proc/{pid}/comm") or "").strip()  # vLLM names its engine cores (VLLM::EngineCore...)
    return comm if comm and not comm.startswith("python") else " ".join(args)[:40] or "?"


def gpu_table() -> tuple[dict[str, int], dict[int, int]] | None:
    """({uuid: index}, {index: memory.used MiB}) from nvidia-smi, or None without it."""
    out = _smi("--query-gpu=index,uuid,memory.used")
    if out is None:
        return None
    index, used = {}, {}
    for line in out:
        i, uuid, mem = (x.strip() for x in line.split(","))
        index[uuid], used[int(i)] = int(i), int(mem)
    return index, used


def compute_apps() -> list[tuple[int, str, int]]:
    """(pid, gpu uuid, used MiB) of every process on a GPU (pids as this namespace sees them, or the host's)."""
    rows = []
    for line in _smi("--query-compute-apps=pid,gpu_uuid,used_memory") or []:
        pid, uuid, mem = (x.strip() for x in line.split(","))
        if pid.isdigit():
            rows.append((int(pid), uuid, int(mem) if mem.isdigit() else 0))
    return rows


def _smi(query: str) -> list[str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [line for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else None


class Monitor:
    """Polls the run `root` every `interval` seconds until `stop()`; `report()` describes what it saw."""

    def __init__(self, root: int, devices: list[str], interval: float = 5.0):
        self.root, self.interval = root, interval
        self.gpus = [int(d) for d in devices if d.isdigit()]  # nvidia-smi's indexes of the run's GPUs
        self.roles: dict[int, str] = {}
        self.parent: dict[int, int] = {}
        self.env: dict[int, str | None] = {}
        self.servers: dict[int, str] = {}
        self.peak: dict[tuple[int, int], int] = {}  # (pid, gpu index) -> MiB
        self.gpu_peak: dict[int, int] = {}
        self.others: dict[tuple[int, int], int] = {}  # GPU processes outside this run's tree
        self.smi = shutil.which("nvidia-smi") is not None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "Monitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def pids(self) -> list[int]:
        return list(self.roles)

    def _loop(self) -> None:
        while True:
            self.poll()
            if self._done.wait(self.interval):
                return

    def poll(self) -> None:
        tree = process_tree(self.root)
        for pid, ppid in tree.items():
            if pid not in self.roles:
                self.roles[pid] = role(pid, self.root, self.servers)
                self.env[pid], self.parent[pid] = visible_devices(pid), ppid
        table = gpu_table() if self.smi else None
        if table is None:
            return
        index, used = table
        for gpu in self.gpus:
            self.gpu_peak[gpu] = max(self.gpu_peak.get(gpu, 0), used.get(gpu, 0))
        # a pid once in the tree stays the run's: an engine core outlives its server by a moment when it shuts down
        for pid, uuid, mem in compute_apps():
            key = (pid, index.get(uuid, -1))
            target = self.peak if pid in self.roles else self.others
            target[key] = max(target.get(key, 0), mem)

    def report(self) -> list[str]:
        lines = ["processes (role, CUDA_VISIBLE_DEVICES at start (the trainer sets its own: the plan's), peak MiB per "
                 "GPU from nvidia-smi):"]
        for pid, name in self.roles.items():
            mem = ", ".join(f"GPU {g}: {m:,}" for (p, g), m in sorted(self.peak.items()) if p == pid)
            # the run, its servers and their own children (engine cores), and whatever held GPU memory
            if mem or pid == self.root or pid in self.servers or self.parent.get(pid) in self.servers:
                lines.append(f"  pid {pid:>7} {name[:40]:40s} CVD={self.env.get(pid)!s:8s} {mem or '-'}")
        if not self.smi:
            lines.append("  (no nvidia-smi: no GPU memory)")
        elif not self.peak:
            lines.append("  (nvidia-smi listed none of this run's pids: another pid namespace? see the GPU peaks)")
        if self.gpu_peak:
            lines.append("GPU memory.used peak (MiB, every process on it): "
                         + ", ".join(f"GPU {g}: {m:,}" for g, m in sorted(self.gpu_peak.items())))
        if self.others:
            lines.append("GPU processes outside this run: "
                         + ", ".join(f"pid {p} GPU {g} {m:,}" for (p, g), m in sorted(self.others.items())))
        return lines


def adapter_evidence(run_dir: str, versions: list[int]) -> list[str]:
    """Per vLLM server log of the run: adapters loaded / unloaded, engines that generated; against the policy
    versions the run's steps logged (`versions`)."""
    lines = [f"policy versions published by the steps (metrics.jsonl): {versions or 'none'}"]
    for path in server_logs(run_dir):
        text = _read(path) or ""
        loaded, removed = LOADED.findall(text), REMOVED.findall(text)
        engines: dict[int, float] = {}
        for engine, rate in ENGINE_RATE.findall(text):
            engines[int(engine)] = max(engines.get(int(engine), 0.0), float(rate))
        name = os.path.basename(path)[len("vllm-"):-len(".log")]
        lines.append(f"  {name}: loaded {_names(loaded)}; unloaded {_names(removed)}")
        if name.startswith("student"):  # version 0 is published before the first step
            missing = [f"student-v{v}" for v in [0, *versions] if f"student-v{v}" not in loaded]
            lines.append(f"    every published version loaded: {'yes' if not missing else 'NO, missing ' + str(missing)}")
        if engines:
            lines.append("    engines, peak generation tokens/s: "
                         + ", ".join(f"engine {e}: {r:,.0f}" for e, r in sorted(engines.items())))
        elif loaded:
            lines.append("    no per-engine throughput lines in the log")
    return lines


def server_logs(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "logs", "vllm-*.log")))


def tail_lines(path: str, n: int) -> list[str]:
    return (_read(path) or "").splitlines()[-n:]


def _names(names: list[str]) -> str:
    return f"{len(names)} [{', '.join(names)}]" if names else "none"
