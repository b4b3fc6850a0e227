"""What each config field may be: the allowed choices, and the numeric ranges checked before anything starts (one
table, RANGES). Pure data, read by ctxd_jax/config.py's checks and by the modules whose math the choices select."""

import dataclasses
import math

TAU_FIELDS = ("adv_tau", "teacher_tau", "student_tau", "topk_tau")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "linear", "cosine")
WEIGHT_MODES = ("adapter", "merged")
ATTN_IMPLS = ("auto", "xla", "cudnn")
RATIO_TYPES = ("token", "sequence")  # loss.ratio_type; the loss reads this too
REMAT_POLICIES = ("nothing_saveable", "save_attention", "save_mlp", "dots_with_no_batch_dims_saveable")
# Who computes the teacher's log-probs: the JAX trainer (base weights, LoRA off; only when the teacher is the
# student's base model), a vLLM server (prompt_logprobs), or 'auto' = the trainer whenever it can.
TEACHER_SCORERS = ("auto", "trainer", "vllm")
LOGPROB_SOURCES = ("vllm", "trainer")  # sampling.logprobs
TRANSPORTS = ("uds", "tcp")
MPS_MODES = ("auto", "on", "off")  # trainer.mps
TOPK_DIRECTIONS = ("forward", "reverse", "jsd")  # loss.topk_direction; the divergence math reads this too
KL_NORMALIZE = ("sum", "mean")  # advantage.kl_normalize; the advantage math reads this too
# teacher.lora: which LoRA the trainer's teacher runs with: none (the base model), the student's current one, or an
# exponential moving average of it.
TEACHER_LORAS = ("off", "live", "ema")
VALID_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts for --max-lora-rank
PORTS = (1, 65535)


@dataclasses.dataclass(frozen=True)
class Range:
    """Finite numbers from `low` to `high`; `*_open` excludes that end. str() is how an error states it."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return ((value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g} and finite"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE = Range(0, low_open=True), Range(0)
# Each more async level loads one more adapter on the student server and holds one more sampled batch (also in
# every checkpoint), sampled that many versions behind the trainer.
MAX_ASYNC_LEVEL = 8
# Every number of the config that has a range: field -> (range, why; '' = nothing to add). Other fields' checks
# relate several fields or read files.
RANGES = {
    "optim.lr": (POSITIVE, ""),
    "optim.max_norm": (POSITIVE, ": the global gradient-norm clip (<= 0 reverses or freezes every update)"),
    "optim.weight_decay": (NON_NEGATIVE, ""),
    "optim.b1": (Range(0, 1, high_open=True), ": Adam's first-moment decay"),
    "optim.b2": (Range(0, 1, high_open=True), ": Adam's second-moment decay"),
    "optim.warmup_steps": (NON_NEGATIVE, ""),
    "optim.max_nonfinite_steps": (POSITIVE, ""),
    **{f"loss.{tau}": (NON_NEGATIVE, "") for tau in (*TAU_FIELDS, "kl_tau")},
    **{f"loss.{kind}_mask_{end}": (NON_NEGATIVE, "") for kind in ("token", "geo", "sequence")
       for end in ("low", "high")},
    "loss.sequence_clip_high": (POSITIVE, ""),
    "loss.topk": (NON_NEGATIVE, " (0 = the full vocabulary)"),
    "loss.jsd_beta": (Range(0, 1, low_open=True, high_open=True), ": the teacher's weight in the JSD mixture"),
    "teacher.ema_decay": (Range(0, 1, high_open=True), ": the old average's weight"),
    "sampling.temperature": (POSITIVE, " (the trainer divides logits by it)"),
    "sampling.max_tokens": (POSITIVE, ""),
    "seq_len": (POSITIVE, ""),
    "batch_size": (POSITIVE, ""),
    "rollouts_per_example": (POSITIVE, ""),
    "max_steps": (NON_NEGATIVE, ""),
    "max_async_level": (Range(0, MAX_ASYNC_LEVEL), ": each level loads one more adapter on the server and keeps one "
                                                   "more batch sampled ahead"),
    "lora.rank": (Range(0, VALID_LORA_RANKS[-1], low_open=True), ": vLLM's largest --max-lora-rank"),
    "lora.alpha": (POSITIVE, ""),
    "trainer.tp": (POSITIVE, ""),
    "trainer.micro_batch_rows": (NON_NEGATIVE, " (0 = all rows at once)"),
    "trainer.chunk_size": (POSITIVE, ""),
    "trainer.gpu_memory_fraction": (Range(0, 1, low_open=True), ""),
    "inference.parallel.tp": (POSITIVE, ""),
    "inference.gpu_memory_utilization": (Range(0, 1, low_open=True), ""),
    "inference.port": (Range(PORTS[0], PORTS[1] - 1), ": a TCP port; the teacher's own server takes port + 1"),
    "inference.kv_cache_gb": (POSITIVE, ""),
    "parity.max_mismatch_kl": (NON_NEGATIVE, " (a NaN bound fails every gate)"),
    "parity.num_prompts": (NON_NEGATIVE, ""),
    "eval.interval": (NON_NEGATIVE, ""),
    "eval.num_examples": (NON_NEGATIVE, ""),
    "eval.samples": (Range(1), ": samples per eval example"),
    "ckpt.interval": (NON_NEGATIVE, ""),
    "ckpt.keep": (POSITIVE, ""),
}
