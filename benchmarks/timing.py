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
