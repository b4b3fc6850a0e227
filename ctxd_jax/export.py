"""The trained LoRA of a run, out of its checkpoints: a PEFT adapter folder (default), or with --merged the merged
model as a Hugging Face folder (config, safetensors, tokenizer) that transformers and vLLM load as a plain checkpoint.

    python -m ctxd_jax.export --run=DIR [--step=N] [--merged] --out=OUT

DIR is the run's `output_dir`; the checkpoint (default: the latest complete one) holds the LoRA arrays and the run's
resolved config, which names the base model (`model.path`), the LoRA shape and the dtype.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx

from ctxd_jax.checkpoint import Checkpointer, CheckpointError
from ctxd_jax.rundir import CHECKPOINTS


def restore_model(run_dir: str, step: int | None = None):
    """(model with the run's LoRA at `step`, the base model's folder, the step)."""
    from ctxd_jax.models.hf import load_model

    folder = os.path.join(os.path.abspath(os.path.expanduser(run_dir)), CHECKPOINTS)
    if not os.path.isdir(folder):
        raise CheckpointError(f"--run: {run_dir} holds no {CHECKPOINTS}/ folder (not a run's output_dir?)")
    ckpt = Checkpointer(folder, keep=1 << 30)  # keeps everything: exporting deletes nothing
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{folder}: no complete checkpoint")
        config = ckpt.meta(step).get("config")
        if not config:
            raise CheckpointError(f"{folder}/{step}: the checkpoint holds no run config")
        path = os.path.expanduser(config["model"]["path"])
        dtype = jnp.bfloat16 if config["model"]["dtype"] == "bfloat16" else jnp.float32
        model = load_model(path, lora_rank=config["lora"]["rank"], lora_alpha=config["lora"]["alpha"], dtype=dtype,
                           param_dtype=dtype)
        lora = nnx.state(model, nnx.LoRAParam)
        # Only the LoRA arrays, restored onto this process's devices whatever the mesh that saved them.
        target = {"lora": jax_abstract(nnx.to_pure_dict(lora))}
        restore = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                         restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        try:
            arrays = ckpt._manager.restore(step, args=ocp.args.Composite(arrays=restore))["arrays"]
        except Exception as e:  # orbax raises many types; name the folder and the step
            raise CheckpointError(f"{folder}/{step}: cannot restore the LoRA ({type(e).__name__}: {e})") from e
        nnx.replace_by_pure_dict(lora, arrays["lora"])
        nnx.update(model, lora)
        return model, path, step
    finally:
        ckpt.close()


def jax_abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def export(run_dir: str, out: str, *, step: int | None = None, merged: bool = False) -> str:
    from ctxd_jax.models.hf import save_adapter, save_merged

    model, path, _ = restore_model(run_dir, step)
    if merged:
        return save_merged(model, out, src_dir=path)
    return save_adapter(model, out, base_model_name_or_path=path)


FLAGS = flags.FLAGS
flags.DEFINE_string("run", None, "The run's folder (its output_dir).")
flags.DEFINE_integer("step", None, "The checkpoint's step (default: the latest complete one).")
flags.DEFINE_bool("merged", False, "Write the merged model (HF folder) instead of the PEFT adapter.")
flags.DEFINE_string("out", None, "The folder to write.")


def main(argv):
    del argv
    try:
        out = export(FLAGS.run, FLAGS.out, step=FLAGS.step, merged=FLAGS.merged)
    except CheckpointError as e:
        raise SystemExit(f"export: {e}") from None
    print(f"export: {'merged model' if FLAGS.merged else 'PEFT adapter'} in {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["run", "out"])
    app.run(main)
