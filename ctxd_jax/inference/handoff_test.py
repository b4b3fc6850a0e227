"""Step folders of the weight hand-off."""

import os

from ctxd_jax.inference import handoff


def test_step_dirs_and_cleaning(tmp_path):
    root = str(tmp_path)
    for step in (3, 1, 12, 2):
        handoff.new_step_dir(root, step)
    os.makedirs(os.path.join(root, "other"))
    assert [s for s, _ in handoff.step_dirs(root)] == [1, 2, 3, 12]
    removed = handoff.clean_old(root, keep=2)
    assert [os.path.basename(p) for p in removed] == ["step_000001", "step_000002"]
    assert sorted(os.listdir(root)) == ["other", "step_000003", "step_000012"]
    assert handoff.clean_old(root, keep=2) == [] and handoff.step_dirs(str(tmp_path / "missing")) == []
