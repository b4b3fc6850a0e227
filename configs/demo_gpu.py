"""The demo on one NVIDIA GPU: configs/demo.py's task and learning settings, with the vLLM server (student adapter and
teacher) and the JAX trainer sharing GPU 0. After `bash launch/install.sh --gpu`, from the repository root:

    .venv/bin/python -m ctxd_jax.train --config=configs/demo_gpu.py \
        --inference_gpu_ids=0 --teacher_gpu_ids=0 --trainer_gpu_ids=0

docs/demo.md explains the settings.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    # The trainer's cuDNN attention takes 16-bit inputs only; the CPU demo's float32 was chosen for CPU speed.
    c.model.dtype = "bfloat16"
    c.output_dir = "outputs/demo_gpu"
    # Memory shares of the one GPU (they must add up to <= 1): the split launch/one_gpu.sh runs with.
    c.inference.gpu_memory_utilization = 0.65
    c.trainer.gpu_memory_fraction = 0.3
    return c
