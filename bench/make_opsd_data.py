"""Writes the privileged-context task of bench/evidence.py: two-step arithmetic with a worked solution per example,
as JSONL rows {"question", "answer", "solution"} (bench/data/arith_steps.jsonl).

The teacher sees this example's worked solution (env.dataset.context_key=solution), the student only the question;
the verifier checks the answer against the known one. So the teacher's advantage is the answer itself, not a style:
the on-policy self-distillation setting, where RL has a small signal (the student sometimes gets it right) and the
teacher a large one.

    python bench/make_opsd_data.py            # the committed file (seed 0, 600 rows)
"""

import argparse
import json
import os
import random

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arith_steps.jsonl")


def row(rng: random.Random) -> dict:
    a, b, c = rng.randint(3, 19), rng.randint(2, 9), rng.randint(10, 99)
    op = rng.choice("+-")
    product = a * b
    answer = product + c if op == "+" else product - c
    return {"question": f"What is {a} * {b} {op} {c}?", "answer": str(answer),
            "solution": f"First {a} * {b} = {product}. Then {product} {op} {c} = {answer}. The answer is {answer}."}


def rows(seed: int, n: int) -> list[dict]:
    rng, out = random.Random(seed), {}
    while len(out) < n:
        r = row(rng)
        out.setdefault(r["question"], r)
    return list(out.values())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--out", default=OUT)
    a = p.parse_args()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        for r in rows(a.seed, a.rows):
            f.write(json.dumps(r) + "\n")
    print(f"{a.rows} rows: {a.out}")


if __name__ == "__main__":
    main()
