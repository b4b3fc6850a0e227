import os

import pytest

from ctxd_jax.metrics import WANDB_ID, MetricsLogger, console_line, plot, read_json, read_jsonl, write_json


def test_jsonl_tensorboard_and_plots(tmp_path, capsys):
    out = str(tmp_path)
    log = MetricsLogger(out, total_steps=3, progress=False)
    for step in (1, 2, 3):
        log.log(step, {"reward/mean": 0.1 * step, "teacher_kl": -1.0 / step, "loss": 0.5, "mismatch_kl": 1e-3,
                       "bad": float("nan"), "text": "skipped"})
    write_json(out, "eval_baseline.json", {"student": {"reward": 0.0}, "teacher": {"reward": 0.9}})
    log.close()
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["reward/mean"] == 0.30000000000000004 and rows[0]["bad"] == "nan" and "text" not in rows[0]
    assert "step 3/3 | reward 0.300 | teacher_kl -0.333" in capsys.readouterr().err
    assert os.listdir(os.path.join(out, "tensorboard"))
    files = plot(out, baseline=read_json(os.path.join(out, "eval_baseline.json")))
    assert read_json(os.path.join(out, "missing.json")) is None
    assert sorted(os.path.basename(f) for f in files) == ["reward.png", "teacher_kl.png"]
    assert all(os.path.getsize(f) > 1000 for f in files)


def test_resume_drops_later_rows_and_torn_line(tmp_path):
    out = str(tmp_path)
    log = MetricsLogger(out, total_steps=5, tensorboard=False, progress=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": step}, samples={"example_ids": [str(step)]})
    log.close()
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    log = MetricsLogger(out, total_steps=5, start_step=2, tensorboard=False, progress=True)
    log.log(3, {"loss": 30.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [(1, 1.0), (2, 2.0),
                                                                                              (3, 30.0)]
    assert [r["example_ids"] for r in read_jsonl(os.path.join(out, "samples.jsonl"))] == [["1"], ["2"]]


def test_console_line_skips_missing():
    assert console_line(1, 2, {"loss": 1.0, "time/step": 2.345}) == "step 1/2 | loss 1.000 | 2.3s"


def test_wandb_run_is_named_logs_config_and_continues_on_resume(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path)
    kwargs = dict(tensorboard=False, progress=False, wandb_project="ctxd-test", wandb_entity="someone",
                  run_name="first-try", run_config={"lora": {"rank": 4}, "seed": 3})
    log = MetricsLogger(out, total_steps=4, **kwargs)
    first = log._wandb.id
    assert log._wandb.name == "first-try" and log._wandb.config["lora"] == {"rank": 4}
    log.log(1, {"loss": 0.5})
    log.close()
    with open(os.path.join(out, WANDB_ID)) as f:
        assert f.read() == first
    log = MetricsLogger(out, total_steps=4, start_step=1, **kwargs)  # the resumed run
    assert log._wandb.id == first
    log.log(2, {"loss": 0.25})
    log.close()
    assert wandb.run is None
    # A second run (another folder) gets its own W&B run.
    other = MetricsLogger(str(tmp_path / "other"), total_steps=1, **kwargs)
    assert other._wandb.id != first
    other.close()
