import pytest

from configs import demo, rl
from ctxd_jax.config import ConfigError, parse_gpu_ids, redacted, resolve, teacher_scorer, validate
from ctxd_jax.plan import Gpus, visible_devices
from ctxd_jax.envs.persona import style_context
from ctxd_jax.envs.sokoban import TEACHER_CONTEXT

CPU = Gpus()
THREE = Gpus(inference=(0,), teacher=(1,), trainer=(2,))
VLLM = {"teacher__scorer": "vllm"}  # a teacher vLLM server scores, as before the trainer could


def _config(**overrides):
    c = rl.get_config()
    for path, value in overrides.items():
        *parents, leaf = path.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _error(config, gpus=CPU) -> str:
    with pytest.raises(ConfigError) as e:
        validate(config, gpus)
    return str(e.value)


def test_defaults_are_the_reference():
    c = rl.get_config()
    assert (c.loss.adv_tau, c.loss.teacher_tau, c.loss.student_tau) == (1.0, 1.0, 1.0)
    assert c.advantage.use_full_reward_baseline and not c.advantage.kl_only_incorrect
    assert (c.batch_size, c.rollouts_per_example) == (256, 16)
    assert (c.sampling.max_tokens, c.sampling.temperature) == (8192, 1.0)
    assert (c.optim.lr, c.optim.max_norm, c.lora.rank, c.lora.alpha) == (1e-5, 1.0, 16, 64)
    assert c.teacher.eval_baseline and c.teacher.context is None  # the environment's own context
    assert resolve(c, THREE)[0].teacher.context == TEACHER_CONTEXT
    assert c.env.sokoban.to_dict() == dict(seed=40, num_train=15000, num_eval=1000, min_w=4, max_w=9, min_h=4,
                                           max_h=9, min_boxes=1, max_boxes=7, max_depth=80)
    assert not c.buffer.skip_verification
    assert c.inference.parallel.dp is None and c.inference.parallel.tp == 1
    assert c.max_async_level == 1
    assert (c.loss.ratio_type, c.loss.sequence_clip_high, c.loss.kl_tau) == ("token", 10.0, 0.0)
    assert not c.advantage.length_weighted_mean


def test_taus_live_only_in_loss():
    c = rl.get_config().to_dict()
    holders = [k for k, v in c.items() if isinstance(v, dict) and "teacher_tau" in v]
    assert holders == ["loss"]


def test_config_is_locked():
    with pytest.raises(AttributeError):
        rl.get_config().loss.tau = 1.0


def test_demo_is_valid_on_cpu():
    config, plan, warnings = resolve(demo.get_config(), CPU)
    # one server: the student's adapters and the base model, which is the teacher and scores it (demo.py says why)
    assert plan.cpu and plan.teacher_shared and plan.servers == (plan.student,)
    assert (plan.teacher_scorer, plan.teacher_logprobs) == ("vllm", True)
    assert plan.student.roles == ("student", "teacher") and plan.student.gpu_ids == ()
    assert not config.model.path.startswith("~")
    assert warnings == []
    c = demo.get_config()
    c.teacher.scorer = "vllm"
    _, plan, _ = resolve(c, CPU)
    assert plan.teacher_shared and plan.student.roles == ("student", "teacher") and plan.teacher_scorer == "vllm"


@pytest.mark.parametrize("text,ids", [("", ()), ("0", (0,)), ("0,1, 3", (0, 1, 3)), ("2,", (2,))])
def test_parse_gpu_ids(text, ids):
    assert parse_gpu_ids("inference_gpu_ids", text) == ids


@pytest.mark.parametrize("text", ["a", "0,0", "-1", "1.5"])
def test_parse_gpu_ids_rejects(text):
    with pytest.raises(ConfigError, match="^inference_gpu_ids: "):
        parse_gpu_ids("inference_gpu_ids", text)


