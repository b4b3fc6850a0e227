"""Several student servers behind the calls the loop makes of one: sampling spread over them, adapters on all.

Each sampling request goes to the server with the fewest samples in flight (ties: the one sent fewest requests so
far), so the groups of a batch spread evenly, and so do one-group batches over the steps. Adapter loads and unloads go to every server and return when all are done: the Publisher
awaits a version's load before any request names it, so every server holds a version before it is sampled.
A member is anything with the Client calls used here (ctxd_jax/multihost.py's stand-in for another host's server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ctxd_jax.records import Completion


class ClientPool:
    def __init__(self, clients: Sequence):
        self.clients = list(clients)
        self.in_flight = [0] * len(self.clients)  # samples
        self.requests = [0] * len(self.clients)  # sampling requests sent

    async def sample(self, prompt_ids: Sequence[int], n: int, **kwargs) -> list[Completion]:
        i = min(range(len(self.clients)), key=lambda k: (self.in_flight[k], self.requests[k], k))
        self.in_flight[i] += n
        self.requests[i] += 1
        try:
            return await self.clients[i].sample(prompt_ids, n, **kwargs)
        finally:
            self.in_flight[i] -= n

    async def models(self) -> list[str]:
        """Served by any of them."""
        names = await asyncio.gather(*(c.models() for c in self.clients))
        return list(dict.fromkeys(name for served in names for name in served))

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.gather(*(c.load_adapter(name, path) for c in self.clients))

    async def unload_adapter(self, name: str) -> None:
        async def one(client):
            if name in await client.models():
                await client.unload_adapter(name)

        await asyncio.gather(*(one(c) for c in self.clients))

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))
