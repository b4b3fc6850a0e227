"""Weight hand-off from the trainer to the student servers: one folder and one served name per policy version.

Adapter mode: version v is written to `<root>/step_<v>` and loaded into every student server once, under its own
name `<prefix>-v<v>`; requests name the version they sample from, so a batch pinned to an older version keeps
sampling it while newer ones load. A version no batch needs any more is unloaded and its folder deleted. vLLM may
re-read an adapter from its folder after evicting it from its cache, so a loaded version's folder stays.
Merged mode: the servers hold one version at a time (full-weight reload under the base name); the caller publishes a
version only once no request needs the previous one.
Only folders this run wrote are ever deleted; the final version is also exported to a stable folder by the loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterable, Sequence

from ctxd_jax.inference.client import Client


def step_dir(root: str, step: int) -> str:
    return os.path.join(os.path.abspath(root), f"step_{step:06d}")


def write_fresh(path: str, write: Callable[[str], object]) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a same-numbered folder of an interrupted attempt at this version
    os.makedirs(path)
    write(path)


async def load_adapter(client: Client, name: str, path: str) -> None:
    if name in await client.models():  # left by an earlier run on a server that outlived it
        await client.unload_adapter(name)
    await client.load_adapter(name, path)


class Publisher:
    """Publishes policy versions to `clients` (the student servers) and retires those no longer needed.

    `write(path)` writes the current weights into an empty folder (adapter or merged safetensors)."""

    def __init__(self, clients: Sequence[Client], root: str, write: Callable[[str], object], *, merged: bool,
                 prefix: str, base_name: str):
        self.clients, self.root, self.write = list(clients), os.path.abspath(root), write
        self.merged, self.prefix, self.base_name = merged, prefix, base_name
        self.loaded: dict[int, str] = {}  # version -> folder, in publishing order

    def model(self, version: int) -> str:
        """The served model name that samples `version`."""
        return self.base_name if self.merged else f"{self.prefix}-v{version}"

    def path(self, version: int) -> str:
        return step_dir(self.root, version)

    @property
    def latest(self) -> int | None:
        return next(reversed(self.loaded), None)

    async def publish(self, version: int) -> str:
        """Writes the current weights as `version` and makes every student server serve them; returns the folder."""
        path = self.path(version)
        await asyncio.to_thread(write_fresh, path, self.write)
        if self.merged:
            await asyncio.gather(*(c.reload_weights(path) for c in self.clients))
        else:
            await asyncio.gather(*(load_adapter(c, self.model(version), path) for c in self.clients))
        self.loaded[version] = path
        return path

    async def retire(self, keep: Iterable[int]) -> list[int]:
        """Unloads (adapter mode) and deletes every published version not in `keep` but the latest; returns them."""
        keep = set(keep) | {self.latest}
        old = [v for v in self.loaded if v not in keep]
        for v in old:
            if not self.merged:
                await asyncio.gather(*(c.unload_adapter(self.model(v)) for c in self.clients))
            shutil.rmtree(self.loaded.pop(v), ignore_errors=True)
        return old