@pytest.mark.parametrize("tau", ["teacher_tau", "student_tau", "topk_tau"])
def test_kl_tau_needs_teacher_gpus_with_a_vllm_teacher(tau):
    taus = {"loss__teacher_tau": 0.0, "loss__student_tau": 0.0, f"loss__{tau}": 0.5}
    no_teacher_gpus = Gpus(inference=(0,), trainer=(1,))
    msg = _error(_config(**taus, **VLLM), no_teacher_gpus)
    assert msg.startswith("teacher_gpu_ids: ") and f"{tau}=0.5" in msg and "teacher.scorer='vllm'" in msg
    validate(_config(**taus, **VLLM), THREE)  # fine with a teacher
    _, plan, warnings = resolve(_config(**taus), no_teacher_gpus)  # the trainer scores the base model
    assert plan.teacher is None and plan.teacher_scorer == "trainer" and plan.teacher_logprobs and warnings == []


def test_pure_rl_needs_no_teacher():
    c = _config(loss__teacher_tau=0.0, loss__student_tau=0.0, **VLLM)
    _, plan, warnings = resolve(c, Gpus(inference=(0,), trainer=(1,)))
    assert plan.teacher is None
    assert any(w.startswith("teacher.eval_baseline: ") for w in warnings)
    # The base model is the teacher: the student server samples it for the baseline, no warning.
    _, plan, warnings = resolve(_config(loss__teacher_tau=0.0, loss__student_tau=0.0), Gpus(inference=(0,),
                                                                                           trainer=(1,)))
    assert plan.teacher is None and not plan.teacher_logprobs and warnings == []


def test_teacher_scorer():
    assert teacher_scorer(_config()) == "trainer"
    assert teacher_scorer(_config(teacher__model="/models/other")) == "vllm"
    assert teacher_scorer(_config(teacher__model="Qwen/Qwen3-4B-Instruct-2507")) == "trainer"  # = model.path
    assert teacher_scorer(_config(**VLLM)) == "vllm"
    assert _error(_config(teacher__scorer="both")).startswith("teacher.scorer: 'both' is not one of")
    assert _error(_config(teacher__scorer="trainer", teacher__model="/models/other")) == (
        "teacher.scorer: 'trainer' scores with the student's base model (LoRA off), but teacher.model is "
        "'/models/other'; use 'vllm' or 'auto'")
    _, plan, warnings = resolve(_config(), THREE)
    assert plan.teacher is None and plan.servers == (plan.student,)
    assert warnings == ["teacher_gpu_ids: unused: the teacher is the student's base model, the trainer scores it "
                        "(teacher.scorer='auto'); no teacher server starts"]
    assert "teacher = the student's base model: log-probs from the JAX trainer (LoRA off)" in plan.describe()


def test_batch_divisible_by_group():
    assert _error(_config(batch_size=250)).startswith("batch_size: 250 is not divisible by rollouts_per_example=16")


def test_dp_inferred_and_checked():
    gpus = Gpus(inference=(0, 1, 2, 3), teacher=(4,), trainer=(5,))
    config, plan, _ = resolve(_config(), gpus)
    assert config.inference.parallel.dp == 4 and plan.student.dp == 4
    tp2 = _config(inference__parallel__tp=2, **VLLM)
    config, plan, _ = resolve(tp2, Gpus(inference=(0, 1, 2, 3), teacher=(4, 5), trainer=(6,)))
    assert (plan.student.dp, plan.student.tp, plan.teacher.dp) == (2, 2, 1)
    assert _error(tp2, gpus).startswith("inference.parallel.tp: 2 does not divide the 1 teacher")
    assert _error(_config(inference__parallel__dp=3), gpus).startswith("inference.parallel.dp: dp=3 x tp=1 != 4")
    assert _error(_config(inference__parallel__tp=3), gpus).startswith("inference.parallel.tp: 3 does not divide")
    validate(_config(inference__parallel__dp=4), gpus)


def test_cpu_mode_is_one_server():
    assert _error(_config(inference__parallel__dp=2)).startswith("inference.parallel.dp: CPU mode")
    assert _error(_config(inference__parallel__tp=2)).startswith("inference.parallel.tp: CPU mode")


