"""Run-folder rules on real Orbax checkpoints: refuse, resume, overwrite, and a resume with a changed config."""

import os

import numpy as np
import pytest

from configs import demo
from ctxd_jax import rundir
from ctxd_jax.checkpoint import Checkpointer
from ctxd_jax.config import ConfigError, resolve
from ctxd_jax.plan import Gpus


def _config(out, **overrides):
    c = demo.get_config()
    c.output_dir = str(out)
    c.ckpt.resume = False
    c.update_from_flattened_dict(overrides)
    return resolve(c, Gpus())[0]


def _save(config, step, ckpt=None):
    ckpt = ckpt or rundir.checkpointer(config)
    ckpt.save(step, {"w": np.ones((2, 3), np.float32)}, {"data_position": step})
    ckpt.close()


def test_empty_or_new_folder_is_a_fresh_run(tmp_path):
    run = rundir.prepare(_config(tmp_path / "new"))
    assert (run.resume_step, run.complete) == (None, False) and not (tmp_path / "new").exists()


def test_folder_with_a_checkpoint_is_refused_without_resume(tmp_path):
    config = _config(tmp_path)
    _save(config, 8)
    with pytest.raises(ConfigError) as e:
        rundir.prepare(config)
    assert str(e.value) == (f"output_dir: {tmp_path} holds a run (a checkpoint at step 8); continue it with "
                            "--config.ckpt.resume=true or start over with --config.ckpt.overwrite=true (deletes it)")
    assert os.listdir(tmp_path / "checkpoints") == ["8"]  # untouched


def test_resume_continues_or_is_complete(tmp_path):
    _save(_config(tmp_path), 8)
    run = rundir.prepare(_config(tmp_path, **{"ckpt.resume": True, "max_steps": 16, "optim.lr": 0.5}))
    assert (run.resume_step, run.complete) == (8, False)  # lr is not part of the saved state
    assert rundir.prepare(_config(tmp_path, **{"ckpt.resume": True, "max_steps": 8})).complete


def test_resume_with_a_changed_state_field_is_refused(tmp_path):
    _save(_config(tmp_path), 8)
    with pytest.raises(ConfigError) as e:
        rundir.prepare(_config(tmp_path, **{"ckpt.resume": True, "batch_size": 8, "lora.rank": 16,
                                            "env.name": "cheers", "teacher.scorer": "trainer",
                                            "teacher.lora": "ema"}))
    msg = str(e.value)
    assert msg.startswith(f"ckpt.resume: the checkpoint at step 8 in {tmp_path} depends on batch_size (saved 16, "
                          "now 8), env.name (saved 'ahoy', now 'cheers'), lora.rank (saved 8, now 16), "
                          "teacher.lora (saved 'off', now 'ema'); ")
    assert msg.endswith("start over with --config.ckpt.overwrite=true (deletes the run)")


def test_checkpoint_without_a_saved_config_resumes(tmp_path):
    _save(_config(tmp_path), 4, Checkpointer(str(tmp_path / "checkpoints")))
    assert rundir.prepare(_config(tmp_path, **{"ckpt.resume": True, "batch_size": 8})).resume_step == 4


def test_metrics_without_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="holds a run \\(metrics of 1 steps\\)"):
        rundir.prepare(_config(tmp_path))
    assert rundir.prepare(_config(tmp_path, **{"ckpt.resume": True})).resume_step is None  # nothing to continue


