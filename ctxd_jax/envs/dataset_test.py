import json

import pytest

from ctxd_jax.envs import check_context, get_env


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i), "solution": f"{i}+{i}={2 * i}"} for i in range(10)]


def test_jsonl_splits_prompts_context_and_reward(tmp_path):
    env = get_env("dataset", path=_jsonl(tmp_path / "t.jsonl", ROWS), context_key="solution", eval_fraction=0.2,
                  system_prompt="Answer with a number.")
    train, ev = env.examples("train"), env.examples("eval")
    assert (len(train), len(ev)) == (8, 2)
    assert not {e.id for e in train} & {e.id for e in ev}  # disjoint, all rows used
    assert sorted(int(e.id.split(":")[1]) for e in [*train, *ev]) == list(range(1, 11))
    ex = next(e for e in train if e.id == "t.jsonl:4")
    assert ex.messages == ({"role": "system", "content": "Answer with a number."},
                           {"role": "user", "content": "What is 3+3?"})
    assert ex.context == "3+3=6" and ex.data["answer"] == "6"
    assert env.reward(ex, " 6\n") == 1.0 and env.reward(ex, "66") == 0.0
    same = get_env("dataset", path=str(tmp_path / "t.jsonl"), eval_fraction=0.2)
    assert [e.id for e in same.examples("eval")] == [e.id for e in ev]  # seeded
    check_context("Reference solution:\n{solution}", env)


def test_chat_prompts_eval_path_csv_parquet_and_folder(tmp_path):
    import datasets

    chat = [{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "answer": "A"}]
    env = get_env("dataset", path=_jsonl(tmp_path / "c.jsonl", chat * 3), eval_path=str(tmp_path / "c.jsonl"),
                  system_prompt="ignored: the row has its own", verifier="contains")
    assert len(env.examples("train")) == len(env.examples("eval")) == 3
    assert env.examples("eval")[0].messages[0] == {"role": "system", "content": "S"}
    (tmp_path / "m.csv").write_text("question,answer\n" + "".join(f'"What is {i}/2?",{i / 2}\n' for i in range(5)))
    env = get_env("dataset", path=str(tmp_path / "m.csv"), prompt_key="question", verifier="math", eval_fraction=0)
    ex = env.examples("train")[1]
    assert env.reward(ex, "It is \\boxed{\\frac{1}{2}}") == 1.0 and env.reward(ex, "\\boxed{2}") == 0.0
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "p.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "folder"))
    for path in ("p.parquet", "folder"):
        assert len(get_env("dataset", path=str(tmp_path / path), eval_fraction=0.5).examples("eval")) == 5


@pytest.mark.parametrize("rows, kwargs, message", [
    (None, dict(path="nope.jsonl"), "env.path: 'nope.jsonl' does not exist"),
    ([], {}, "env.path: '{p}' has no rows"),
    (ROWS, dict(prompt_key="question"), "env.prompt_key: '{p}' has no column 'question' (columns: prompt, answer, "
                                        "solution)"),
    (ROWS, dict(answer_key="gold"), "env.answer_key: '{p}' has no column 'gold'"),
    (ROWS, dict(context_key="hint"), "env.context_key: '{p}' has no column 'hint'"),
    (ROWS[:2] + [{"prompt": 3, "answer": "x"}], {}, "env.prompt_key: '{p}' row 3: 'prompt' is '3', not a non-empty"),
    (ROWS[:2] + [{"prompt": [{"role": "bot", "content": "x"}], "answer": "x"}], {}, "env.prompt_key: '{p}' row 3:"),
    (ROWS, dict(verifier="exactly"), "env.verifier: 'exactly' is not a verifier"),
    (ROWS, dict(verifier="nowhere_mod:f"), "env.verifier: cannot import 'nowhere_mod'"),
    (ROWS[:1], dict(eval_fraction=0.9), "env.eval_fraction: 0.9 leaves no train example of the 1 rows in"),
])
def test_bad_data_is_one_line_naming_the_field(tmp_path, rows, kwargs, message):
    path = str(tmp_path / "d.jsonl")
    if rows is not None:
        _jsonl(tmp_path / "d.jsonl", rows)
    kwargs.setdefault("path", path)
    with pytest.raises(ValueError) as e:
        get_env("dataset", **kwargs)
    assert str(e.value).startswith(message.format(p=path)) and "\n" not in str(e.value)


def test_none_verifier_needs_no_answer_column(tmp_path):
    env = get_env("dataset", path=_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}] * 2), verifier="none")
    assert env.reward(env.examples("train")[0], "anything") == 0.0