@pytest.mark.parametrize("field,value", [
    ("optim__lr", 0.0), ("optim__lr", -1e-5), ("sampling__max_tokens", 0), ("lora__alpha", -1.0),
    ("batch_size", 0), ("seq_len", 0), ("loss__sequence_clip_high", 0.0),
])
def test_non_positive(field, value):
    assert _error(_config(**{field: value})).startswith(f"{field.replace('__', '.')}: must be > 0")


@pytest.mark.parametrize("tau", ["adv_tau", "teacher_tau", "student_tau", "topk_tau", "kl_tau"])
def test_negative_tau(tau):
    assert _error(_config(**{f"loss__{tau}": -0.1})).startswith(f"loss.{tau}: must be >= 0")


@pytest.mark.parametrize("t", [-1.0, 0.0])
def test_temperature(t):
    assert _error(_config(sampling__temperature=t)).startswith("sampling.temperature: must be > 0")


def test_max_tokens_fits_seq_len():
    assert _error(_config(sampling__max_tokens=16884)).startswith("sampling.max_tokens: 16884 leaves no room")


def test_choices_and_bounds():
    assert _error(_config(model__dtype="float16")).startswith("model.dtype: ")
    assert _error(_config(optim__schedule="step")).startswith("optim.schedule: ")
    assert _error(_config(weights__mode="full")).startswith("weights.mode: ")
    assert _error(_config(lora__targets=("q_proj", "v_proj"))).startswith("lora.targets: only LoRA on all of")
    assert _error(_config(loss__token_mask_low=9.0)).startswith("loss.token_mask_low: ")
    assert _error(_config(loss__topk_tau=1.0, loss__topk=-1)).startswith("loss.topk: must be >= 0")
    assert _error(_config(loss__topk_direction="both")).startswith("loss.topk_direction: 'both' is not one of")
    assert _error(_config(loss__jsd_beta=1.0)).startswith("loss.jsd_beta: must be in (0, 1)")
    assert _error(_config(teacher__lora="frozen")).startswith("teacher.lora: 'frozen' is not one of")
    assert _error(_config(teacher__ema_decay=1.0)).startswith("teacher.ema_decay: must be in [0, 1)")


def test_full_vocabulary_and_teacher_lora_need_the_trainer_to_score_the_teacher():
    validate(_config(loss__topk_tau=1.0, loss__topk=0, teacher__lora="ema"), CPU)  # the trainer scores: allowed
    msg = _error(_config(loss__topk_tau=1.0, loss__topk=0, teacher__scorer="vllm"), THREE)
    assert msg.startswith("loss.topk: 0 (the full vocabulary) runs the teacher inside the train step, but a vLLM")
    for lora in ("live", "ema"):
        msg = _error(_config(teacher__lora=lora, teacher__scorer="vllm"), THREE)
        assert msg.startswith(f"teacher.lora: {lora!r} needs the trainer to score the teacher, but a vLLM server")
    assert _error(_config(loss__ratio_type="seq")) == "loss.ratio_type: 'seq' is not one of ('token', 'sequence')"


def test_gpu_lists_all_or_none():
    assert _error(_config(), Gpus(teacher=(0,), trainer=(1,))).startswith("inference_gpu_ids: empty")
    assert _error(_config(), Gpus(inference=(0,), teacher=(1,))).startswith("trainer_gpu_ids: empty")


def test_merged_weights_cannot_share_teacher_server():
    assert _error(_config(weights__mode="merged", **VLLM)).startswith("weights.mode: 'merged'")
    validate(_config(weights__mode="merged", **VLLM), THREE)  # teacher on its own server
    validate(_config(weights__mode="merged"), CPU)  # the trainer scores the teacher: no teacher server at all


