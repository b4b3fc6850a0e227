"""Weight hand-off from the trainer to the student servers, once per step.

Each version goes to a new folder `<root>/step_<n>` (the trainer writes it: a PEFT adapter or merged safetensors),
is loaded into every student server, and then all but the last `keep` folders are deleted. vLLM may reload an
adapter from its folder after evicting it, so the folder in use is never deleted. The teacher is untouched: it is
the base model name on a shared server (or its own server), which neither an adapter load nor anything here changes.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Sequence

from ctxd_jax.inference.client import Client

_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(os.path.abspath(root), f"step_{step:06d}")


def step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of every step folder under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return sorted(found)


def clean_old(root: str, keep: int = 2) -> list[str]:
    """Deletes all but the newest `keep` step folders; returns the deleted paths."""
    dirs = step_dirs(root)
    old = [p for _, p in dirs[:max(len(dirs) - keep, 0)]]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def new_step_dir(root: str, step: int) -> str:
    """An empty folder for version `step` (an existing one from an interrupted run is replaced)."""
    path = step_dir(root, step)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


async def publish_adapter(clients: Sequence[Client], name: str, path: str, *, root: str | None = None,
                          keep: int = 2) -> None:
    """Loads the adapter at `path` as `name` into every student server, then cleans old step folders in `root`."""
    await asyncio.gather(*(c.load_adapter(name, path) for c in clients))
    if root is not None:
        clean_old(root, keep)


async def publish_merged(clients: Sequence[Client], path: str, *, root: str | None = None, keep: int = 2,
                         version: str | None = None) -> None:
    """Reloads full weights from `path` into every student server (pause, reload, reset prefix cache, resume)."""
    await asyncio.gather(*(c.reload_weights(path, version=version) for c in clients))
    if root is not None:
        clean_old(root, keep)
