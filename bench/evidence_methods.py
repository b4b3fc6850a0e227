"""The methods bench/evidence.py compares, as config overrides, in report order; a module of its own so that
bench/evidence_report.py reads them without importing the benchmark (which imports the report)."""

# What each method changes in the demo config (configs/demo.py: adv_tau 1, teacher/student taus 0.1, topk_tau 1).
METHODS = {
    "rl": {"loss.teacher_tau": 0.0, "loss.student_tau": 0.0, "loss.topk_tau": 0.0},
    "distill": {"loss.adv_tau": 0.0, "loss.topk_tau": 0.0, "buffer.skip_verification": True},
    "hybrid": {"loss.topk_tau": 0.0},
    "hybrid_topk": {"loss.topk_tau": 1.0},
    "trainer_teacher": {"loss.topk_tau": 1.0, "teacher.scorer": "trainer"},
}
