"""XLA:CPU's fusion steered: a value computed once, as a kernel of its own (``unfused``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["unfused"]


def unfused(thunk: Callable[[], Any], like: Any) -> Any:
    """``thunk()``, computed on CPU as a kernel of its own rather than inside its consumers.

    Both branches of ``lax.cond(pred, thunk, thunk)`` are ``thunk``, so the value is the same
    whatever the predicate (read from ``like``'s first entry only so that it is not a constant
    XLA could fold). XLA's CPU fusion otherwise copies a cheap producer into every consumer: the
    reparameterised draws ``loc + scale * eps`` were recomputed inside each gather of a log
    density that indexes them, and a forward pass over 8 draws of a 501-dimensional
    item-response model took 3-4 ms instead of 0.7-0.9 (its gradient pass, which keeps the draws
    for the backward pass, was not affected). On other backends a conditional waits for its
    predicate on the host, so there it is plain ``thunk()``."""
    if jax.default_backend() != "cpu":
        return thunk()
    pred = jnp.isfinite(jnp.ravel(jax.tree.leaves(like)[0])[0])
    return lax.cond(pred, thunk, thunk)
