"""The run folder (`config.output_dir`): what a start may do with what an earlier run left in it.

As with the workdir of Flax's examples, a folder holds one run. A start in a folder that holds a run (a complete
checkpoint, or metrics of trained steps) continues it with `ckpt.resume` (from its latest checkpoint), deletes it
first with `ckpt.overwrite`, and is refused otherwise, before anything starts. Nothing else deletes anything of an
earlier run. Every checkpoint stores the run's resolved config; a resume that changes a field the saved state depends
on is refused, naming the fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

from ctxd_jax.config import ConfigError, redacted
from ctxd_jax.hosts import PROCESS_DIR, process_dir
from ctxd_jax.metrics import PLOTS, WANDB_ID, read_jsonl

CHECKPOINTS = "checkpoints"
# A run's own record, written into its folder at its start and into the `final/` it exports: the proof that a run of
# this project wrote what is there, without which nothing there is deleted or replaced.
MARKER = "ctxd-run.json"
FINAL = "final"
METRICS = "metrics.jsonl"
EVAL_BASELINE = "eval_baseline.json"
# Everything a run writes into its folder: what ckpt.overwrite deletes (and nothing else there).
RUN_ENTRIES = (CHECKPOINTS, "weights", "logs", "tensorboard", METRICS, "samples.jsonl", EVAL_BASELINE, FINAL,
               *(name for _, _, name in PLOTS), WANDB_ID, "wandb")
# What the saved state depends on: the LoRA and optimizer arrays (model, lora), the data stream and the position in
# it (env, seed, batch_size, rollouts_per_example), the sampled but untrained batch (sampling) and whether it holds an
# EMA teacher (teacher.lora). A section name covers all its fields.
STATE_FIELDS = ("model", "lora", "seed", "env", "batch_size", "rollouts_per_example", "sampling", "teacher.lora")
RESUME_FLAG = "--config.ckpt.resume=true"
OVERWRITE_FLAG = "--config.ckpt.overwrite=true"


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: str
    resume_step: int | None  # the checkpoint this start continues from; None = a fresh run
    max_steps: int
    overwrite: bool = False  # the earlier run's files are to be deleted (clear) before the start
    set_aside: tuple[int, ...] = ()  # checkpoints after resume_step (ckpt.resume_step): renamed, not deleted

    def put_aside(self) -> list[str]:
        """Renames the checkpoints after the one resumed to checkpoints/unused-<step> (a later save of that step
        would otherwise be skipped as done); returns their new paths."""
        moved = []
        for step in self.set_aside:
            src = os.path.join(self.path, CHECKPOINTS, str(step))
            moved.append(os.path.join(self.path, CHECKPOINTS, f"unused-{step}"))
            os.rename(src, moved[-1])
        return moved

    @property
    def complete(self) -> bool:
        """Nothing left to train: the latest checkpoint is at (or past) max_steps."""
        return self.resume_step is not None and self.resume_step >= self.max_steps

    def clear(self) -> list[str]:
        """Deletes what a run writes here (RUN_ENTRIES, and the folders of processes > 0 of a run over several
        processes) and nothing else; returns their names. `prepare` has checked that a run wrote them."""
        deleted = run_entries(self.path)
        for name in deleted:
            target = os.path.join(self.path, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.remove(target)
        return deleted


def run_entries(path: str) -> list[str]:
    """The names in folder `path` that a run writes (RUN_ENTRIES and the folders of processes > 0)."""
    if not os.path.isdir(path):
        return []
    names = set(os.listdir(path))
    return [n for n in RUN_ENTRIES if n in names] + sorted(n for n in names if PROCESS_DIR.fullmatch(n))


def mark(path: str) -> None:
    """Writes the MARKER into folder `path` (kept where there is one)."""
    target = os.path.join(path, MARKER)
    if not os.path.exists(target):
        with open(target, "w") as f:
            json.dump({"written_by": "ctxd-jax"}, f)


def marked(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def swap_in_final(out: str, src: str) -> None:
    """A copy of folder `src` becomes `<out>/final`: written beside the old one, marked, then swapped in (a reader
    sees the old or the new folder, whole); a `final/` that no run wrote is never replaced."""
    final, new, old = (os.path.join(out, name) for name in (FINAL, ".final.new", ".final.old"))
    if os.path.lexists(final) and not marked(final):
        raise ConfigError(f"output_dir: {final} was not written by a run (no {MARKER} in it): left as it is, the "
                          f"last weights are in {src}")
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(src, new)
    mark(new)
    if os.path.lexists(final):
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def run_path(config) -> str:
    return os.path.abspath(os.path.expanduser(config.output_dir))


def checkpointer(config):
    """The run's Checkpointer, storing the resolved `config` in every checkpoint."""
    from ctxd_jax.checkpoint import Checkpointer

    return Checkpointer(os.path.join(run_path(config), CHECKPOINTS), keep=config.ckpt.keep,
                config=redacted(config).to_dict())