def test_teacher_sharing():
    same = Gpus(inference=(0,), teacher=(0,), trainer=(1,))
    _, plan, _ = resolve(_config(**VLLM), same)
    assert plan.teacher_shared
    half = dict(inference__gpu_memory_utilization=0.45)  # two servers on one GPU must share it
    _, plan, _ = resolve(_config(teacher__model="/models/other", **half), same)
    assert not plan.teacher_shared and plan.teacher.model == "/models/other" and plan.teacher.port is None
    _, plan, _ = resolve(_config(teacher__model="/models/other", inference__transport="tcp", **half), same)
    assert (plan.student.port, plan.teacher.port) == (8000, 8001)
    _, plan, _ = resolve(_config(**half, **VLLM), Gpus(inference=(0, 1), teacher=(1,), trainer=(2,)))
    assert not plan.teacher_shared and plan.teacher.gpu_ids == (1,) and plan.student.dp == 2


def test_num_train_workers():
    _, plan, _ = resolve(_config(), Gpus(inference=(0,), teacher=(1,), trainer=(2, 3, 4, 5)))
    assert plan.trainer.num_train_workers == 4
    _, plan, _ = resolve(_config(trainer__tp=2), Gpus(inference=(0,), teacher=(1,), trainer=(2, 3, 4, 5)))
    assert plan.trainer.num_train_workers == 2
    assert _error(_config(trainer__tp=3), Gpus(inference=(0,), teacher=(1,), trainer=(2, 3))).startswith("trainer.tp")
    _, plan, _ = resolve(_config(), CPU)
    assert plan.trainer.gpu_ids == () and plan.trainer.num_train_workers == 1


def test_warnings():
    def warns(**kw):
        return validate(_config(**VLLM, **kw), THREE)

    assert warns() == []
    assert any(w.startswith("advantage.kl_only_incorrect: ") for w in
               warns(advantage__kl_only_incorrect=True, loss__teacher_tau=0.0, loss__student_tau=0.0))
    assert any(w.startswith("buffer.skip_verification: ") for w in warns(buffer__skip_verification=True))
    assert warns(buffer__skip_verification=True, loss__adv_tau=0.0) == []
    one_gpu = Gpus(inference=(0,), teacher=(0,), trainer=(0,))
    assert validate(_config(inference__gpu_memory_utilization=0.45, trainer__gpu_memory_fraction=0.45, **VLLM),
                    one_gpu) == []


def test_shared_gpus_must_fit():
    with pytest.raises(ConfigError, match=r"^inference.gpu_memory_utilization: GPU 0 is shared .*trainer 0.9"):
        validate(_config(), Gpus(inference=(0,), teacher=(1,), trainer=(0,)))
    # The reference layout with the teacher beside a student replica: two servers on GPU 1.
    layout = Gpus(inference=(0, 1), teacher=(1,), trainer=(2, 3))
    with pytest.raises(ConfigError, match=r"GPU 1 is shared \(student server 0.9, teacher server 0.9"):
        validate(_config(**VLLM), layout)
    assert validate(_config(inference__gpu_memory_utilization=0.45, **VLLM), layout) == []
    # A trainer over both GPUs beside the student's two engines: room for NCCL outside the shares.
    mesh = Gpus(inference=(0, 1), trainer=(0, 1))
    with pytest.raises(ConfigError, match=r"GPU 0 is shared \(student server 0.5, trainer 0.45: 0.95 > 0.85\) \(the "):
        validate(_config(inference__gpu_memory_utilization=0.5, trainer__gpu_memory_fraction=0.45), mesh)
    assert validate(_config(inference__gpu_memory_utilization=0.4, trainer__gpu_memory_fraction=0.35), mesh) == []
    with pytest.raises(ConfigError, match=r"^trainer.attn_impl: 'flash'"):
        validate(_config(trainer__attn_impl="flash"), THREE)


