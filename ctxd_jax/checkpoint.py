"""Orbax checkpoints of a run: arrays (LoRA, optimizer state) plus JSON metadata (step, RNG key, data position, and
the run's resolved config, so a resume can tell what changed).

Orbax writes each step into a temporary folder and renames it when complete, so the latest step it lists is the
latest COMPLETE checkpoint; a run killed mid-save leaves only a temporary folder that is ignored.
"""

from __future__ import annotations

import os
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath

from ctxd_jax.finite import nonfinite_leaves


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    """`save(step, arrays, meta)` / `restore(target)`; keeps the newest `keep` checkpoints under `directory`.
    `config` (the run's resolved config as a dict) is stored in every checkpoint's metadata under "config"."""

    def __init__(self, directory: str, *, keep: int = 2, config: dict | None = None):
        self.directory = os.path.abspath(directory)
        self.config = config
        options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("arrays", "meta"))

    def latest_step(self) -> int | None:
        self._manager.reload()
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, arrays, meta: dict) -> str:
        """Blocking save; overwrites nothing (a step already saved is skipped). Returns the step folder."""
        if step not in self._manager.all_steps():
            meta = dict(meta, step=step, **({} if self.config is None else {"config": self.config}))
            self._manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                             meta=ocp.args.JsonSave(meta)))
            self._manager.wait_until_finished()
        return os.path.join(self.directory, str(step))

    def restore(self, target, step: int | None = None):
        """(arrays, meta) of `step` (default: the latest complete one). `target` gives the tree structure, shapes,
        dtypes and shardings (concrete arrays or jax.ShapeDtypeStruct with .sharding)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        abstract = jax.tree.map(_abstract, target)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; name the folder and the step
            raise CheckpointError(f"{self.directory}/{step}: cannot restore ({type(e).__name__}: "
                                  f"{_first_line(e)})") from e
        return out["arrays"], out["meta"]

    def meta(self, step: int) -> dict:
        """The JSON metadata of `step` alone (no arrays are read)."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types; name the folder and the step
            raise CheckpointError(f"{self.directory}/{step}: cannot read its metadata ({type(e).__name__}: "
                                  f"{_first_line(e)})") from e

    def check_arrays(self, step: int) -> None:
        """Reads every array of `step` onto this process's first device, whatever processes and devices wrote it;
        CheckpointError naming it when one cannot be read or holds a non-finite number."""
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        try:
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory, str(step), "arrays")).tree
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved)
            arrays = self._manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # orbax raises many types (for the metadata too); name the folder and the step
            raise CheckpointError(f"{self.directory}/{step}: cannot restore ({type(e).__name__}: "
                                  f"{_first_line(e)})") from e
        if bad := nonfinite_leaves(arrays["arrays"]):
            raise CheckpointError(f"{self.directory}/{step}: not finite in {', '.join(bad[:3])}")

    def close(self) -> None:
        self._manager.close()


def _first_line(error: Exception) -> str:
    """TensorStore's errors run to dozens of lines; the first says what failed."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


if __name__ == "__main__":  # python -m ctxd_jax.checkpoint DIR STEP: check_arrays, in a process of its own
    ckpt = Checkpointer(sys.argv[1])
    try:
        ckpt.check_arrays(int(sys.argv[2]))
    except CheckpointError as e:
        sys.exit(str(e))
    finally:
        ckpt.close()
