"""Step metrics to the console (progress bar + one line per step), metrics.jsonl, TensorBoard, W&B, PNG plots.

Knows nothing of the math: a step's metrics are a flat dict of floats with '/'-separated names.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from typing import Mapping

CONSOLE_KEYS = (("reward/mean", "reward"), ("teacher_kl", "teacher_kl"), ("mismatch_kl", "mismatch_kl"),
                ("loss", "loss"), ("grad_norm", "grad_norm"), ("time/step", "s"))
PLOTS = (("reward/mean", "task reward", "reward.png"), ("teacher_kl", "teacher KL (per token)", "teacher_kl.png"))
WANDB_ID = "wandb_id.txt"  # the W&B run id of the run in this folder


def _scalar(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value


def read_jsonl(path: str) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _reopen(path: str, start_step: int):
    """`path` for appending, without the rows of steps after `start_step` (written by a run that was resumed)."""
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= start_step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    return open(path, "a")


def write_json(output_dir: str, name: str, data) -> str:
    """Saves `data` as JSON in the output folder (e.g. the baseline eval table); returns the path."""
    path = os.path.join(output_dir, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def read_json(path: str):
    """The JSON in `path`, or None when there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def console_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, label in CONSOLE_KEYS:
        value = _scalar(metrics.get(key))
        if value is not None:
            parts.append(f"{label} {value:.3f}" if label != "s" else f"{value:.1f}s")
    return " | ".join(parts)


class MetricsLogger:
    """One instance per run. `start_step`: steps already done (resume); later rows of an earlier run are dropped
    so that metrics.jsonl holds each step once."""

    def __init__(self, output_dir: str, *, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 wandb_project: str = "", wandb_entity: str = "", run_name: str = "",
                 run_config: Mapping | None = None, progress: bool = True):
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir, self.total_steps = output_dir, total_steps
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = _reopen(self.path, start_step)
        self._samples = _reopen(os.path.join(output_dir, "samples.jsonl"), start_step)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("warning: log.wandb is set but wandb is not installed; W&B logging is off", file=sys.stderr)
            else:
                # The run's W&B id lives in its folder: a resumed run continues the same W&B run.
                self._wandb = wandb.init(project=wandb_project, entity=wandb_entity or None, name=run_name or None,
                                         id=_wandb_id(output_dir),
                                         config=dict(run_config or {}), resume="allow", dir=output_dir)
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    def log(self, step: int, metrics: Mapping[str, float], samples: Mapping | None = None) -> None:
        """One step: `metrics` (floats) to every sink; `samples` (any JSON, e.g. example ids and a completion) to
        samples.jsonl."""
        if samples is not None:
            self._samples.write(json.dumps(dict(samples, step=step)) + "\n")
            self._samples.flush()
        row = {"step": step}
        for key, value in metrics.items():
            value = _scalar(value)
            if value is not None:
                row[key] = value if math.isfinite(value) else str(value)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        line = console_line(step, self.total_steps, row)
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
            self._bar.update(1)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(output_dir: str) -> str:
    """The id in `output_dir`/WANDB_ID, written there (random) by the run's first start."""
    path = os.path.join(output_dir, WANDB_ID)
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(uuid.uuid4().hex)
    with open(path) as f:
        return f.read().strip()


def plot(output_dir: str, *, baseline: Mapping[str, Mapping[str, float]] | None = None) -> list[str]:
    """PNG plots of reward and teacher KL over steps from metrics.jsonl; returns the files written.

    `baseline` ({'student': {'reward': ..}, 'teacher': {'reward': ..}}) draws the pre-training eval as
    horizontal lines, so the plot shows the student approaching the teacher.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(output_dir, "metrics.jsonl"))
    written = []
    for key, title, name in PLOTS:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points), marker="o", markersize=3, label="student (train batches)")
        evals = [(r["step"], r["eval/reward"]) for r in rows if isinstance(r.get("eval/reward"), (int, float))]
        if key == "reward/mean" and evals:  # the online eval: the student without context on held-out prompts
            ax.plot(*zip(*evals), marker="s", linestyle="-", color="tab:red", label="student (eval)")
        if key == "reward/mean" and baseline:
            for who, style in (("student", ":"), ("teacher", "--")):
                value = (baseline.get(who) or {}).get("reward")
                if value is not None:
                    ax.axhline(value, linestyle=style, color="gray" if who == "student" else "green",
                               label=f"{who} before training (eval)")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(output_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