def test_gpu_ids_index_the_inherited_visible_devices():
    assert visible_devices(None) is None and visible_devices("") == () and visible_devices("2, 3") == ("2", "3")
    # A scheduler (or a second run on the same host) hands this run GPUs 2,3: ids 0,1 are those two.
    gpus = Gpus(inference=(0,), teacher=(1,), trainer=(0, 1), visible=("2", "3"))
    _, plan, _ = resolve(_config(inference__gpu_memory_utilization=0.4, trainer__gpu_memory_fraction=0.35, **VLLM),
                         gpus)
    assert (plan.student.devices, plan.teacher.devices, plan.trainer.devices) == (("2",), ("3",), ("2", "3"))
    assert plan.student.gpu_ids == (0,) and "on GPUs 0 (CUDA_VISIBLE_DEVICES=2) (dp=1" in plan.describe()
    assert "JAX trainer on GPUs 0,1 (CUDA_VISIBLE_DEVICES=2,3) (num_train_workers=2" in plan.describe()
    uuids = Gpus(inference=(1,), trainer=(0,), visible=("GPU-a", "GPU-b"))
    _, plan, _ = resolve(_config(), uuids)
    assert (plan.student.devices, plan.trainer.devices) == (("GPU-b",), ("GPU-a",))
    _, plan, _ = resolve(_config(), Gpus(inference=(1,), trainer=(0,)))  # unset: the machine's own ids
    assert (plan.student.devices, plan.trainer.devices) == (("1",), ("0",)) and "CUDA_VISIBLE" not in plan.describe()
    assert _error(_config(), Gpus(inference=(0,), trainer=(2,), visible=("4", "5"))) == (
        "trainer_gpu_ids: GPU 2 is not one of the 2 in CUDA_VISIBLE_DEVICES='4,5' (GPU ids index into it)")
    assert _error(_config(), Gpus(inference=(0,), trainer=(1,), visible=())).startswith(
        "inference_gpu_ids: GPU 0 is not one of the 0 in CUDA_VISIBLE_DEVICES=''")


def test_switching_environment_takes_its_defaults():
    config, _, _ = resolve(_config(env__name="ahoy"), CPU)
    assert config.env.to_dict() == {"name": "ahoy", "args": {"seed": 0, "num_eval": 96, "num_train": None},
                                    "reward_errors": "stop"}
    assert config.teacher.context == style_context("ahoy")
    config, _, _ = resolve(_config(env__name="cheers", env__cheers__num_train=10, teacher__context=""), CPU)
    assert config.env.args.num_train == 10 and config.teacher.context == ""
    assert _error(_config(env__name="nope")).startswith("env.name: unknown environment 'nope' (known: ahoy, arith, caps")
    assert _error(_config(env__name="ahoy", env__ahoy__num_eval=0)).startswith("env.ahoy.num_eval: 0 must be in")
    assert _error(_config(env__sokoban__num_train=0)).startswith("env.sokoban: ")


def test_transport_and_output_dir():
    assert _error(_config(inference__transport="http")).startswith("inference.transport: 'http' is not one of")
    assert _error(_config(output_dir="")).startswith("output_dir: is empty")
    _, plan, _ = resolve(_config(), CPU)
    assert plan.student.port is None and "a private Unix socket" in plan.describe()


def test_reward_errors_and_context_template_are_checked():
    assert resolve(_config(env__reward_errors="zero"), CPU)[0].env.reward_errors == "zero"
    assert _error(_config(env__reward_errors="skip")) == "env.reward_errors: 'skip' is not one of ('stop', 'zero')"
    assert _error(_config(env__name="ahoy", teacher__context="Solution: {solution}")).startswith(
        "teacher.context: {solution} is not a field of example 'ahoy-train-0' (fields: question)")


