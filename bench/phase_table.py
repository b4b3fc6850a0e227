"""Prints the per-step phase times of a run's metrics.jsonl as a table (the last lines of a GPU session)."""

import json
import statistics
import sys

# wait: the trainer waiting for its batch; sample: the batch's last group sampled; rollouts: the batch complete
# (verified, vLLM teacher scores); trainer_scoring: trainer-side teacher / behaviour log-probs after sampling;
# to_device: the packed rows onto the trainer's devices, waiting for their turn.
PHASES = ("time/wait", "time/sample", "time/rollouts", "time/trainer_scoring", "time/to_device", "time/train",
          "time/publish", "time/step")


def table(rows: list[dict]) -> list[str]:
    """The lines of the table: one per step (seconds per phase), then the medians of steps 2+."""
    lines = [f"{'step':>4} " + " ".join(f"{p.split('/')[1]:>8}" for p in PHASES) + f" {'train tok/s':>11} {'rows':>5}"]
    for r in rows:
        lines.append(f"{r['step']:>4} " + " ".join(f"{r.get(p, float('nan')):8.2f}" for p in PHASES)
                     + f" {r.get('tokens/s_train', 0):11.0f} {int(r.get('pack/rows', 0)):5d}")
    later = rows[1:] or rows  # step 1 includes compilation
    lines.append("median (steps 2+): " + ", ".join(
        f"{p.split('/')[1]} {statistics.median(r.get(p, 0.0) for r in later):.2f}s" for p in PHASES))
    return lines


def main(path: str) -> None:
    print("\n".join(table([json.loads(line) for line in open(path)])))


if __name__ == "__main__":
    main(sys.argv[1])
