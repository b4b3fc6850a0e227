"""The methods bench/evidence.py compares, as config overrides, in report order; a module of its own so that
bench/evidence_report.py reads them without importing the benchmark (which imports the report)."""

# What each method (arm) changes in the demo config (configs/demo.py: adv_tau 1, teacher/student taus 0.1, topk_tau 1).
# Some arms set fields that come with other features (advantage.kl_normalize, loss.topk=0 for the full vocabulary,
# teacher.lora): bench/evidence_args.py's `check` refuses an arm whose fields this checkout lacks, naming them, before
# anything starts.
DISTILL = {"loss.adv_tau": 0.0, "buffer.skip_verification": True}
TOPK_ONLY = {**DISTILL, "loss.teacher_tau": 0.0, "loss.student_tau": 0.0, "loss.topk_tau": 1.0}
METHODS = {
    "rl": {"loss.teacher_tau": 0.0, "loss.student_tau": 0.0, "loss.topk_tau": 0.0},
    "distill": {**DISTILL, "loss.topk_tau": 0.0},  # sampled-token KL, summed over the sequence (the reference)
    "distill_mean": {**DISTILL, "loss.topk_tau": 0.0, "advantage.kl_normalize": "mean"},  # per-token mean
    "distill_topk": TOPK_ONLY,  # the teacher's top-20, no reward
    "distill_full": {**TOPK_ONLY, "loss.topk": 0},  # the teacher's full vocabulary, no reward
    "hybrid": {"loss.topk_tau": 0.0},
    "hybrid_topk": {"loss.topk_tau": 1.0},
    "trainer_teacher": {"loss.topk_tau": 1.0, "teacher.scorer": "trainer"},
    "live": {"loss.topk_tau": 1.0, "teacher.lora": "live"},  # the teacher is the student's current weights
}
