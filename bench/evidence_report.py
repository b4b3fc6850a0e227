"""The table and plots of bench/evidence.py's results.json (run it alone to redraw, or to merge the files of several
runs of the benchmark, e.g. one per task: `python bench/evidence_report.py OUT_DIR RESULTS.json [RESULTS.json ...]`).

A row per task (in the order results.json measured them) and method (in bench/evidence_methods.py's METHODS order), the
mean over its seeds (bench/evidence_stats.py): the final eval reward, a run's being the mean of its last 3 evals
(± the 95 % t confidence interval over the seeds); steps and training seconds (eval excluded) until the eval reward
reaches 90 % of the teacher's and stays there ('-' = not within budget, with how many seeds reached it when some
did); the share of the student-teacher gap closed at the budget; the change in mean
log-likelihood per token of the base model's own answers (forgetting: < 0 means the student moved away from what it
used to say) and of the teacher's answers (fidelity: > 0 means closer to the teacher).
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its siblings, however this module was imported
from evidence_methods import METHODS  # noqa: E402
from evidence_stats import mean_ci, reach_and_stay, run_score  # noqa: E402


def eval_points(run: dict, student0: float) -> list[tuple[int, float, float, float]]:
    """(step, seconds, sampled tokens, eval reward), starting at step 0 with the untrained student's reward."""
    return [(0, 0.0, 0.0, student0)] + [(p["step"], p["seconds"], p["tokens"], p["eval"]) for p in run["curve"]
                                         if p["eval"] is not None]


def method_order(methods) -> list[str]:
    """METHODS order, then methods it does not know in the order given."""
    methods = list(dict.fromkeys(methods))
    return sorted(methods, key=lambda m: (list(METHODS).index(m) if m in METHODS else len(METHODS), methods.index(m)))


def summarize(results: dict) -> list[dict]:
    """A row per task and method, ordered by task (results["tasks"] order) then method (`method_order`), not by when
    their runs finished."""
    cells = {}
    for run in results["runs"]:
        if "error" in run:
            continue
        cells.setdefault((run["task"], run["method"]), []).append(run)
    tasks, methods = list(results["tasks"]), method_order(m for _, m in cells)
    rows = []
    for (task, method), runs in sorted(cells.items(), key=lambda c: (tasks.index(c[0][0]), methods.index(c[0][1]))):
        base = results["tasks"][task]
        s0, teacher = base["student"]["reward"], base["teacher"]["reward"]
        finals, hits, gaps = [], [], []
        for run in runs:
            finals.append(run_score(run["curve"]))
            hit = reach_and_stay(run["curve"], 0.9 * teacher)
            hits.append(None if hit is None else (hit["step"], hit["seconds"]))
            gaps.append((finals[-1] - s0) / (teacher - s0) if teacher > s0 else float("nan"))
        reached = [h for h in hits if h is not None]
        mean = statistics.fmean
        rows.append({
            "task": task, "method": method, "seeds": len(runs), "student": s0, "teacher": teacher,
            "final": mean_ci(finals)[0], "final_ci": mean_ci(finals)[1],
            "gap_closed": mean(gaps), "reached": len(reached),
            "to90_steps": mean(h[0] for h in reached) if len(reached) == len(runs) else None,
            "to90_s": mean(h[1] for h in reached) if len(reached) == len(runs) else None,
            "train_s": mean(run["curve"][-1]["seconds"] for run in runs),
            "tokens": mean(run["curve"][-1]["tokens"] for run in runs),
            "forget": mean(r["base_answers_after"] - r["base_answers_before"] for r in runs),
            "fidelity": mean(r["teacher_answers_after"] - r["teacher_answers_before"] for r in runs)})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| task | method | seeds | student → teacher | final eval (last 3, 95 % CI) | gap closed "
            "| steps to 90 % and stay | s to 90 % "
            "| train s | sampled tokens | Δ loglik base answers | Δ loglik teacher answers |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        missed = f"- ({r['reached']}/{r['seeds']})" if r["reached"] else "-"
        to90 = (missed, missed) if r["to90_steps"] is None else (f"{r['to90_steps']:.0f}", f"{r['to90_s']:.0f}")
        final = f"{r['final']:.2f}" + ("" if r["final_ci"] is None else f" ± {r['final_ci']:.2f}")
        lines.append(f"| {r['task']} | {r['method']} | {r['seeds']} | {r['student']:.2f} → {r['teacher']:.2f} "
                     f"| {final} | {r['gap_closed']:.2f} | {to90[0]} | {to90[1]} | {r['train_s']:.0f} "
                     f"| {r['tokens']:.0f} | {r['forget']:+.3f} | {r['fidelity']:+.3f} |")
    return "\n".join(lines)


