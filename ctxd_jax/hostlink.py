"""Process 0's link to the other processes: one TCP connection each, carrying pickled requests and their replies.

The connections are `multiprocessing.connection` ones, authenticated (HMAC challenge both ways) with a key made per
run: process 0 listens on an ephemeral port and hands the port and the key out through JAX's coordination service
(the key-value store every process joined in `jax.distributed.initialize`), so nothing but the coordinator address
is configured. A request names a lane: 'main' requests are run one at a time, in the order sent, on the follower's
main thread (trainer calls, checkpoints, adapter versions: the order is what keeps every process's collectives
aligned); 'server' requests (sampling) run concurrently beside them.

A process that dies ends the run: the others see its connection close and exit at once (a peer that is gone would
leave them waiting in a collective forever); every process restarts with `--config.ckpt.resume=true`.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import queue
import secrets
import socket
import sys
import threading
from concurrent.futures import Future
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from ctxd_jax.config import ConfigError

KEY = "ctxd/link"
EXIT_PEER_LOST = 3
JOIN_TIMEOUT_S = 300  # the followers connect right after jax.distributed.initialize, which already waited for them
STOP_TIMEOUT_S = 60  # for the followers to finish their last command once told to stop


class RemoteError(RuntimeError):
    """A request that failed in another process; the message names the process and its error."""


def _kv():
    from jax._src import distributed  # the coordination service's client (also what orbax's barriers use)

    return distributed.global_state.client


def coordinator_host() -> str:
    """The host of process 0 as the others reach it (the coordinator's address, also when JAX found it itself)."""
    from jax._src import distributed

    return distributed.global_state.coordinator_address.rsplit(":", 1)[0]


def _lost(who: str, detail: str) -> None:
    """Another process is gone or failed: collectives with it can never finish, so this process stops at once (an
    orderly exit would wait in jax.distributed's shutdown barrier for the others)."""
    print(f"error: {who} {detail}; every process stops (after a fix or a lost host, start them all again with "
          "--config.ckpt.resume=true)", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


class NotShared(ConfigError):
    """A follower does not see the run folder that process 0 writes; str() is 'output_dir: message'."""


def _reads(path: str, text: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == text
    except OSError:
        return False


class Leader:
    """Process 0's end: `call(process, lane, method, *args)` returns a Future of the follower's reply.

    Joining checks that every follower sees `shared_dir` (the run folder, where checkpoints go) as process 0 does."""

    def __init__(self, num_processes: int, host: str, shared_dir: str):
        self.key = secrets.token_bytes(32)
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._closing = False
        self.conns: dict[int, Connection] = {}
        self.hosts: dict[int, str] = {}
        marker, token = os.path.join(shared_dir, f".link-{secrets.token_hex(4)}"), secrets.token_hex(16)
        with open(marker, "w") as f:
            f.write(token)
        blind = []
        try:
            with socket.create_server(("", 0)) as server:
                server.settimeout(JOIN_TIMEOUT_S)
                _kv().key_value_set(KEY, json.dumps({"host": host, "port": server.getsockname()[1],
                                                     "key": self.key.hex()}))
                while len(self.conns) < num_processes - 1:
                    process, conn, hostname = self._join(server, marker, token)
                    self.conns[process], self.hosts[process] = conn, hostname
                    if not conn.recv():
                        blind.append(self.who(process))
        finally:
            os.remove(marker)
        verdict = None if not blind else (
            f"output_dir: {shared_dir} is not shared by every host ({', '.join(blind)} does not see process 0's "
            "files there); several processes need a run folder every host sees (checkpoints are written by all)")
        for conn in self.conns.values():
            conn.send(verdict)
        if verdict:
            raise NotShared(verdict)
        self._send_locks = {p: threading.Lock() for p in self.conns}
        for p, conn in self.conns.items():
            threading.Thread(target=self._read, args=(p, conn), name=f"link-{p}", daemon=True).start()

    def _join(self, server: socket.socket, marker: str, token: str) -> tuple[int, Connection, str]:
        while True:
            sock, _ = server.accept()
            sock.settimeout(None)
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, self.key)
                answer_challenge(conn, self.key)
                process, hostname = conn.recv()
            except (AuthenticationError, EOFError, OSError):  # not one of ours (it lacks the key)
                conn.close()
                continue
            conn.send((marker, token))  # the follower answers whether it reads the same file
            return process, conn, hostname

    @property
    def followers(self) -> list[int]:
        return sorted(self.conns)

    def who(self, process: int) -> str:
        return f"process {process} (host {self.hosts.get(process, '?')})"

    def call(self, process: int, lane: str, method: str, *args) -> Future:
        future: Future = Future()
        with self._lock:
            request = next(self._ids)
            self._pending[request] = future, lane
        try:
            with self._send_locks[process]:
                self.conns[process].send((request, lane, method, args))
        except OSError as e:
            _lost(self.who(process), f"cannot be reached ({e})")
        return future

    def _read(self, process: int, conn: Connection) -> None:
        while True:
            try:
                request, ok, value = conn.recv()
            except (EOFError, OSError) as e:
                if not self._closing:
                    _lost(self.who(process), f"closed its connection ({type(e).__name__})")
                return
            with self._lock:
                future, lane = self._pending.pop(request)
            if ok:
                future.set_result(value)
            elif lane == "main":  # its collectives are out of step with ours now (and it is exiting)
                _lost(self.who(process), f"failed: {value}")
            else:
                future.set_exception(RemoteError(f"{self.who(process)}: {value}"))

    def close(self) -> None:
        """Tells every follower to stop and waits until each has finished its last command."""
        self._closing = True
        stops = [self.call(p, "main", "stop") for p in self.followers]
        for future in stops:
            try:
                future.result(STOP_TIMEOUT_S)
            except Exception:  # a follower that cannot stop cleanly exits when its connection closes
                pass
        for conn in self.conns.values():
            conn.close()


class Follower:
    """A process > 0's end: `serve(main, server)` runs requests until process 0 says stop (or is gone)."""

    def __init__(self, process: int, hostname: str):
        """Joins process 0 (raises NotShared when this host does not see its run folder)."""
        link = json.loads(_kv().blocking_key_value_get(KEY, JOIN_TIMEOUT_S * 1000))
        key = bytes.fromhex(link["key"])
        sock = socket.create_connection((link["host"], link["port"]), timeout=JOIN_TIMEOUT_S)
        sock.settimeout(None)
        self.conn = Connection(sock.detach())
        answer_challenge(self.conn, key)
        deliver_challenge(self.conn, key)
        self.conn.send((process, hostname))
        marker, token = self.conn.recv()
        self.conn.send(_reads(marker, token))
        verdict = self.conn.recv()
        if verdict:
            raise NotShared(verdict)
        self._send_lock = threading.Lock()
        self._main: queue.Queue = queue.Queue()

    def reply(self, request: int, ok: bool, value) -> None:
        try:
            payload = pickle.dumps((request, ok, value))
        except Exception as e:  # an unpicklable result or error: its text still reaches process 0
            payload = pickle.dumps((request, False, f"{value!r} (not picklable: {e})"))
        with self._send_lock:
            self.conn.send_bytes(payload)

    def serve(self, main, server) -> None:
        """`main(method, *args)` runs each 'main' request on this thread, in order; `server(method, args, done)`
        starts a 'server' request and calls `done(ok, value)` when it ends. Returns after 'stop'."""
        threading.Thread(target=self._read, args=(server,), name="link", daemon=True).start()
        while True:
            request, method, args = self._main.get()
            if method == "stop":
                self.reply(request, True, None)
                return
            try:
                self.reply(request, True, main(method, *args))
            except Exception as e:
                # The collectives of the processes may now be out of step: report, then end the run.
                self.reply(request, False, f"{type(e).__name__}: {e}")
                raise

    def _read(self, server) -> None:
        while True:
            try:
                request, lane, method, args = self.conn.recv()
            except (EOFError, OSError) as e:
                _lost("process 0", f"closed its connection ({type(e).__name__})")
                return
            if lane == "main":
                self._main.put((request, method, args))
                if method == "stop":
                    return
            else:
                server(method, args, lambda ok, value, request=request: self.reply(request, ok, value))
