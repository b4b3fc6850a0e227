"""Config validation and the values derived from it: inferred dp, train workers, the plan of processes.

Pure (no JAX, no HTTP), so a dry run and its tests are instant. Every refusal is a `ConfigError("field: message")`;
settings that are legal but have no effect come back as warnings.
"""

import dataclasses
import os

import ml_collections
from ml_collections import config_dict

from ctxd_jax import envs
from ctxd_jax.allowed import (ATTN_IMPLS, DTYPES, KL_NORMALIZE, LOGPROB_SOURCES, MPS_MODES, RANGES, RATIO_TYPES,
                              REMAT_POLICIES, SCHEDULES, TAU_FIELDS, TEACHER_LORAS, TEACHER_SCORERS, TOPK_DIRECTIONS,
                              TRANSPORTS, WEIGHT_MODES)
from ctxd_jax.plan import Gpus, Plan, ServerPlan, TrainerPlan
from ctxd_jax.models.names import LORA_TARGETS
from ctxd_jax.rewards import REWARD_ERRORS


class ConfigError(ValueError):
    """A config value that must be fixed before anything starts; str() is 'field: message'."""


def parse_gpu_ids(field: str, text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1); '' -> () (none)."""
    ids = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise ConfigError(f"{field}: {part!r} is not a GPU id (expected a comma list of integers like 0,1)")
        ids.append(int(part))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{field}: GPU ids repeat in {text!r}")
    return tuple(ids)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _get(config: ml_collections.ConfigDict, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def needs_teacher_scores(config: ml_collections.ConfigDict) -> bool:
    loss = config.loss
    return loss.teacher_tau > 0 or loss.student_tau > 0 or loss.topk_tau > 0


def full_vocab(config: ml_collections.ConfigDict) -> bool:
    """Top-k distillation over the whole vocabulary (loss.topk = 0): the teacher runs inside the train step."""
    return config.loss.topk_tau > 0 and config.loss.topk == 0


def _teacher_model(config: ml_collections.ConfigDict) -> str:
    return config.teacher.model or config.model.path


def _teacher_is_base(config: ml_collections.ConfigDict) -> bool:
    return os.path.expanduser(_teacher_model(config)) == os.path.expanduser(config.model.path)


def teacher_scorer(config: ml_collections.ConfigDict) -> str:
    """'trainer' or 'vllm': `teacher.scorer` with 'auto' resolved (the trainer when the teacher is the base model)."""
    if config.teacher.scorer != "auto":
        return config.teacher.scorer
    return "trainer" if _teacher_is_base(config) else "vllm"


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    for field, (allowed, why) in RANGES.items():
        value = _get(config, field)
        _require(value in allowed, field, f"must be {allowed}{why}, got {value!r}")


def _check_values(config: ml_collections.ConfigDict) -> None:
    _check_ranges(config)
    _require(config.batch_size % config.rollouts_per_example == 0, "batch_size",
             f"{config.batch_size} is not divisible by rollouts_per_example={config.rollouts_per_example}")
    _require(config.sampling.max_tokens < config.seq_len, "sampling.max_tokens",
             f"{config.sampling.max_tokens} leaves no room for the prompt in seq_len={config.seq_len}")
    _require(config.loss.topk_direction in TOPK_DIRECTIONS, "loss.topk_direction",
             f"{config.loss.topk_direction!r} is not one of {TOPK_DIRECTIONS}")
    _require(config.loss.ratio_type in RATIO_TYPES, "loss.ratio_type",
             f"{config.loss.ratio_type!r} is not one of {RATIO_TYPES}")
    _require(config.advantage.kl_normalize in KL_NORMALIZE, "advantage.kl_normalize",
             f"{config.advantage.kl_normalize!r} is not one of {KL_NORMALIZE}")
    for kind in ("token", "geo", "sequence"):
        low, high = config.loss[f"{kind}_mask_low"], config.loss[f"{kind}_mask_high"]
        _require(low <= high, f"loss.{kind}_mask_low", f"need 0 <= low <= high, got [{low}, {high}]")
    _require(config.model.dtype in DTYPES, "model.dtype", f"{config.model.dtype!r} is not one of {DTYPES}")
    _require(config.optim.schedule in SCHEDULES, "optim.schedule",
             f"{config.optim.schedule!r} is not one of {SCHEDULES}")
    _require(set(config.lora.targets) == set(LORA_TARGETS), "lora.targets",
             f"only LoRA on all of {LORA_TARGETS} is built, got {tuple(config.lora.targets)}")
    _require(config.weights.mode in WEIGHT_MODES, "weights.mode",
             f"{config.weights.mode!r} is not one of {WEIGHT_MODES}")
    _require(bool(config.model.path), "model.path", "is empty (set it to a local Hugging Face folder)")
    _require(config.trainer.attn_impl in ATTN_IMPLS, "trainer.attn_impl",
             f"{config.trainer.attn_impl!r} is not one of {ATTN_IMPLS}")
    _require(config.trainer.mps in MPS_MODES, "trainer.mps", f"{config.trainer.mps!r} is not one of {MPS_MODES}")
    _require(config.trainer.remat_policy in REMAT_POLICIES, "trainer.remat_policy",
             f"{config.trainer.remat_policy!r} is not one of {REMAT_POLICIES}")
    _require(config.sampling.logprobs in LOGPROB_SOURCES, "sampling.logprobs",
             f"{config.sampling.logprobs!r} is not one of {LOGPROB_SOURCES}")
    _require(config.teacher.scorer in TEACHER_SCORERS, "teacher.scorer",
             f"{config.teacher.scorer!r} is not one of {TEACHER_SCORERS}")
    _require(config.teacher.scorer != "trainer" or _teacher_is_base(config), "teacher.scorer",
             f"'trainer' scores with the student's base model (LoRA off), but teacher.model is "
             f"{config.teacher.model!r}; use 'vllm' or 'auto'")
    _require(config.teacher.lora in TEACHER_LORAS, "teacher.lora",
             f"{config.teacher.lora!r} is not one of {TEACHER_LORAS}")
    if teacher_scorer(config) == "vllm":
        _require(not full_vocab(config), "loss.topk",
                 "0 (the full vocabulary) runs the teacher inside the train step, but a vLLM server scores it "
                 "(teacher.scorer resolves to 'vllm'); set loss.topk > 0 or use the base model as the teacher")
        _require(config.teacher.lora == "off", "teacher.lora",
                 f"{config.teacher.lora!r} needs the trainer to score the teacher, but a vLLM server scores it "
                 "(teacher.scorer resolves to 'vllm'); use 'off'")
    _require(config.inference.transport in TRANSPORTS, "inference.transport",
             f"{config.inference.transport!r} is not one of {TRANSPORTS}")
    _require(config.inference.transport != "tcp" or config.weights.mode != "merged", "inference.transport",
             "'tcp' with weights.mode='merged' opens vLLM's dev endpoints (weight reloads, /collective_rpc), which "
             "take no key, to every local user; use transport 'uds' or weights.mode 'adapter'")
    _require(bool(config.output_dir), "output_dir", "is empty (the run folder: checkpoints, metrics, plots)")
    _require(config.env.reward_errors in REWARD_ERRORS, "env.reward_errors",
             f"{config.env.reward_errors!r} is not one of {REWARD_ERRORS}")
    step = config.ckpt.resume_step
    _require(step is None or (config.ckpt.resume and step >= 0), "ckpt.resume_step",
             f"must be >= 0 and given with ckpt.resume=true, got {step!r}")
    _require(_utf8(config.teacher.context), "teacher.context", "is not valid UTF-8 text (the tokenizer needs it)")


def _utf8(text: str | None) -> bool:
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_layout(config: ml_collections.ConfigDict, gpus: Gpus) -> None:
    tp, dp = config.inference.parallel.tp, config.inference.parallel.dp
    if gpus.cpu:
        _require(tp == 1, "inference.parallel.tp", f"CPU mode (no GPU ids) runs one server with tp=1, got {tp}")
        _require(dp in (None, 1), "inference.parallel.dp", f"CPU mode (no GPU ids) runs one server with dp=1, got {dp}")
        _require(config.trainer.tp == 1, "trainer.tp",
                 f"CPU mode (no GPU ids) needs trainer.tp=1, got {config.trainer.tp}")
        return
    for field, ids in (("inference_gpu_ids", gpus.inference), ("trainer_gpu_ids", gpus.trainer)):
        _require(bool(ids), field, "empty while other GPU ids are given (give all, or none for CPU mode)")
    if gpus.visible is not None:
        count, where = len(gpus.visible), (f"is not one of the {len(gpus.visible)} in CUDA_VISIBLE_DEVICES="
                                           f"{','.join(gpus.visible)!r} (GPU ids index into it)")
    else:
        count, where = gpus.machine, f"does not exist: nvidia-smi -L lists {gpus.machine}"
    for field, ids in (("inference_gpu_ids", gpus.inference), ("teacher_gpu_ids", gpus.teacher),
                       ("trainer_gpu_ids", gpus.trainer)):
        for i in ids:
            _require(count is None or i < count, field, f"GPU {i} {where}")
    n = len(gpus.inference)
    _require(n % tp == 0, "inference.parallel.tp", f"{tp} does not divide the {n} inference GPUs")
    _require(dp is None or dp * tp == n, "inference.parallel.dp",
             f"dp={dp} x tp={tp} != {n} inference GPUs (leave dp unset to infer it)")
    vllm_teacher = teacher_scorer(config) == "vllm"
    if gpus.teacher and vllm_teacher:
        _require(len(gpus.teacher) % tp == 0, "inference.parallel.tp",
                 f"{tp} does not divide the {len(gpus.teacher)} teacher GPUs")
    _require(len(gpus.trainer) % config.trainer.tp == 0, "trainer.tp",
             f"{config.trainer.tp} does not divide the {len(gpus.trainer)} trainer GPUs")
    if needs_teacher_scores(config) and not gpus.teacher and vllm_teacher:
        taus = ", ".join(f"{t}={config.loss[t]}" for t in TAU_FIELDS[1:] if config.loss[t] > 0)
        raise ConfigError(f"teacher_gpu_ids: {taus} needs a teacher server (teacher.scorer="
                          f"{config.teacher.scorer!r}); give --teacher_gpu_ids or set these taus to 0")


def _warnings(config: ml_collections.ConfigDict, gpus: Gpus, plan: Plan) -> list[str]:
    loss, out = config.loss, []
    for field in ("wandb_entity", "run_name"):
        if config.log[field] and not config.log.wandb:
            out.append(f"log.{field}: no effect without log.wandb (the W&B project)")
    if config.advantage.kl_only_incorrect and loss.teacher_tau == 0 and loss.student_tau == 0:
        out.append("advantage.kl_only_incorrect: no effect, teacher_tau and student_tau are 0 (no KL terms to gate)")
    if config.buffer.skip_verification and loss.adv_tau > 0:
        out.append(f"buffer.skip_verification: every task reward is 0, so loss.adv_tau={loss.adv_tau} has no effect")
    if config.advantage.kl_normalize != "sum" and not (
            config.advantage.use_full_reward_baseline and (loss.teacher_tau > 0 or loss.student_tau > 0)):
        out.append("advantage.kl_normalize: no effect without the sequence KL (use_full_reward_baseline with "
                   "teacher_tau or student_tau > 0)")
    if config.buffer.skip_verification and config.advantage.kl_only_incorrect:
        out.append("advantage.kl_only_incorrect: no effect with buffer.skip_verification (rewards 0, the gate is 1)")
    if config.teacher.eval_baseline and plan.teacher is None and plan.teacher_scorer == "vllm":
        out.append("teacher.eval_baseline: no effect without a teacher server (give --teacher_gpu_ids)")
    if gpus.teacher and plan.teacher_scorer == "trainer":
        out.append(f"teacher_gpu_ids: unused: the teacher is the student's base model, the trainer scores it "
                   f"(teacher.scorer={config.teacher.scorer!r}); no teacher server starts")
    elif gpus.teacher and not needs_teacher_scores(config) and not config.teacher.eval_baseline:
        out.append("teacher_gpu_ids: unused (KL taus 0 and teacher.eval_baseline off); no teacher server starts")
    if loss.adv_tau == 0 and loss.teacher_tau == 0 and loss.student_tau == 0 and loss.topk_tau == 0:
        out.append("loss: every tau is 0, so every advantage is 0 and training changes nothing")
    return out


# A trainer over several GPUs allocates NCCL's buffers outside its share: on a GPU that a server shares with such a
# trainer, 0.5 + 0.45 hung the first step (H100, 80 GB, Qwen3-0.6B shape); 0.4 + 0.35 ran.
MESH_SHARED_LIMIT = 0.85


def gpu_users(config: ml_collections.ConfigDict, plan: Plan) -> dict[int, list[tuple[str, float, ServerPlan | None]]]:
    """Every GPU of the plan and the processes on it: (who, its configured share, its server; None = the trainer)."""
    users: dict[int, list[tuple[str, float, ServerPlan | None]]] = {}
    for server in plan.servers:
        for gpu in server.gpu_ids:
            users.setdefault(gpu, []).append(
                (f"{'+'.join(server.roles)} server", config.inference.gpu_memory_utilization, server))
    for gpu in plan.trainer.gpu_ids:
        users.setdefault(gpu, []).append(("trainer", config.trainer.gpu_memory_fraction, None))
    return users


def share_limit(plan: Plan, gpu: int, several_processes: bool = False) -> float:
    """The most the shares of `gpu` may add up to: MESH_SHARED_LIMIT beside a trainer over several GPUs (of this
    process, or of several processes' joint mesh), else 1."""
    mesh = several_processes or len(plan.trainer.gpu_ids) > 1
    return MESH_SHARED_LIMIT if mesh and gpu in plan.trainer.gpu_ids else 1.0


def check_gpu_memory(config: ml_collections.ConfigDict, plan: Plan, several_processes: bool = False) -> None:
    """Every process on a GPU takes its configured share of it; shares on one GPU must add up to at most its
    share_limit."""
    for gpu, users in sorted(gpu_users(config, plan).items()):
        total = sum(share for _, share, _ in users)
        limit = share_limit(plan, gpu, several_processes)
        if len(users) > 1 and total > limit + 1e-9:
            who = ", ".join(f"{name} {share}" for name, share, _ in users)
            why = " (the trainer's mesh needs room for NCCL outside both shares)" if limit < 1 else ""
            raise ConfigError(f"inference.gpu_memory_utilization: GPU {gpu} is shared ({who}: {total:.2f} > "
                              f"{limit:g}){why}; lower it and/or trainer.gpu_memory_fraction")


def check_memory_plan(config: ml_collections.ConfigDict, plan: Plan, memory_mib: int | None,
                      processes: int = 1) -> tuple[str, ...]:
    """Where each GPU's memory is known and the model folders are here: refuse a share smaller than its process's
    estimated need (ctxd_jax/memory.py; the trainer's data-parallel size is its GPUs on each of `processes` hosts).
    Returns the memory plan, a line per GPU (() where unknown)."""
    if memory_mib is None or plan.cpu:
        return ()
    from ctxd_jax import memory

    gib, lines, dp = memory_mib / 1024, [], plan.trainer.num_train_workers * processes
    for gpu, needs in sorted(memory.needs(config, plan, dp).items()):
        for need in needs:
            if need.gib is not None and need.gib > need.share * gib:
                others = sum(n.share for n in needs if n is not need)
                raise ConfigError(f"{need.field}: {need.share:g} of GPU {gpu} ({need.share * gib:.1f} of {gib:.1f} "
                                  f"GiB) cannot hold the {need.who}'s ~{need.gib:.1f} GiB ({need.what}); "
                                  + memory.suggestion(config, dp, need, others, share_limit(plan, gpu), gib))
        uses = "; ".join(f"{n.who} {'not estimated' if n.gib is None else f'~{n.gib:.1f} GiB'} of its {n.share:g} "
                         f"({n.share * gib:.1f} GiB)" for n in needs)
        lines.append(f"memory of GPU {gpu} ({gib:.1f} GiB): {uses}")
    return tuple(lines)


def make_plan(config: ml_collections.ConfigDict, gpus: Gpus) -> Plan:
    """The processes of a validated config (dp already resolved)."""
    tp = config.inference.parallel.tp
    port = config.inference.port if config.inference.transport == "tcp" else None
    student = ServerPlan(("student",), config.model.path, gpus.inference, config.inference.parallel.dp, tp, port,
                         gpus.devices(gpus.inference))
    teacher_model, scorer = _teacher_model(config), teacher_scorer(config)
    if gpus.cpu:
        wanted = needs_teacher_scores(config) or config.teacher.eval_baseline
        teacher_gpus = ()
    else:
        wanted = bool(gpus.teacher) and (needs_teacher_scores(config) or config.teacher.eval_baseline)
        teacher_gpus = gpus.teacher
    if not wanted or scorer == "trainer":  # the trainer scores the base model, the student server samples it
        teacher = None
    elif teacher_model == config.model.path and teacher_gpus == gpus.inference:
        # One server: the teacher is the base model, the student its LoRA adapter (half the memory and start-up).
        student = dataclasses.replace(student, roles=("student", "teacher"))
        teacher = student
    else:
        teacher = ServerPlan(("teacher",), teacher_model, teacher_gpus, max(len(teacher_gpus) // tp, 1), tp,
                             None if port is None else port + 1, gpus.devices(teacher_gpus))
    workers = max(len(gpus.trainer) // config.trainer.tp, 1)
    trainer = TrainerPlan(gpus.trainer, workers, config.trainer.tp, gpus.devices(gpus.trainer))
    return Plan(gpus.cpu, student, teacher, trainer, scorer, needs_teacher_scores(config))


def env_config(name: str) -> ml_collections.ConfigDict:
    """config.env: `name` picks the environment; one section per registered environment holds its keyword arguments
    at that environment's own defaults, so `--config.env.name=X --config.env.X.ARG=V` switches and overrides."""
    sections = {envs.section(env): {arg: config_dict.placeholder(kind) if default is None else default
                      for arg, (default, kind) in envs.default_args(env).items()} for env in envs.env_names()}
    return ml_collections.ConfigDict({"name": name, **sections})


def _resolve_env(config: ml_collections.ConfigDict) -> tuple[dict, envs.Environment]:
    """(env section of the resolved config: name and args of the chosen environment only, the environment). Builds it
    once (cheap: examples are lazy) so bad arguments fail before anything starts."""
    name, key = config.env.name, envs.section(config.env.name)
    try:
        defaults = envs.default_args(name)  # imports an environment from outside the package
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if name not in envs.env_names():
        raise ConfigError(f"env.name: unknown environment {name!r} (known: {', '.join(envs.env_names())})")
    _require(key in config.env or key == "args", f"env.{name}",
             "missing from the config (build config.env with env_config)")
    # an outside environment named in a config file (not on the command line) runs with its defaults
    args = config.env[key].to_dict() if key in config.env else {k: d for k, (d, _) in defaults.items()}
    extra = envs.settings(name, config.env)
    try:
        env = envs.get_env(name, **args, **extra)
    except TypeError as e:
        raise ConfigError(f"env.{key}: {e}") from e
    except ValueError as e:  # an environment names its argument 'env.ARG'
        message = str(e)
        if message.startswith(("env.name:", "env.verifiers.")):  # names its field in full
            raise ConfigError(message) from e
        raise ConfigError(f"env.{key}.{message[4:]}" if message.startswith("env.") else f"env.{key}: {message}") \
            from e
    return {"name": name, "args": args, "reward_errors": config.env.reward_errors,
            **({"verifiers": config.env.verifiers.to_dict()} if extra else {})}, env


def resolve(config: ml_collections.ConfigDict, gpus: Gpus) -> tuple[ml_collections.ConfigDict, Plan, list[str]]:
    """Validate; return (config with dp filled in, ~ expanded, env reduced to the chosen one's name and args, the
    teacher context defaulted to the environment's, plan, warnings).

    Raises ConfigError on the first bad field."""
    _check_values(config)
    _check_layout(config, gpus)
    env_section, env = _resolve_env(config)
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        resolved.env = env_section
    if resolved.teacher.context is None:
        resolved.teacher.context = env.default_context
    try:
        envs.check_context(resolved.teacher.context, env)
    except ValueError as e:  # names its field
        raise ConfigError(str(e)) from e
    resolved.model.path = os.path.expanduser(resolved.model.path)
    resolved.teacher.model = os.path.expanduser(resolved.teacher.model)
    if resolved.inference.parallel.dp is None:
        resolved.inference.parallel.dp = max(len(gpus.inference) // resolved.inference.parallel.tp, 1)
    plan = make_plan(resolved, gpus)
    check_gpu_memory(resolved, plan)
    plan = dataclasses.replace(plan, memory=check_memory_plan(resolved, plan, gpus.memory_mib, gpus.processes))
    if plan.teacher_shared and resolved.weights.mode == "merged":
        raise ConfigError("weights.mode: 'merged' reloads the server's base weights, which also serve the teacher; "
                          "use 'adapter' or give the teacher its own GPUs or model")
    return resolved, plan, _warnings(resolved, gpus, plan)


# What a printed or saved config shows for inference.api_key when one is set: the key itself is never printed or saved.
KEY_SET = "<set, not shown>"


def redacted(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` to print or save: inference.api_key replaced by KEY_SET where a key is set."""
    out = ml_collections.ConfigDict(config.to_dict())
    if out.inference.api_key:
        out.inference.api_key = KEY_SET
    return out


def validate(config: ml_collections.ConfigDict, gpus: Gpus) -> list[str]:
    """Raise ConfigError for the first bad field; return the warnings."""
    return resolve(config, gpus)[2]
