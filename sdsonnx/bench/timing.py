"""Interleaved timing and its summary statistics (ONNX Runtime runs in-process; DeepSparse in its worker)."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def interleaved_times(runs: dict[str, Callable[[], object]], steps: int, warmup: int, reps: int) -> dict[str, list[float]]:
    """label -> `reps` per-round seconds; each round runs every callable `steps` times, order reversed every round.

    Alternating the order spreads slow drifts (other processes, clock changes) evenly over the models, so
    per-round ratios compare like with like.
    """
    if reps < 1 or warmup < 0 or steps < 1:
        raise ValueError(f"need reps >= 1, warmup >= 0, steps >= 1; got {reps}, {warmup}, {steps}")
    labels = list(runs)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for round_ in range(warmup + reps):
        for label in labels if round_ % 2 == 0 else labels[::-1]:
            run = runs[label]
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            elapsed = time.perf_counter() - t0
            if round_ >= warmup:
                times[label].append(elapsed)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median, quartiles, min, max and relative spread (IQR / median) of a list of seconds."""
    if not times:
        raise ValueError("no timings to summarize")
    a = np.asarray(times, dtype=np.float64)
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return {"median_s": float(med), "p25_s": float(q25), "p75_s": float(q75), "min_s": float(a.min()),
            "max_s": float(a.max()), "spread": float((q75 - q25) / med) if med > 0 else 0.0, "n": int(a.size)}


def paired_speedup(dense: list[float], sparse: list[float]) -> dict[str, float]:
    """dense/sparse: ratio of medians, and the quartiles of the per-round ratios dense_i / sparse_i."""
    if len(dense) != len(sparse) or not dense:
        raise ValueError(f"need equally many rounds, got {len(dense)} and {len(sparse)}")
    ratios = np.asarray(dense) / np.asarray(sparse)
    q25, q75 = np.percentile(ratios, [25, 75])
    return {"speedup": float(np.median(dense) / np.median(sparse)), "speedup_p25": float(q25),
            "speedup_p75": float(q75)}
