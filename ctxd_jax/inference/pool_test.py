"""The pool's dispatch and fan-out, against in-process fakes of the clients (real servers: tests/test_hosts.py)."""

import asyncio

from ctxd_jax.inference.pool import ClientPool
from ctxd_jax.records import Completion


class Fake:
    def __init__(self, name, models=()):
        self.name, self.loaded, self.prompts = name, list(models), []
        self.release = asyncio.Event()

    async def sample(self, prompt_ids, n, **kwargs):
        self.prompts.append(list(prompt_ids))
        await self.release.wait()
        return [Completion([1], [0.0], "length")] * n

    async def models(self):
        return ["base", *self.loaded]

    async def load_adapter(self, name, path):
        assert name not in self.loaded
        self.loaded.append(name)

    async def unload_adapter(self, name):
        self.loaded.remove(name)


def test_requests_go_to_the_least_loaded_and_adapters_to_all():
    a, b = Fake("a"), Fake("b", models=["student-v0"])
    pool = ClientPool([a, b])

    async def go():
        first = [asyncio.create_task(pool.sample([g], 4, model="m")) for g in range(3)]
        await asyncio.sleep(0)
        assert (a.prompts, b.prompts) == ([[0], [2]], [[1]])  # 4, 4 samples in flight; then a again (tie)
        big = asyncio.create_task(pool.sample([3], 16, model="m"))
        await asyncio.sleep(0)
        assert b.prompts[-1] == [3]  # b had 4 in flight, a 8
        a.release.set(), b.release.set()
        out = await asyncio.gather(*first, big)
        assert [len(o) for o in out] == [4, 4, 4, 16] and pool.in_flight == [0, 0]
        assert "student-v0" in await pool.models()
        await pool.unload_adapter("student-v0")  # only where it is loaded
        await pool.load_adapter("student-v1", "/x")
        return a.loaded, b.loaded

    assert asyncio.run(go()) == (["student-v1"], ["student-v1"])
    # one request at a time (one group per batch): they alternate
    c, d = Fake("c"), Fake("d")
    c.release.set(), d.release.set()
    pool = ClientPool([c, d])
    for g in range(4):
        asyncio.run(pool.sample([g], 2, model="m"))
    assert (c.prompts, d.prompts) == ([[0], [2]], [[1], [3]])
