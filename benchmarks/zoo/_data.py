"""Small helpers for the zoo's data: a fixed-seed generator and numpy -> JAX conversion at call
time (so the arrays take the dtype of the process: float32 by default, float64 under x64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rng(seed: int) -> np.random.Generator:
    """The generator every synthetic data set is drawn from (fixed seed per model)."""
    return np.random.default_rng(seed)


def to_jax(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """numpy arrays -> JAX arrays (floats in the active default dtype); other leaves unchanged."""
    conv = lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x
    return jax.tree.map(conv, args), jax.tree.map(conv, kwargs)