def test_environment_from_outside_the_package(tmp_path, monkeypatch):
    from ctxd_jax import envs
    from ctxd_jax.config import env_config

    (tmp_path / "outside_task.py").write_text(
        "from ctxd_jax.envs import Environment, Example\n"
        "class Task(Environment):\n"
        "    def __init__(self, word: str = 'hi', n: int = 3):\n"
        "        self._ex = [Example(f't{i}', ({'role': 'user', 'content': word},), {}) for i in range(n)]\n"
        "    def examples(self, split):\n"
        "        return self._ex\n"
        "    def reward(self, example, text):\n"
        "        return 1.0\n"
        "NotATask = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(envs.base, "_REGISTRY", dict(envs.base._REGISTRY))  # other tests see no outside name
    assert _error(_config(env__name="outside_task:Nope")) == (
        "env.name: 'outside_task:Nope' is not a subclass of ctxd_jax.envs.Environment")
    assert _error(_config(env__name="outside_task:NotATask")).startswith("env.name: 'outside_task:NotATask' is not")
    assert _error(_config(env__name="missing_pkg.mod:Task")).startswith(
        "env.name: cannot import 'missing_pkg.mod' (ModuleNotFoundError")
    # named in a config file: its defaults; on the command line (train.py loads it first): config.env.args
    assert resolve(_config(env__name="outside_task:Task"), CPU)[0].env.args.to_dict() == {"word": "hi", "n": 3}
    c = _config()
    with c.unlocked():
        c.env = env_config("outside_task:Task")
        c.env.reward_errors = "stop"
        c.env.name = "outside_task:Task"
    c.env.args.n = 5
    config, _, _ = resolve(c, CPU)
    assert config.env.args.n == 5 and len(envs.env_from_config(config).examples("train")) == 5
@pytest.mark.parametrize("field,value,allowed", [
    ("optim__max_norm", -1.0, "> 0"), ("optim__max_norm", 0.0, "> 0"), ("optim__lr", float("inf"), "> 0"),
    ("optim__lr", float("nan"), "> 0"), ("optim__b1", 2.0, "in [0, 1)"), ("optim__b2", 1.0, "in [0, 1)"),
    ("optim__weight_decay", -1.0, ">= 0"), ("optim__warmup_steps", -5, ">= 0"),
    ("optim__max_nonfinite_steps", 0, "> 0"), ("loss__teacher_tau", float("inf"), ">= 0"),
    ("loss__kl_tau", float("nan"), ">= 0"), ("loss__token_mask_low", -1.0, ">= 0"),
    ("sampling__temperature", float("inf"), "> 0"), ("parity__max_mismatch_kl", float("nan"), ">= 0"),
    ("lora__rank", 1000, "in (0, 512]"), ("inference__port", 0, "in [1, 65534]"),
    ("inference__port", 65535, "in [1, 65534]"), ("max_async_level", 1000, "in [0, 8]"),
    ("max_async_level", -1, "in [0, 8]"), ("inference__gpu_memory_utilization", 0.0, "in (0, 1]"),
    ("ckpt__keep", 0, "> 0"), ("eval__interval", -1, ">= 0"),
])
def test_numbers_out_of_range(field, value, allowed):
    """One line naming the field, the allowed range and the value given."""
    message = _error(_config(**{field: value}))
    assert message.startswith(f"{field.replace('__', '.')}: must be {allowed}") and repr(value) in message
    assert "\n" not in message


def test_gpu_ids_the_machine_does_not_have():
    gpus = Gpus(inference=(0,), trainer=(2,), machine=2)
    assert _error(_config(), gpus).startswith("trainer_gpu_ids: GPU 2 does not exist: nvidia-smi -L lists 2")
    validate(_config(), Gpus(inference=(0,), trainer=(1,), machine=2))
    validate(_config(), Gpus(inference=(0,), trainer=(7,)))  # machine unknown: not checked


def test_tcp_with_merged_weights_is_refused():
    message = _error(_config(inference__transport="tcp", weights__mode="merged"))
    assert message.startswith("inference.transport: 'tcp' with weights.mode='merged' opens vLLM's dev endpoints")


def test_redacted_keeps_a_marker_not_the_key():
    assert redacted(_config(inference__api_key="s3cret")).inference.api_key == "<set, not shown>"
    assert "s3cret" not in str(redacted(_config(inference__api_key="s3cret")))
    assert redacted(_config()).inference.api_key == ""  # none set: a random one per run


def test_teacher_context_not_utf8():
    context = b"guide \xff".decode("utf-8", "surrogateescape")  # undecodable bytes from a command line
    assert _error(_config(teacher__context=context)) == ("teacher.context: is not valid UTF-8 text (the tokenizer "
                                                         "needs it)")


def test_resume_step_needs_resume():
    assert _error(_config(ckpt__resume_step=3)).startswith("ckpt.resume_step: must be >= 0 and given with ckpt.resume")
    validate(_config(ckpt__resume_step=3, ckpt__resume=True), CPU)
