"""Prints the per-step phase times of a run's metrics.jsonl as a table (the last lines of a GPU session)."""

import json
import statistics
import sys

# wait: the trainer waiting for its batch; sample: the batch's last group sampled; rollouts: the batch complete
# (verified, vLLM teacher scores); trainer_scoring: trainer-side teacher / behaviour log-probs after sampling.
PHASES = ("time/wait", "time/sample", "time/rollouts", "time/trainer_scoring", "time/train", "time/publish",
          "time/step")


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    print(f"{'step':>4} " + " ".join(f"{p.split('/')[1]:>8}" for p in PHASES) + f" {'train tok/s':>11} {'rows':>5}")
    for r in rows:
        print(f"{r['step']:>4} " + " ".join(f"{r.get(p, float('nan')):8.2f}" for p in PHASES)
              + f" {r.get('tokens/s_train', 0):11.0f} {r.get('pack/rows', 0):5d}")
    later = rows[1:] or rows  # step 1 includes compilation
    print("median (steps 2+): " + ", ".join(
        f"{p.split('/')[1]} {statistics.median(r.get(p, 0.0) for r in later):.2f}s" for p in PHASES))


if __name__ == "__main__":
    main(sys.argv[1])
