"""Checks shared by the verifiers: whether a completion is an answer at all (not a fragment, not padding), and the
number an answer ends on.

A reward that a fragment ("Spain.") or padding ("Spain is nice." and 80 x "blah") can earn is exploited by RL within
a few steps, and then the curve measures the exploit, not the task. So the form tasks (envs/persona.py,
envs/tutor.py) give 0 to a degenerate completion whatever else it does right.
"""

import collections
import re

MIN_WORDS = 4  # "Spain." and "Capital." are not answers; "Madrid is the capital." is
# Padding: a word that is more than this share of an answer of at least REPEAT_MIN_WORDS words (in plain English
# the commonest word, "the", is ~5-7 % of running text).
REPEAT_SHARE, REPEAT_MIN_WORDS = 0.3, 10
_WORD = re.compile(r"[A-Za-z']+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def degenerate(text: str) -> bool:
    """True for a fragment (fewer than MIN_WORDS words) or padding (one word repeated as a large share of it)."""
    ws = words(text)
    if len(ws) < MIN_WORDS:
        return True
    top = collections.Counter(ws).most_common(1)[0][1]
    return len(ws) >= REPEAT_MIN_WORDS and top > REPEAT_SHARE * len(ws)


def last_number(text: str) -> int | float | None:
    """The last number written in `text` with digits ("1,024" is 1024), None if there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "")
    value = float(s)
    return int(value) if value.is_integer() and "." not in s else value
