"""The run's vLLM servers, built from the config and the Plan (ctxd_jax/config.py `make_plan`).

When the plan shares one server between student and teacher, the teacher is the base model's served name and the
student is one LoRA adapter per policy version, `STUDENT_ADAPTER-v<n>` (ctxd_jax/inference/handoff.py), on the same
server; publish the initial version before sampling. Merged mode: the student is the base name, reloaded every step,
so it cannot share a server with a frozen teacher.
When the trainer scores the teacher (plan.teacher_scorer 'trainer': the teacher is the base model) there is no
teacher server; the teacher is sampled (eval baseline) as the student server's base model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets

from ctxd_jax.config import needs_teacher_scores, teacher_scorer
from ctxd_jax.inference.client import Client
from ctxd_jax.inference.server import ServerGroup, VLLMServer

STUDENT_ADAPTER = "student"
BASE_NAME = "base"
TEACHER_NAME = "teacher"
# Room for the teacher's context on top of the student's sequence when scoring.
CONTEXT_MARGIN_TOKENS = 2048


@dataclasses.dataclass
class Deployment:
    group: ServerGroup
    student: VLLMServer
    teacher: VLLMServer | None
    student_model: str  # adapter mode: the prefix of each version's adapter name; merged mode: the base name
    teacher_model: str | None
    teacher_scorer: str = "vllm"  # the plan's: 'trainer' = the base model is the teacher, scored by the trainer

    def student_client(self, **kwargs) -> Client:
        return Client.for_server(self.student, **kwargs)

    def teacher_client(self, **kwargs) -> Client | None:
        """The teacher server, for scoring (prompt_logprobs); None without one (e.g. the trainer scores)."""
        return None if self.teacher is None else Client.for_server(self.teacher, **kwargs)

    def teacher_sampler(self, **kwargs) -> tuple[Client, str] | None:
        """(client, model name) to sample the teacher from (with its context, e.g. the eval baseline), or None: the
        teacher server, else, when the trainer scores the teacher, the student server's base model. In merged mode
        that base name serves the student after the first reload: it is the teacher only while the LoRA is zero
        (step 0)."""
        if self.teacher is not None:
            return Client.for_server(self.teacher, **kwargs), self.teacher_model
        if self.teacher_scorer == "trainer":
            return Client.for_server(self.student, **kwargs), BASE_NAME
        return None


def on_running_server(config, server: VLLMServer, adapter_prefix: str = STUDENT_ADAPTER) -> Deployment:
    """A run on a server that outlives it (a benchmark's, kept for many runs): the server also scores the teacher when
    a vLLM teacher is needed, and the group is empty, so the run stops nothing."""
    scorer = teacher_scorer(config)
    teacher = server if scorer == "vllm" and needs_teacher_scores(config) else None
    return Deployment(ServerGroup([]), server, teacher, adapter_prefix, BASE_NAME if teacher else None, scorer)


def max_model_len(config, model_dir: str) -> int:
    """The servers' context: the training row plus room for the teacher's context, at most what the model holds."""
    wanted = config.seq_len + CONTEXT_MARGIN_TOKENS
    try:
        with open(os.path.join(os.path.expanduser(model_dir), "config.json")) as f:
            limit = json.load(f).get("max_position_embeddings") or wanted
    except OSError:  # a hub id: let vLLM check
        return wanted
    return min(wanted, int(limit))


def teacher_topk(config) -> int:
    """How many top-k log-probs teacher scoring asks for (0 = none); the servers start allowing that many."""
    return config.loss.topk if config.loss.topk_tau > 0 else 0


def build_servers(config, plan, *, log_dir: str, cache_dir: str | None = None, cpu_core: int = 0) -> Deployment:
    """Unstarted servers for `plan`; start them with `with deployment.group:` (stops all on exit). CPU mode: the
    student server runs on core `cpu_core`."""
    merged = config.weights.mode == "merged"
    if merged and plan.teacher_shared:
        raise ValueError("weights.mode: 'merged' reloads the student server's base weights every step, so the "
                         "teacher cannot share it; give the teacher its own GPUs (teacher_gpu_ids)")
    api_key = config.inference.api_key or secrets.token_urlsafe(24)  # one per run, shared by its servers

    # Versions loaded at once: the batches sampling (at most max_async_level + 1 versions) and the newest one.
    max_loras = config.max_async_level + 2

    def server(sp, *, name, served, lora_rank, dev_mode, cpu_core):
        model = os.path.expanduser(sp.model)
        return VLLMServer(model, name=name, served_name=served, port=sp.port, gpu_ids=sp.devices or None,
                          cpu_core=cpu_core, tp=sp.tp, dp=sp.dp,
                          gpu_memory_utilization=config.inference.gpu_memory_utilization, lora_rank=lora_rank,
                          max_loras=max_loras, dev_mode=dev_mode, max_model_len=max_model_len(config, model),
                          dtype=config.model.dtype, kv_cache_gib=config.inference.kv_cache_gb, api_key=api_key,
                          log_dir=log_dir, cache_dir=cache_dir, uds=config.inference.transport == "uds",
                          max_logprobs=teacher_topk(config))

    lora_rank = 0 if merged else config.lora.rank
    name = "student+teacher" if plan.teacher_shared else "student"
    student = server(plan.student, name=name, served=BASE_NAME, lora_rank=lora_rank, dev_mode=merged,
                     cpu_core=cpu_core)
    teacher, teacher_model = None, None
    if plan.teacher_shared:
        teacher, teacher_model = student, BASE_NAME
    elif plan.teacher is not None:
        teacher = server(plan.teacher, name="teacher", served=TEACHER_NAME, lora_rank=0, dev_mode=False, cpu_core=1)
        teacher_model = TEACHER_NAME
    servers = [student] + ([teacher] if teacher is not None and teacher is not student else [])
    return Deployment(ServerGroup(servers), student, teacher, BASE_NAME if merged else STUDENT_ADAPTER,
                      teacher_model, plan.teacher_scorer)
