"""Interleaved timing of several contenders on one case, and the statistics every table uses.

Contenders take turns call by call (A B C, C A B, ...: a seeded shuffle each round) so that
whatever else the machine is doing at a moment hits them all alike; speed-ups against the
reference are taken round by round (same moment, same inputs) and their median reported.
"""
from __future__ import annotations

import gc
import math
import random
import time
from typing import Callable

import numpy as np

# Thread pools of torch (OpenMP) and ONNX Runtime spin after each call (ONNX Runtime's for ~30-60 ms,
# measured here); a pause longer than that keeps one contender's spinning threads from slowing the next.
GAP_S = 0.1


def time_interleaved(calls: dict[str, Callable[[], object]], *, budget_s: float, min_reps: int, max_reps: int,
                     warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, str]]:
    """(seconds per call for each contender, errors): `reps` rounds chosen so the case fits `budget_s`.

    A contender that raises during warm-up is dropped from the case and its error returned.
    """
    est, errors = {}, {}
    for name, fn in calls.items():
        try:
            for _ in range(max(warmup, 1)):
                t0 = time.perf_counter()
                fn()
                est[name] = time.perf_counter() - t0
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    calls = {n: f for n, f in calls.items() if n in est}
    round_s = sum(est.values()) + GAP_S * len(calls)
    reps = int(max(min_reps, min(max_reps, budget_s // max(round_s, 1e-9))))
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            # a fresh seeded order each round: a rotation would keep each contender behind the same neighbour
            # (whose thread pool may still be spinning) in every round
            order = random.Random(r).sample(names, len(names))
            for name in order:
                time.sleep(GAP_S)
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    return times, errors


def summarize(samples: list[float], scale: float = 1e3) -> dict:
    """p50 / p95 / min / max (in ms by default) of one contender's samples."""
    a = np.asarray(samples) * scale
    return {"n": int(a.size), "p50": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "min": float(a.min()), "max": float(a.max())}


def paired_speedup(ref: list[float], other: list[float]) -> dict | None:
    """Median (min, max) over rounds of ref_time / other_time: > 1 means `other` is faster."""
    n = min(len(ref), len(other))
    if n == 0:
        return None
    r = np.asarray(ref[:n]) / np.asarray(other[:n])
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}


def fmt_ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x >= 1000:
        return f"{x / 1000:.2f} s"
    if x >= 100:
        return f"{x:.0f} ms"
    return f"{x:.1f} ms"
