"""bench/evidence.py's results.json, shared by its worker processes: the one record of what is done.

Every change is a read-modify-write under an exclusive lock (fcntl) and lands by an atomic rename, so a reader never
sees half a file and a killed worker loses only the run it was in. After every change the file is also copied to the
export folders (e.g. a lent machine's $OUT), so whatever stops the command, the finished runs come back. A run is done
when results.json holds its row without an error; a rerun of the same command skips those and retries the rest.
`redo` (bench/evidence.py --redo) drops every row of some methods, once: a resumed command that asks the same keeps them.
Workers take runs through claim files (O_EXCL), which the coordinator clears before it starts them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil

RESULTS = "results.json"
# The arguments a resumed results.json must share with the command (they decide what a run measures).
SETTINGS = ("steps", "prompts", "max_tokens", "eval_every", "eval_examples", "eval_samples", "gpu", "model", "lr",
            "set", "first_seed")


def run_key(task: str, method: str, seed: int) -> str:
    return f"{task}-{method}-seed{seed}"


class Store:
    def __init__(self, out: str, exports: tuple[str, ...] = ()):
        self.out, self.exports = out, tuple(exports)
        self.path = os.path.join(out, RESULTS)
        self.claims = os.path.join(out, "claims")

    @contextlib.contextmanager
    def _locked(self, name: str = "results"):
        os.makedirs(os.path.join(self.out, "locks"), exist_ok=True)
        with open(os.path.join(self.out, "locks", f"{name}.lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {"args": {}, "tasks": {}, "runs": []}

    def _write(self, results: dict) -> None:
        for folder in (self.out, *self.exports):
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{RESULTS}.tmp")
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
            os.replace(tmp, os.path.join(folder, RESULTS))

    def update(self, change) -> dict:
        """Applies change(results) (it edits the dict in place) under the lock, writes and exports; returns it."""
        with self._locked():
            results = self.read()
            change(results)
            self._write(results)
            return results

    def start(self, args: dict) -> int:
        """Checks that an existing results.json was made with the same settings, records `args`, clears claims, and
        drops the rows of the methods in args["redo"] (every task and seed) unless the command recorded before asked
        for them too (it is this command, resumed: what it redid is kept). Returns the rows dropped."""
        dropped = []

        def check(results):
            old = results.get("args") or {}
            differ = [k for k in SETTINGS if k in old and old[k] != args.get(k)]
            if differ:
                raise SystemExit(f"error: --out: {self.path} was made with other settings "
                                 f"({', '.join(f'{k}={old[k]}' for k in differ)}); use another --out")
            redo = set(args.get("redo") or ()) - set(old.get("redo") or ())
            dropped.extend(r for r in results["runs"] if r["method"] in redo)
            results["runs"] = [r for r in results["runs"] if r["method"] not in redo]
            results["args"] = args
        shutil.rmtree(self.claims, ignore_errors=True)
        os.makedirs(self.claims)
        self.update(check)
        return len(dropped)

    def done(self) -> set[str]:
        return {run_key(r["task"], r["method"], r["seed"]) for r in self.read()["runs"] if "error" not in r}

    def claim(self, key: str) -> bool:
        """True for the one worker that takes run `key` in this command."""
        try:
            os.close(os.open(os.path.join(self.claims, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def add_run(self, row: dict) -> None:
        """Stores a run's row, replacing an earlier row of the same run (a failed try)."""
        key = run_key(row["task"], row["method"], row["seed"])

        def add(results):
            results["runs"] = [r for r in results["runs"] if run_key(r["task"], r["method"], r["seed"]) != key]
            results["runs"].append(row)
        self.update(add)

    def task_refs(self, task: str, measure) -> dict:
        """The task's reference measurements (measure() once across all workers and reruns: every run of a task is
        scored against the same answers)."""
        with self._locked(f"task-{task}"):
            refs = self.read()["tasks"].get(task)
            if refs is None:
                refs = measure()
                self.update(lambda results: results["tasks"].__setitem__(task, refs))
            return refs

    def export(self, *paths: str) -> None:
        for folder in self.exports:
            for p in paths:
                shutil.copy(p, folder)