def test_overwrite_deletes_only_the_runs_files(tmp_path):
    config = _config(tmp_path, **{"ckpt.overwrite": True, "ckpt.resume": True})
    _save(config, 8)
    # process1/, process12/: the folders of processes > 0 of a run over several processes; process0x/ is not one
    for name in ("weights/step_000008", "logs", "tensorboard", "process1/weights", "process12/logs", "process0x"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "samples.jsonl", "eval_baseline.json", "reward.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "mine").mkdir()
    rundir.swap_in_final(str(tmp_path), str(tmp_path / "weights" / "step_000008"))
    rundir.mark(str(tmp_path))  # as a run's start writes it
    run = rundir.prepare(config)
    assert run.resume_step is None and run.overwrite and os.path.isdir(tmp_path / "checkpoints")  # not yet
    assert run.clear() == ["checkpoints", "weights", "logs", "tensorboard", "metrics.jsonl", "samples.jsonl",
                           "eval_baseline.json", "final", "reward.png", "process1", "process12"]
    assert sorted(os.listdir(tmp_path)) == [rundir.MARKER, "mine", "notes.txt", "process0x"]


def test_overwrite_refuses_a_folder_no_run_wrote(tmp_path):
    """Someone's folder that happens to hold names a run writes (logs/, *.jsonl): nothing is deleted."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "important.txt").write_text("x")
    (tmp_path / "samples.jsonl").write_text("x")
    with pytest.raises(ConfigError) as e:
        rundir.prepare(_config(tmp_path, **{"ckpt.overwrite": True}))
    assert str(e.value).startswith(f"ckpt.overwrite: {tmp_path} holds logs, samples.jsonl but no ctxd-run.json ")
    assert (tmp_path / "logs" / "important.txt").exists()
    # a folder without anything a run writes: nothing to delete, the run starts
    assert rundir.prepare(_config(tmp_path / "empty", **{"ckpt.overwrite": True})).clear() == []


def test_final_is_swapped_in_and_never_replaced_unless_a_run_wrote_it(tmp_path):
    for version in ("1", "2"):
        (tmp_path / "weights" / version).mkdir(parents=True)
        (tmp_path / "weights" / version / "adapter.bin").write_text(version)
    rundir.swap_in_final(str(tmp_path), str(tmp_path / "weights" / "1"))
    rundir.swap_in_final(str(tmp_path), str(tmp_path / "weights" / "2"))
    assert (tmp_path / "final" / "adapter.bin").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["final", "weights"]  # nothing left beside it
    theirs = tmp_path / "theirs"
    (theirs / "final").mkdir(parents=True)
    (theirs / "final" / "model.bin").write_text("x")
    with pytest.raises(ConfigError, match=r"^output_dir: .*/theirs/final was not written by a run"):
        rundir.prepare(_config(theirs, **{"ckpt.overwrite": True}))
    with pytest.raises(ConfigError, match=r"/theirs/final was not written by a run .*: left as it is"):
        rundir.swap_in_final(str(theirs), str(tmp_path / "weights" / "2"))
    assert os.listdir(theirs / "final") == ["model.bin"]


def test_checkpoints_keep_a_marker_not_the_key(tmp_path):
    config = _config(tmp_path, **{"inference.api_key": "s3cret"})
    _save(config, 1)
    ckpt = Checkpointer(os.path.join(tmp_path, rundir.CHECKPOINTS))
    saved = ckpt.meta(1)["config"]
    ckpt.close()
    assert saved["inference"]["api_key"] == "<set, not shown>"
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert b"s3cret" not in f.read(), name


def test_output_dir_must_be_a_writable_folder_of_its_own(tmp_path):
    def error(out):
        with pytest.raises(ConfigError) as e:
            rundir.prepare(_config(out))
        return str(e.value)

    assert error("/") == "output_dir: / is the root folder; give a folder of its own for the run"
    home = os.path.expanduser("~")
    assert error(home) == f"output_dir: {home} is the home folder; give a folder of its own for the run"
    package = os.path.dirname(os.path.realpath(rundir.__file__))
    assert error(os.path.join(package, "runs")).startswith(f"output_dir: {package}/runs is inside the package's")
    (tmp_path / "a-file").write_text("x")
    assert error(tmp_path / "a-file") == f"output_dir: {tmp_path}/a-file exists and is not a folder"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        assert error(locked / "run") == f"output_dir: {locked} is not writable by this user"
    rundir.prepare(_config(tmp_path / "new" / "run"))  # made at the start


def test_an_unreadable_latest_checkpoint_names_the_one_before(tmp_path):
    config = _config(tmp_path)
    for step in (4, 8):
        _save(config, step)
    (tmp_path / "checkpoints" / "8" / "meta" / "metadata").write_text("{truncated")
    with pytest.raises(ConfigError) as e:
        rundir.prepare(_config(tmp_path, **{"ckpt.resume": True}))
    msg = str(e.value)
    assert msg.startswith(f"ckpt.resume: {tmp_path}/checkpoints/8: cannot read its metadata (") and "\n" not in msg
    assert msg.endswith("resume from the checkpoint at step 4 with --config.ckpt.resume_step=4")
    run = rundir.prepare(_config(tmp_path, **{"ckpt.resume": True, "ckpt.resume_step": 4}))
    assert (run.resume_step, run.set_aside) == (4, (8,))
    assert run.put_aside() == [f"{tmp_path}/checkpoints/unused-8"]  # kept, not deleted
    assert rundir.latest_step(str(tmp_path)) == 4
    with pytest.raises(ConfigError, match=r"^ckpt.resume_step: no checkpoint at step 6 in .* \(there are 4\)"):
        rundir.prepare(_config(tmp_path, **{"ckpt.resume": True, "ckpt.resume_step": 6}))


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_a_latest_checkpoint_whose_arrays_cannot_be_used_is_refused_before_start(tmp_path, damage):
    config = _config(tmp_path)
    _save(config, 4)
    if damage == "nan":
        ckpt = rundir.checkpointer(config)
        ckpt.save(8, {"w": np.full((2, 3), np.nan, np.float32)}, {"data_position": 8})
        ckpt.close()
    else:
        _save(config, 8)
        for f in (tmp_path / "checkpoints" / "8" / "arrays").glob("**/d/*"):  # the array data, not its metadata
            f.write_bytes(f.read_bytes()[:8])
    with pytest.raises(ConfigError) as e:
        rundir.prepare(_config(tmp_path, **{"ckpt.resume": True}))
    msg = str(e.value)
    what = "not finite in ['w']" if damage == "nan" else "cannot restore ("
    assert msg.startswith(f"ckpt.resume: {tmp_path}/checkpoints/8: {what}") and "\n" not in msg, msg
    assert msg.endswith("resume from the checkpoint at step 4 with --config.ckpt.resume_step=4")
