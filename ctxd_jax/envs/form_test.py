from ctxd_jax.envs.form import degenerate, last_number


def test_fragments_and_padding_are_degenerate():
    for text in ("", "Spain.", "Capital.", "Spain is nice.", "Spain is nice. " + "blah " * 80,
                 "yes no " * 20, "1 2 3 4 5"):
        assert degenerate(text), text
    for text in ("The capital of Spain is Madrid.",
                 "Madrid is the capital of Spain. It is the largest city of the country and sits in its centre."):
        assert not degenerate(text), text


def test_last_number():
    assert last_number("3 + 4 = 7") == 7 and isinstance(last_number("7"), int)
    assert last_number("The answer is 1,024.") == 1024
    assert last_number("minus: -12") == -12 and last_number("half is 2.5") == 2.5
    assert last_number("no digits here") is None
