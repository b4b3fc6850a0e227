import collections
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxd_jax.envs import get_env
from ctxd_jax.envs.sokoban import (MOVES, QUESTION, SYSTEM_PROMPT, TEACHER_CONTEXT, Puzzle, extract_answer,
                                   generate, parse_puzzle, score_answer)

# Player left of a box, goal right of it: "R" solves it.
LINE = """+ + + + +
+ * @ X +
+ + + + +"""


def ans(moves):
    return f"<answer>{moves}</answer>"


def bfs_solvable(p: Puzzle, limit: int = 200_000) -> bool:
    """Independent of Puzzle.play: plain BFS over (player, boxes) states."""
    floor = {(r, c) for r in range(p.height) for c in range(p.width)} - p.walls
    start = (p.player, p.boxes)
    seen, queue = {start}, collections.deque([start])
    while queue and len(seen) < limit:
        player, boxes = queue.popleft()
        if boxes <= p.goals:
            return True
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            t = (player[0] + dr, player[1] + dc)
            if t not in floor:
                continue
            nb = boxes
            if t in boxes:
                b2 = (t[0] + dr, t[1] + dc)
                if b2 not in floor or b2 in boxes:
                    continue
                nb = (boxes - {t}) | {b2}
            s = (t, nb)
            if s not in seen:
                seen.add(s)
                queue.append(s)
    assert not queue, "BFS limit hit; use smaller puzzles"
    return False


def test_render_parse_roundtrip_and_legend():
    p = parse_puzzle(LINE)
    assert (p.player, set(p.boxes), set(p.goals)) == ((1, 1), {(1, 2)}, {(1, 3)})
    assert p.render() == LINE
    both = parse_puzzle("+ + + + + +\n+ % $ @ X +\n+ + + + + +")
    assert both.player in both.goals and (1, 2) in both.boxes & both.goals
    assert both.render() == "+ + + + + +\n+ % $ @ X +\n+ + + + + +"
    for s in range(30):
        g = generate(s)
        assert parse_puzzle(g.render()).render() == g.render()
        assert parse_puzzle(g.render().replace(" ", "")) == parse_puzzle(g.render())


def test_hand_made_known_solutions():
    assert score_answer(parse_puzzle(LINE), ans("R")) == 1.0
    assert score_answer(parse_puzzle(LINE), ans(" R\n")) == 1.0  # stripped, like the reference's XML parser
    # Two boxes, two goals: push the right box up, step back, walk left, push the left box up.
    p = parse_puzzle("""+ + + + + +
+ - X - X +
+ - @ - @ +
+ - - - * +
+ + + + + +""")
    assert score_answer(p, ans("U")) == 0.0  # one box only
    assert score_answer(p, ans("ULLDU")) == 0.0  # the second L pushes the left box away from its goal
    assert score_answer(p, ans("UDLLU")) == 1.0
    assert score_answer(p, ans("UDLLUR")) == 1.0  # walking on after solving keeps it solved


def test_noop_moves():
    p = parse_puzzle(LINE)
    assert p.play("U").player == p.player  # into a wall
    assert p.play("L") == p  # the cell left of the player is a wall
    # push into a wall: the box sits against the right wall
    q = parse_puzzle("+ + + + +\n+ X * @ +\n+ + + + +")
    assert q.play("R") == q
    # push into another box
    r = parse_puzzle("+ + + + + + +\n+ * @ @ X X +\n+ + + + + + +")
    assert r.play("R") == r
    # any other character is ignored, lowercase included
    assert score_answer(p, ans("r")) == 0.0
    assert score_answer(p, ans("xR?")) == 1.0
    assert p.play("urdl 123") == p
    # a grid without a border: out of bounds is a wall
    assert parse_puzzle("* @ X").play("L") == parse_puzzle("* @ X")


def test_answer_extraction():
    assert extract_answer("a <answer>L</answer> b <answer>R</answer>") == "R"
    assert extract_answer("<answer>\nR\n</answer>") == "R"
    assert extract_answer("<answer>R") is None
    p = parse_puzzle(LINE)
    assert score_answer(p, "R") == 0.0  # no tags
    assert score_answer(p, ans("R") + ans("L")) == 0.0  # the last block counts
    assert score_answer(p, ans("L") + "thinking..." + ans("R")) == 1.0
    assert score_answer(p, None) == 0.0
    assert score_answer(p, b"<answer>R</answer>") == 0.0


