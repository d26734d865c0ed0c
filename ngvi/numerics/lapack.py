"""Whether a function calls LAPACK, so that its evaluation over many draws can be sequential.

jaxlib 0.10.2's CPU LAPACK kernels (Cholesky, triangular solves, ...) split a *batched* call
(a model's own factorisation under ``vmap`` over draws) into tasks on XLA's intra-op thread pool
and block until they finish. When as many such calls run at once as the pool has threads (XLA
runs independent operations concurrently), every thread waits for tasks that no free thread can
run: the process freezes at 0% CPU. Seen in this project on the zoo's log-Gaussian Cox process
(its GP prior's Cholesky per draw): twice in the full-rank guide's curvature check and in both
dtypes in the Newton probe's Hessian-vector products (gdb: the pool's two threads in
``ParallelBatchMap`` under ``lapack_strsm_ffi``). jaxlib 0.11.1 and later leave that parallel path
out of open-source builds. Until then, the programs that evaluate such a model over hundreds of
draws at once (the probe, the curvature check) map over the draws one at a time instead: a
LAPACK call of batch one runs on its own thread.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.extend.core import ClosedJaxpr

__all__ = ["LAPACK_PRIMITIVES", "batched_lapack", "calls_lapack"]

#: JAX primitives that lower to LAPACK custom calls on CPU
LAPACK_PRIMITIVES = frozenset(
    {
        "cholesky",
        "triangular_solve",
        "lu",
        "eigh",
        "eig",
        "qr",
        "geqrf",
        "geqp3",
        "householder_product",
        "svd",
        "schur",
        "hessenberg",
        "tridiagonal",
        "tridiagonal_solve",
    }
)


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def calls_lapack(fn: Callable, *example) -> bool:
    """Whether ``fn(*example)`` (traced, not run) uses a primitive that lowers to LAPACK."""
    jaxpr = jax.make_jaxpr(fn)(*example).jaxpr
    return any(eqn.primitive.name in LAPACK_PRIMITIVES for eqn in _equations(jaxpr))


def batched_lapack(fn: Callable | ClosedJaxpr, *example) -> bool:
    """Whether ``fn(*example)`` (traced, not run; or ``fn`` a ``ClosedJaxpr`` already traced)
    makes a *batched* LAPACK call: one whose matrix operand has batch dimensions (a model's
    factorisation of a latent-dependent matrix under ``vmap`` over draws), the calls that can
    freeze jaxlib 0.10.2 (module docstring). A fixed matrix applied to many draws (a triangular
    solve with many right-hand sides) is one call."""
    jaxpr = (fn if isinstance(fn, ClosedJaxpr) else jax.make_jaxpr(fn)(*example)).jaxpr
    return any(
        eqn.primitive.name in LAPACK_PRIMITIVES and eqn.invars and len(eqn.invars[0].aval.shape) > 2
        for eqn in _equations(jaxpr)
    )