def prepare(config) -> RunDir:
    """What this start does with `config.output_dir` (it changes nothing there); raises ConfigError, naming the flag
    to pass, where it may not start. With ckpt.overwrite the caller deletes the earlier run (RunDir.clear) once every
    other check has passed."""
    path = run_path(config)
    check_folder(path)
    final = os.path.join(path, FINAL)
    if os.path.lexists(final) and not marked(final):
        raise ConfigError(f"output_dir: {final} was not written by a run (no {MARKER} in it), and a run would replace "
                          "it; move it or choose another output_dir")
    if config.ckpt.overwrite:
        present = run_entries(path)
        if present and not marked(path):
            raise ConfigError(f"ckpt.overwrite: {path} holds {', '.join(present)} but no {MARKER} (the record a run "
                              "writes in its folder): nothing is deleted that a run did not write; choose another "
                              "output_dir")
        return RunDir(path, None, config.max_steps, overwrite=True)
    latest = latest_step(path)
    held = _held(path, latest)
    if not held:
        return RunDir(path, None, config.max_steps)
    if not config.ckpt.resume:
        raise ConfigError(f"output_dir: {path} holds a run ({held}); continue it with {RESUME_FLAG} or start over "
                          f"with {OVERWRITE_FLAG} (deletes it)")
    if latest is None:  # stopped before its first checkpoint: nothing to continue, its metrics are redone
        return RunDir(path, None, config.max_steps)
    from ctxd_jax.checkpoint import Checkpointer, CheckpointError

    ckpt = Checkpointer(os.path.join(path, CHECKPOINTS))
    try:
        steps = ckpt.steps()
        step = latest if config.ckpt.resume_step is None else config.ckpt.resume_step
        if step not in steps:
            raise ConfigError(f"ckpt.resume_step: no checkpoint at step {step} in {ckpt.directory} (there are "
                              f"{', '.join(map(str, steps))})")
        saved = ckpt.meta(step).get("config")
    except CheckpointError as e:
        raise ConfigError(f"ckpt.resume: {e}; {fallback(steps, step)}") from e
    finally:
        ckpt.close()
    _check_arrays(ckpt.directory, step, steps)
    if saved is not None and (changed := changed_fields(saved, config.to_dict())):
        raise ConfigError(f"ckpt.resume: the checkpoint at step {step} in {path} depends on {', '.join(changed)}; "
                          f"resume with the saved values, or start over with {OVERWRITE_FLAG} (deletes the run)")
    return RunDir(path, step, config.max_steps, set_aside=tuple(s for s in steps if s > step))


def _check_arrays(directory: str, step: int, steps: list[int]) -> None:
    """The checkpoint to resume is read whole before any process starts, in a process that sees no GPU (JAX here
    would claim the GPUs the servers are about to get)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "ctxd_jax.checkpoint", directory, str(step)], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or [f"{directory}/{step}: exit status {r.returncode}"])[-1]
        raise ConfigError(f"ckpt.resume: {last}; {fallback(steps, step)}")


def fallback(steps: list[int], step: int) -> str:
    """What to do when the checkpoint at `step` cannot be read: resume from the one before it, if any."""
    earlier = [s for s in steps if s < step]
    if not earlier:
        return f"no earlier checkpoint to resume from; start over with {OVERWRITE_FLAG} (deletes the run)"
    return f"resume from the checkpoint at step {earlier[-1]} with --config.ckpt.resume_step={earlier[-1]}"


def check_folder(path: str) -> None:
    """`path` can be a run folder: a folder (or one that can be made) this user can write, and not one whose other
    files a run would mix with: the root, the home folder, or this package's own."""
    real = os.path.realpath(path)
    package = os.path.dirname(os.path.realpath(__file__))
    if real in ("/", os.path.realpath(os.path.expanduser("~"))):
        raise ConfigError(f"output_dir: {path} is {'the root' if real == '/' else 'the home'} folder; give a folder "
                          "of its own for the run")
    if os.path.commonpath([real, package]) == package:
        raise ConfigError(f"output_dir: {path} is inside the package's own folder {package}; give another")
    if os.path.lexists(real) and not os.path.isdir(real):
        raise ConfigError(f"output_dir: {path} exists and is not a folder")
    existing = real
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {existing} is not writable by this user")


def latest_step(path: str) -> int | None:
    """The latest complete checkpoint in run folder `path` (None: none). Creates nothing."""
    directory = os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(directory):
        return None
    from ctxd_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(directory)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def _held(path: str, latest: int | None) -> str:
    """What of an earlier run is in `path` that a fresh start would lose ('' = nothing)."""
    held = [] if latest is None else [f"a checkpoint at step {latest}"]
    if rows := read_jsonl(os.path.join(path, METRICS)):
        held.append(f"metrics of {len(rows)} steps")
    return " and ".join(held)


def changed_fields(saved: dict, now: dict) -> list[str]:
    """'field (saved X, now Y)' for each leaf under STATE_FIELDS that differs (compared as JSON: tuples = lists)."""
    saved, now = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(now)))
    # A state field the saved config lacks came after that checkpoint, which was saved with its default: compared
    # only when saved. A whole section's new leaves are compared (an environment argument added since).
    keys = sorted(k for k in saved.keys() | {k for k in now if k.split(".")[0] in STATE_FIELDS} if _depends(k))
    return [f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in keys if saved.get(k) != now.get(k)]


def _depends(key: str) -> bool:
    return any(key == field or key.startswith(f"{field}.") for field in STATE_FIELDS)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def pending_path(out: str, process: int, step: int) -> str:
    """Where a process other than 0 keeps its batches sampled ahead at checkpoint `step` (process 0's are in the
    checkpoint's JSON)."""
    return os.path.join(process_dir(out, process), "pending", f"{step}.json")


def save_pending(out: str, process: int, step: int, pending: list, kept: list[int]) -> None:
    """Writes them (whole or not at all), and removes those of checkpoints no longer `kept`."""
    path = pending_path(out, process, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(pending, f)
    os.replace(path + ".tmp", path)
    keep = {f"{s}.json" for s in kept} | {f"{step}.json"}
    for name in set(os.listdir(os.path.dirname(path))) - keep:
        os.remove(os.path.join(os.path.dirname(path), name))
