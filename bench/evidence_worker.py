"""What a bench/evidence.py worker keeps across its runs: its vLLM server (`WorkerServer`: fixed settings, replaced by
a fresh process when it dies, since a crash in one request's batch should cost that run, not every run left; and what
its log says when a run fails), and its compiled steps (JAX's compilation cache, shared by the workers).

A dead server's log is kept beside the new one's (vllm-w0.log becomes vllm-w0.crash1.log, the next free number), so
that the record of why it died survives the restart and later commands.
"""

import os
import re
import time

from ctxd_jax.inference.server import ServerGroup, VLLMServer, tail

# A line that names an error: "RuntimeError: CUDA error: ...", "torch.AcceleratorError: ...", "CUDA error: ...".
# Not C++ stack frames such as "c10::Error::Error(...)", which is all the tail of a CUDA crash shows.
ERROR_LINE = re.compile(r"\w*(?:Error|Exception):(?!:)|\berror:(?!:)")
ERROR_CHARS, TAIL_LINES, TAIL_CHARS = 300, 5, 500  # what a row of results.json keeps of a server's log


def first_error_line(text: str) -> str | None:
    return next((line.strip()[:ERROR_CHARS] for line in text.splitlines() if ERROR_LINE.search(line)), None)


def crash_log(log_path: str) -> str:
    """The first free name for a dead server's log: vllm-w0.log -> vllm-w0.crash1.log, .crash2.log, ..."""
    base, ext = os.path.splitext(log_path)
    n = 1
    while os.path.exists(f"{base}.crash{n}{ext}"):
        n += 1
    return f"{base}.crash{n}{ext}"


class WorkerServer:
    """`with WorkerServer(make, restarts, timeout) as ws:` starts `make()` (a VLLMServer, the same settings every
    call) and stops the current one at the end; `ws.restart()` replaces a dead one, at most `restarts` times.
    `start_s` is the longest start-up so far (a restart costs about that much of the command's time)."""

    def __init__(self, make, restarts: int, timeout: float):
        self.make, self.restarts_left, self.timeout = make, restarts, timeout
        self.server: VLLMServer | None = None
        self.start_s = 0.0

    def _start(self) -> None:
        t = time.monotonic()
        self.server = ServerGroup([self.make()], timeout=self.timeout).start().servers[0]
        self.start_s = max(self.start_s, time.monotonic() - t)

    def restart(self) -> str:
        """A fresh server in place of the dead one; returns where the dead one's log was moved."""
        self.server.stop()  # what is left of its process group (an engine core may outlive the API server)
        crash = crash_log(self.server.log_path)
        os.replace(self.server.log_path, crash)
        self.restarts_left -= 1
        self._start()
        return crash

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.server.log_path)
        except OSError:
            return 0

    def failure(self, since: int) -> dict:
        """What the server's log says about a failed run (its log from byte `since` on): the first line that names an
        error, and the last lines when the server died. Small: they go into the run's row."""
        try:
            with open(self.server.log_path, "rb") as f:
                f.seek(since)
                line = first_error_line(f.read().decode("utf-8", "replace"))
        except OSError:
            line = None
        out = {"server_error": line} if line else {}
        if not self.server.alive():
            out["server_tail"] = tail(self.server.log_path, TAIL_LINES)[-TAIL_CHARS:]
        return out

    def __enter__(self) -> "WorkerServer":
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()


def use_compile_cache(folder: str) -> None:
    """JAX keeps every compiled executable in `folder` (before the first compile): a fresh trainer of the same shapes,
    in this process or another, loads its steps instead of compiling them."""
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # small steps are worth keeping too


class CompileCounter:
    """Counts XLA compilations (and loads from the compilation cache) through jax.monitoring's events."""

    def __init__(self):
        from jax import monitoring

        self.counts = {"compiles": 0, "cache_hits": 0, "compile_s": 0.0}
        monitoring.register_event_listener(self._event)
        monitoring.register_event_duration_secs_listener(self._duration)

    def _event(self, name: str, **_):
        if name.endswith("/compilation_cache/cache_hits"):
            self.counts["cache_hits"] += 1

    def _duration(self, name: str, secs: float, **_):
        if name.endswith("/compile/backend_compile_duration"):
            self.counts["compiles"] += 1
            self.counts["compile_s"] += secs

    def since(self, before: dict) -> dict:
        """Compilations since `before` (a copy of counts); a cache hit is counted as a load, not a compile."""
        d = {k: self.counts[k] - before[k] for k in self.counts}
        return {"compiles": d["compiles"] - d["cache_hits"], "cache_hits": d["cache_hits"],
                "compile_s": round(d["compile_s"], 2)}
