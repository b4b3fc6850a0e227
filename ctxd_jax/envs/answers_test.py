import pytest

from ctxd_jax.envs import Example
from ctxd_jax.envs.answers import choice, contains, exact, make_verifier, math, regex


def test_exact_normalises_whitespace_and_case_only():
    assert exact("  Paris\n", "paris") == 1.0
    assert exact("New   York\tCity", "new york city") == 1.0
    assert exact("42", "4") == 0.0  # contains the right answer, is not it
    assert exact("4 apples", "4") == 0.0
    assert exact("Paris.", "Paris") == 0.0


def test_contains():
    assert contains("I think the answer is PARIS, yes", "paris") == 1.0
    assert contains("new\nyork", "New York") == 1.0
    assert contains("Lyon", "Paris") == 0.0
    assert contains("anything", "") == 0.0  # an empty answer matches nothing


def test_regex_answer_is_a_pattern_or_a_pattern_extracts_it():
    assert regex("it takes 12 steps", r"\b1[0-9]\b") == 1.0
    assert regex("it takes 21 steps", r"\b1[0-9]\b") == 0.0
    verify = make_verifier(r"regex:Answer:\s*(\S+)", "answer")
    ex = Example("r", (), {"answer": "42"})
    assert verify("Answer: 7 ... no wait. Answer: 42", ex) == 1.0  # the last match counts
    assert verify("Answer: 421", ex) == 0.0 and verify("42", ex) == 0.0  # extracted, then exact
    with pytest.raises(ValueError, match=r"env.verifier: '\(' is not a regular expression"):
        make_verifier("regex:(", "answer")


def test_choice_letter():
    assert choice("The answer is (C).", "C") == 1.0
    assert choice("Answer: b", "B") == 0.0  # a lower-case word is not a choice letter
    assert choice("answer: B", "(b)") == 1.0
    assert choice("I first thought answer A, but the answer is D", "D") == 1.0
    assert choice("so \\boxed{d}", "D") == 1.0
    assert choice("B.", "B") == 1.0 and choice(" (B) ", "B") == 1.0
    assert choice("A banana is yellow", "A") == 0.0  # a word, not a choice
    assert choice("no letter here", "A") == 0.0


def test_math_equivalence():
    assert math("so the result is \\boxed{0.5}", "1/2") == 1.0
    assert math("The answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math("$\\frac{1}{2}$", "\\frac12") == 1.0
    assert math("\\boxed{1+x}", "x+1") == 1.0
    assert math("\\boxed{1,000}", "1000") == 1.0
    assert math("\\boxed{12}", "2") == 0.0 and math("the answer is 0.25", "1/2") == 0.0
    assert math("no number", "3") == 0.0


def test_make_verifier_names_and_functions():
    ex = Example("m", (), {"answer": 7, "q": "x"})  # a CSV's answer may be an int
    assert make_verifier("exact", "answer")(" 7 ", ex) == 1.0
    assert make_verifier("none", "answer")("7", ex) == 0.0
    assert make_verifier("ctxd_jax.envs.answers:exact", "answer") is exact
    with pytest.raises(ValueError, match=r"env.verifier: 'exactly' is not a verifier \(one of exact, contains"):
        make_verifier("exactly", "answer")
    with pytest.raises(ValueError, match=r"env.verifier: cannot import 'no_such_mod' \(ModuleNotFoundError"):
        make_verifier("no_such_mod:f", "answer")
    with pytest.raises(ValueError, match=r"env.verifier: module 'ctxd_jax.envs.answers' has no callable 'nope'"):
        make_verifier("ctxd_jax.envs.answers:nope", "answer")