def test_fuzzed_junk_never_raises():
    rng = random.Random(0)
    alphabet = "UDLR udlr<>/answer\n\t$%@X+-*{}0123456789\x00é🙂"
    puzzles = [generate(s) for s in range(20)]
    t0 = time.time()
    for i in range(5000):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        if i % 2:
            junk = f"<answer>{junk}</answer>" if i % 4 == 1 else junk + "<answer>" + junk
        assert score_answer(puzzles[i % 20], junk) in (0.0, 1.0)
    assert time.time() - t0 < 10


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(alphabet="UDLRudlr xy"))
def test_hypothesis_junk(text, moves):
    p = generate(3)
    assert score_answer(p, text) in (0.0, 1.0)
    assert score_answer(p, text + ans(moves)) in (0.0, 1.0)


def test_generator_deterministic():
    for s in range(40):
        assert generate(s) == generate(s)
    assert len({generate(s).render() for s in range(40)}) > 35


def test_generator_solvable_by_independent_bfs():
    kw = dict(min_w=4, max_w=6, min_h=4, max_h=6, min_boxes=1, max_boxes=2, max_depth=30)
    for s in range(60):
        p = generate(s, **kw)
        assert not p.solved()
        assert 4 <= p.width <= 6 and 4 <= p.height <= 6 and 1 <= len(p.boxes) == len(p.goals) <= 2
        assert bfs_solvable(p), p.render()
        assert score_answer(p, ans(p.solution)) == 1.0


def test_defaults_match_the_reference_ranges():
    for s in range(200):
        p = generate(s)
        assert 4 <= p.width <= 9 and 4 <= p.height <= 9
        assert 1 <= len(p.boxes) == len(p.goals) <= 7
        assert 1 <= len(p.solution) <= 80
        assert not p.solved() and len(p.boxes - p.goals) >= max(1, len(p.boxes) // 2)
        assert score_answer(p, ans(p.solution)) == 1.0
        border = {(r, c) for r in range(p.height) for c in range(p.width)
                  if r in (0, p.height - 1) or c in (0, p.width - 1)}
        assert border <= p.walls


def test_bad_generator_args():
    with pytest.raises(ValueError, match="min_boxes"):
        generate(0, min_boxes=3, max_boxes=2)
    with pytest.raises(ValueError, match="4x4"):
        generate(0, max_w=4, max_h=4)


def test_env_lazy_splits_and_prompt():
    t0 = time.time()
    env = get_env("sokoban")
    assert time.time() - t0 < 1.0  # 16,000 puzzles are not generated up front
    train, ev = env.examples("train"), env.examples("eval")
    assert (len(train), len(ev)) == (15000, 1000)
    assert ev[0].id == "sokoban-15000" and train[-1].id == "sokoban-14999"
    ids_train = {train[i].id for i in range(0, 15000, 97)}
    assert not ids_train & {e.id for e in ev[:50]}
    ex = ev[3]
    assert ex.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert ex.messages[1]["content"].startswith(QUESTION) and ex.messages[1]["content"].endswith(ex.data["puzzle"])
    assert "+ - A wall" in QUESTION and "<answer>answer here</answer>" in SYSTEM_PROMPT
    assert env.reward(ex, "think... " + ans(ex.data["solution"])) == 1.0
    assert env.reward(ex, ans("")) == 0.0
    assert get_env("sokoban").examples("eval")[3] == ex  # deterministic in the seed
    assert get_env("sokoban", seed=41).examples("train")[0].data == train[1].data  # item i uses seed + i


def test_teacher_messages_replace_system_prompt():
    env = get_env("sokoban", num_train=10, num_eval=5)
    ex = env.examples("train")[0]
    msgs = env.teacher_messages(ex, env.default_context)
    assert msgs == [{"role": "system", "content": TEACHER_CONTEXT}, ex.messages[1]]
    assert TEACHER_CONTEXT.endswith("<answer>YOURMOVESTRING</answer>")
    assert set(MOVES) == set("UDLR")
