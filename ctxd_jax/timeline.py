"""Where a step's time goes: the busy periods of the run's two GPU users, the student server (sampling) and the
trainer (scoring, training, snapshots), from the loop's own timestamps.

On one GPU the two take turns unless the GPU runs their kernels side by side, so a step's time splits into: only the
server busy, only the trainer busy, both (overlap: the GPU shared between them), neither (waiting on the host). The
server counts as busy while any batch samples; the trainer while it holds the device lock.
"""

from __future__ import annotations

import contextlib
import threading
import time

USERS = ("server", "trainer")


def union(spans: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """The spans clipped to [start, end], merged into disjoint sorted intervals."""
    out: list[list[float]] = []
    for a, b in sorted((max(a, start), min(b, end)) for a, b in spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Total length where two sets of disjoint intervals overlap."""
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in x for c, d in y)


class Timeline:
    """Spans of work per user; a span still open counts up to the moment it is asked about. Thread-safe: the trainer
    works in a thread, the server spans open and close on the event loop."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self._spans: dict[str, list[list[float | None]]] = {who: [] for who in USERS}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def span(self, who: str):
        entry = [self.clock(), None]
        with self._lock:
            self._spans[who].append(entry)
        try:
            yield
        finally:
            entry[1] = self.clock()

    def busy(self, start: float, end: float) -> dict[str, float]:
        """Seconds of [start, end] each user was busy, both at once, and neither; spans that ended before `start`
        are forgotten (the next step's window starts later)."""
        now = self.clock()
        with self._lock:
            spans = {who: [(a, now if b is None else b) for a, b in s] for who, s in self._spans.items()}
            for s in self._spans.values():
                s[:] = [e for e in s if e[1] is None or e[1] >= start]
        server, trainer = (union(spans[who], start, end) for who in USERS)
        both = intersection(server, trainer)
        server_s, trainer_s = length(server), length(trainer)
        return {"busy/server": server_s, "busy/trainer": trainer_s, "busy/both": both,
                "busy/neither": max(0.0, (end - start) - server_s - trainer_s + both)}
