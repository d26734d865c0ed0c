"""The pure pieces of one NGVI step, each a line of the boxed update in ``ngvi.engine.infer``:
the accept test on common random numbers, Levenberg-Marquardt damping, the KL trust region and
iterate averaging. Functions of arrays and NamedTuples only; the driver composes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ngvi.guides.base import tree_vdot

__all__ = [
    "Verdict",
    "all_finite",
    "averaging_weight",
    "judge",
    "levenberg_marquardt",
    "mc_error",
    "trust_region",
]

#: why a step was rejected (``NGVIInfo.reason``)
ACCEPTED, NOT_FINITE_HERE, PROPOSAL_NOT_FINITE, NOT_FINITE_THERE, LOSS_ROSE = range(5)


class Verdict(NamedTuple):
    """The accept test's findings for one proposal."""

    accept: jax.Array  # () bool
    actual: jax.Array  # () L(theta) - L(theta'), on the same noise
    predicted: jax.Array  # () decrease the local quadratic model predicts
    significant: jax.Array  # () bool: |actual| beyond the loss's Monte Carlo error
    reason: jax.Array  # () int32, one of ACCEPTED .. LOSS_ROSE


def mc_error(diff: jax.Array) -> jax.Array:
    """Standard error of ``mean(diff)`` over particles; antithetic pairs (k, k + K/2) are
    averaged first since they are not independent. Zero (no estimate) below two units."""
    k = diff.shape[0]
    units = 0.5 * (diff[: k // 2] + diff[k // 2 :]) if k % 2 == 0 and k >= 4 else diff
    n = units.shape[0]
    if n < 2:
        return jnp.zeros((), diff.dtype)
    return jnp.std(units, ddof=1) / jnp.sqrt(n)


def all_finite(tree) -> jax.Array:
    """True iff every leaf of ``tree`` is finite everywhere."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def judge(loss, logp, grad, proposal, new_loss, new_logp, full_step, frac, crn_descent) -> Verdict:
    """Accept iff everything is finite and ``L(theta') <= L(theta)`` on the same noise.

    A guide whose step is a descent step on this common-random-numbers loss (VON, K-FAC,
    ``crn_descent``) is judged by the loss itself. One whose direction comes from another
    estimator (regression, score function) is only judged by changes beyond the loss's Monte
    Carlo error: near the optimum the sign of a smaller change is a coin flip, and rejecting on it
    would ratchet the damping up until the fit froze. The predicted decrease of a step cut to a
    fraction ``t`` of a Newton step on the quadratic model is ``-(t - t^2/2) <g, step>``."""
    actual = loss - new_loss
    if crn_descent:
        tolerance, significant = jnp.zeros_like(actual), jnp.array(True)
    else:
        tolerance = 2.0 * mc_error(new_logp - logp)
        significant = jnp.abs(actual) > tolerance
    predicted = -(frac - 0.5 * frac**2) * tree_vdot(grad, full_step)
    finite_here = jnp.isfinite(loss) & all_finite(grad)
    finite_proposal = all_finite(proposal)
    finite = finite_here & finite_proposal & jnp.isfinite(new_loss)
    slack = 16 * jnp.finfo(loss.dtype).eps * (jnp.abs(loss) + 1.0)  # rounding, not a worse fit
    accept = finite & (actual >= -jnp.maximum(slack, tolerance))
    reason = jnp.select(
        [accept, ~finite_here, ~finite_proposal],
        [ACCEPTED, NOT_FINITE_HERE, PROPOSAL_NOT_FINITE],
        jnp.where(jnp.isfinite(new_loss), LOSS_ROSE, NOT_FINITE_THERE),
    ).astype(jnp.int32)
    return Verdict(accept, actual, predicted, significant, reason)


def levenberg_marquardt(damping, verdict: Verdict, floor: float) -> jax.Array:
    """Levenberg-Marquardt rule (Martens & Grosse 2015, sec. 6.5), NaN counts as failure.

    ``rho = actual / predicted``: shrink the damping by 0.77 above 0.75, grow it by 1/0.77
    below 0.25, and by 4 on a rejected step. A change in the loss within its own Monte Carlo
    error (``significant`` false, only for guides whose step is not a descent step on the
    common-random-numbers loss) says nothing about the damping: an accepted one shrinks it.
    The damping never goes below ``floor`` (the user's initial damping)."""
    accept, actual, predicted, significant, _ = verdict
    rho = jnp.where(predicted > 0, actual / predicted, 1.0)
    shrunk = jnp.maximum(0.77 * damping, floor)
    new = jnp.where(rho > 0.75, shrunk, damping)
    new = jnp.where(rho < 0.25, jnp.maximum(damping / 0.77, 1e-2), new)
    new = jnp.where(significant, new, shrunk)
    new = jnp.where(accept, new, jnp.maximum(4.0 * damping, 0.1))
    return jnp.where(new < 1e-3 + floor, floor, new)


def trust_region(kl: Callable, params: Any, proposal: Any, full_step: Any, max_kl: float | None):
    """``(params + t * full_step, t)`` with the largest ``t`` in [0, 1] (1, else 30 bisection
    halvings) such that ``kl(params, params + t full_step) <= max_kl``; the proposal itself
    and ``t = 1`` without a trust region."""
    one = jnp.ones((), jax.tree.leaves(params)[0].dtype)
    if max_kl is None:
        return proposal, one

    def at(t):
        return jax.tree.map(lambda p, d: p + t * d, params, full_step)

    def fits(t):
        return kl(params, at(t)) <= max_kl  # NaN -> False

    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        ok = fits(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.fori_loop(0, 30, halve, (0.0 * one, one))
    full = fits(one)
    t = jnp.where(full, one, lo)
    return jax.tree.map(lambda a, b: jnp.where(full, a, b), proposal, at(t)), t


def averaging_weight(num_accepted, average: float) -> jax.Array:
    """Weight of the newest iterate in the reported average: a window that grows with the run
    (the last ~10% of accepted steps, ``1 / (1 + 0.1 n)``), never narrower than ``1 - average``,
    so early iterates are forgotten and late noise averages out."""
    return jnp.maximum(1.0 / (1.0 + 0.1 * num_accepted), 1.0 - average)
