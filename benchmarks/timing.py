"""Wall-clock timing of compiled functions, shared by the benchmark scripts."""

from __future__ import annotations

import time

import jax
import numpy as np


def seconds(fn, *args, repeats: int) -> np.ndarray:
    """Wall seconds of ``repeats`` calls of ``fn(*args)`` after one (compiling) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def interleaved(calls: dict, repeats: int) -> dict[str, np.ndarray]:
    """Wall seconds of ``repeats`` calls of each ``fn(*args)`` in ``calls`` (name -> (fn,
    args)), after one (compiling) call each, taken round-robin: on a shared machine a slow spell
    then falls on every method alike, so ratios of the fastest (or median) times compare them."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times: dict = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: np.asarray(t) for name, t in times.items()}