def mean_curve(runs: list[dict], student0: float) -> list[tuple]:
    """Per eval step common to all `runs`: (step, mean seconds, mean sampled tokens, mean eval reward, and the low and
    high end of its 95 % confidence interval over the seeds; the mean itself for one seed)."""
    per_run = [{p[0]: p for p in eval_points(run, student0)} for run in runs]
    steps = sorted(set.intersection(*(set(pts) for pts in per_run)))
    out = []
    for step in steps:
        mean, half = mean_ci([pts[step][3] for pts in per_run])
        out.append((step, *(statistics.fmean(pts[step][k] for pts in per_run) for k in (1, 2)), mean,
                    mean - (half or 0.0), mean + (half or 0.0)))
    return out


def plot(results: dict, out_dir: str) -> list[str]:
    """One PNG per task: eval reward against steps, training seconds and sampled tokens; a line per method (the mean
    over its seeds), its band the 95 % confidence interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, methods = [], method_order(r["method"] for r in results["runs"])  # a method's color in every plot
    xlabels = ("step", "training seconds (eval excluded)", "sampled tokens")
    for task, base in results["tasks"].items():
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=True)
        runs = [r for r in results["runs"] if r["task"] == task and "error" not in r]
        for method in method_order(r["method"] for r in runs):
            mine = [r for r in runs if r["method"] == method]
            curve = mean_curve(mine, base["student"]["reward"])
            color = f"C{methods.index(method)}"
            for ax, x in zip(axes, (0, 1, 2)):
                xs = [c[x] for c in curve]
                ax.plot(xs, [c[3] for c in curve], "o-", ms=3, color=color, label=f"{method} ({len(mine)})")
                ax.fill_between(xs, [c[4] for c in curve], [c[5] for c in curve], color=color, alpha=0.15, lw=0)
        for ax, xl in zip(axes, xlabels):
            ax.axhline(base["teacher"]["reward"], color="k", ls="--", lw=1, label="teacher" if xl == "step" else None)
            ax.set_xlabel(xl)
        axes[0].set_ylabel("eval reward (held-out prompts)")
        axes[0].legend(fontsize=8, title="method (seeds)", title_fontsize=8)
        fig.suptitle(f"{task}: student {base['student']['reward']:.2f}, teacher {base['teacher']['reward']:.2f} "
                     "(mean over seeds; band: its 95 % confidence interval)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"evidence_{task}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def merge(paths) -> dict:
    """One results dict from several files (tasks and runs side by side; a task measured twice keeps the first)."""
    merged = {"tasks": {}, "runs": []}
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        for task, base in results["tasks"].items():
            merged["tasks"].setdefault(task, base)
        merged["runs"] += results["runs"]
    return merged


def samples_text(results: dict) -> str:
    """Per task and method, the completion each seed's run logged at its first and its last step: what the reward
    rewarded."""
    lines = []
    for run in results["runs"]:
        for when, sample in sorted(run.get("samples", {}).items()):
            text = sample["completion"].replace("\n", " ")
            lines.append(f"- {run['task']} / {run['method']} / seed {run['seed']}, {when} step ({sample['step']}): "
                         f"{text!r}")
    return "\n".join(lines)


def report(out_dir: str, *results_paths: str) -> str:
    results = merge(results_paths)
    with open(os.path.join(out_dir, "evidence_samples.md"), "w") as f:
        f.write(samples_text(results) + "\n")
    text = table(summarize(results))
    errors = [f"{r['task']}/{r['method']}/{r['seed']}: {r['error']}"
              + (f" (server log: {r['server_error']})" if "server_error" in r else "")
              for r in results["runs"] if "error" in r]
    plots = plot(results, out_dir)
    return "\n".join([text, *errors, *plots])


if __name__ == "__main__":
    print(report(sys.argv[1], *sys.argv[2:]))
