"""`python -m ctxd_jax.export` on a run folder written as the loop writes it (the trainer of the run's config, its
checkpointer): transformers reads the merged folder and PEFT the adapter as the trainer's model (float32)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx

from configs import rl
from ctxd_jax.export import export
from ctxd_jax.build import load_trainer
from ctxd_jax.models.hf_test import randomise_lora, torch_logprobs
from ctxd_jax.rundir import checkpointer
from ctxd_jax.tiny import write_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQS = [[1, 17, 40, 99, 23, 5, 300, 77, 12, 2, 60, 61, 250, 3], [4, 8, 15, 16, 23, 42]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, the base model, the trainer's log-probs of SEQS at the saved step)."""
    tmp = tmp_path_factory.mktemp("export")
    config = rl.get_config()
    config.model.path = write_tiny_checkpoint(str(tmp / "tiny"), "qwen3", std=0.1)
    config.model.dtype = "float32"
    config.output_dir = str(tmp / "run")
    trainer, _ = load_trainer(config)
    # Non-zero LoRA (B starts at 0), so a lost adapter shows.
    trainer.lora = nnx.state(randomise_lora(trainer.model(), seed=7), nnx.LoRAParam)
    ckpt = checkpointer(config)
    ckpt.save(3, trainer.state_arrays(), {})
    ckpt.close()
    want = [s.logprobs for s in trainer.score(SEQS, lora=trainer.lora)]
    base = [s.logprobs for s in trainer.score(SEQS, lora=trainer.base_lora())]
    assert max(np.max(np.abs(w - b)) for w, b in zip(want, base)) > 1e-2  # the LoRA matters
    return config.output_dir, config.model.path, want


def _export(run_dir, out, *flags):
    r = subprocess.run([sys.executable, "-m", "ctxd_jax.export", f"--run={run_dir}", f"--out={out}", *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    return out


def _check(model, want):
    for seq, w in zip(SEQS, want):
        np.testing.assert_allclose(torch_logprobs(model, seq), w, atol=1e-5)


def test_merged_export_is_the_trainers_model(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _, want = run
    out = _export(run_dir, str(tmp_path / "merged"), "--merged", "--step=3")
    AutoTokenizer.from_pretrained(out)
    _check(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), want)


def test_adapter_export_is_the_trainers_model(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, base, want = run
    out = export(run_dir, str(tmp_path / "adapter"))  # in-process: the command line is the merged test's
    _check(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out), want)


def test_a_folder_without_checkpoints_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ctxd_jax.export", f"--run={tmp_path}", f"--out={tmp_path / 'o'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"export: --run: {tmp_path} holds no checkpoints/ folder (not a run's output_dir?)")
    assert not os.path.exists(tmp_path / "checkpoints")

