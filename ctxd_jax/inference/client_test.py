"""Parsing vLLM completion and prompt-log-prob responses; a request's time bound."""

import asyncio

import pytest

from ctxd_jax.inference.client import Client, RequestError, parse_completions, parse_prompt_logprobs


def test_parse_completions():
    body = {"choices": [
        {"index": 1, "finish_reason": "stop", "token_ids": [7, 2],
         "logprobs": {"tokens": ["token_id:7", "token_id:2"], "token_logprobs": [-1.0, -0.5]}},
        {"index": 0, "finish_reason": "length", "token_ids": None,
         "logprobs": {"tokens": ["token_id:9"], "token_logprobs": [-2.0]}}]}
    a, b = parse_completions(body)
    assert (a.token_ids, a.logprobs, a.finish_reason) == ([9], [-2.0], "length")
    assert (b.token_ids, b.logprobs, b.finish_reason) == ([7, 2], [-1.0, -0.5], "stop")
    (c,) = parse_completions({"choices": [{"index": 0, "finish_reason": "length", "token_ids": [4, 3],
                                           "logprobs": None}]})
    assert (c.token_ids, c.logprobs) == ([4, 3], None)  # not asked for
    body["choices"][0]["token_ids"] = [7]
    with pytest.raises(RequestError, match="1 token ids but 2 log-probs"):
        parse_completions(body)


def test_parse_prompt_logprobs_aligns_and_ranks_topk():
    ids = [1, 5, 6]
    pl = [None,
          {"5": {"logprob": -3.0, "rank": 4}, "8": {"logprob": -0.5, "rank": 1}, "9": {"logprob": -1.0, "rank": 2}},
          {"6": {"logprob": -0.2, "rank": 1}, "4": {"logprob": -2.0, "rank": 2}}]
    lps, top = parse_prompt_logprobs(pl, ids, 1, topk=2)
    assert lps == [-3.0, -0.2] and top == ([[8, 9], [6, 4]], [[-0.5, -1.0], [-0.2, -2.0]])
    assert parse_prompt_logprobs(pl, ids, 2, topk=0) == ([-0.2], None)
    with pytest.raises(ValueError, match="start must be >= 1"):
        parse_prompt_logprobs(pl, ids, 0, topk=0)
    with pytest.raises(RequestError, match="2 entries for 3"):
        parse_prompt_logprobs(pl[:2], ids, 1, topk=0)


def test_scoring_gate_runs_a_score_alone():
    import asyncio

    from ctxd_jax.inference.client import ScoringGate

    gate, running, seen = ScoringGate(), set(), []

    async def req(name, alone):
        async with gate.enter(alone):
            running.add(name)
            seen.append(set(running))
            await asyncio.sleep(0.01)
            running.discard(name)

    async def main():
        await asyncio.gather(req("a", False), req("b", False), req("score", True), req("c", False))

    asyncio.run(main())
    assert {"a", "b"} in seen and {"score"} in seen  # samples side by side, the score alone
    assert not any("score" in s and len(s) > 1 for s in seen)


@pytest.mark.parametrize("gpu_ids", [None, (0,)])
def test_scores_alone_on_every_lora_server(gpu_ids):
    """CPU and GPU alike: a LoRA-enabled engine may die on a prompt-log-prob request batched with others."""
    from ctxd_jax.inference.client import Client
    from ctxd_jax.inference.server import VLLMServer

    def client(lora_rank):  # a server object only: nothing is started
        return Client.for_server(VLLMServer("/nonexistent", gpu_ids=gpu_ids, lora_rank=lora_rank))

    assert client(8).serial_scoring and not client(0).serial_scoring


async def _silent_server():
    """An HTTP server that answers GET /health and never answers anything else (a server stuck on a request)."""

    async def handle(reader, writer):
        line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if line.startswith(b"GET /health"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
        else:
            await asyncio.sleep(3600)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_a_request_waits_for_the_work_sent_after_it():
    """A request's bound grows with the work sent after it (the server batches it all), not only what came before."""

    async def main():
        server, url = await _silent_server()
        client = Client(url, timeout=1.0, retries=0)
        try:
            first = asyncio.create_task(client.request("POST", "/v1/completions", json={}))
            await asyncio.sleep(0.2)
            later = asyncio.create_task(client.request("POST", "/v1/completions", json={}, work=2.0))
            errors = await asyncio.gather(first, later, return_exceptions=True)
        finally:
            await client.aclose()
            server.close()
        return [str(e) for e in errors]

    first, later = asyncio.run(main())
    assert first.endswith("did not answer POST /v1/completions within 3 s"), first
    assert later.endswith("did not answer POST /v1/completions within 3 s"), later
