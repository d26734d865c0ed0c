"""The pure pieces of one NGVI step, each a line of the boxed update in ``ngvi.engine.infer``:
dropping draws where the log density is not finite, the accept test on common random
numbers, Levenberg-Marquardt damping, the KL trust region, iterate averaging and the
convergence check. Functions of arrays and NamedTuples only; the driver composes them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ngvi.guides.base import tree_vdot
from ngvi.numerics.fusion import unfused

__all__ = [
    "Verdict",
    "all_finite",
    "averaging_weight",
    "check_due",
    "convergence_bound",
    "copy_weights",
    "effective_progress",
    "elbo_change",
    "judge",
    "levenberg_marquardt",
    "mc_error",
    "trust_region",
    "unfused",
    "value_and_grad_dropping_non_finite",
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


def _units(x: jax.Array) -> jax.Array:
    """Independent units of a per-particle array: antithetic pairs (k, k + K/2) averaged when K
    is even and at least 4, else the particles themselves."""
    k = x.shape[0]
    return 0.5 * (x[: k // 2] + x[k // 2 :]) if k % 2 == 0 and k >= 4 else x


def mc_error(diff: jax.Array) -> jax.Array:
    """Standard error of ``mean(diff)`` over particles; antithetic pairs (k, k + K/2) are
    averaged first since they are not independent. Zero (no estimate) below two units."""
    units = _units(diff)
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
    A step rejected because the loss or its gradient is not finite at the *current* parameters
    leaves the damping alone: the step length played no part in it (``redraw_non_finite``
    already redrew the offending draws; what is left is the point itself).
    The damping never goes below ``floor`` (the user's initial damping)."""
    accept, actual, predicted, significant, reason = verdict
    rho = jnp.where(predicted > 0, actual / predicted, 1.0)
    shrunk = jnp.maximum(0.77 * damping, floor)
    new = jnp.where(rho > 0.75, shrunk, damping)
    new = jnp.where(rho < 0.25, jnp.maximum(damping / 0.77, 1e-2), new)
    new = jnp.where(significant, new, shrunk)
    grown = jnp.where(reason == NOT_FINITE_HERE, damping, jnp.maximum(4.0 * damping, 0.1))
    new = jnp.where(accept, new, grown)
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


def _bad_draws(logp: jax.Array) -> jax.Array:
    """(K,) bool: draws whose log density is not finite, widened to whole antithetic pairs
    (k, k + K/2) when K is even, so the kept draws keep their pairs."""
    bad = ~jnp.isfinite(logp)
    k = logp.shape[0]
    if k % 2:
        return bad
    half = bad[: k // 2] | bad[k // 2 :]
    return jnp.concatenate([half, half])


def copy_weights(logp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(weights (K,), source (K,) int)`` that drop the draws whose log density is not finite.

    A loss made non-finite by some draws is a sampling problem (a draw landed where the model's
    log density is NaN or overflows), not a step-length one. The bad draws (whole antithetic
    pairs, so the pairs stay intact) get weight 0 and the first finite pair takes their weight:
    ``sum_k weights_k f_k / K`` equals the plain mean over the draws ``source`` (each bad pair
    replaced by a copy of that pair), so every estimator a guide builds from the draws
    ``eps[source]`` agrees with the engine's loss and gradient. The fit then targets ``q``
    restricted to where the log density is finite (mirrored about the mean by the pairs). With
    no finite draw the weights are all 1 and the loss stays non-finite."""
    k = logp.shape[0]
    bad = _bad_draws(logp)
    half = k // 2 if k % 2 == 0 else k
    idx = jnp.arange(k)
    first = jnp.argmax(~bad[:half]) + jnp.where(idx >= half, half, 0)  # and its partner
    source = jnp.where(bad & jnp.any(~bad), first, idx)
    weights = jnp.zeros(k, logp.dtype).at[source].add(1.0)
    return weights, source


def value_and_grad_dropping_non_finite(
    reparam: Callable, log_density: Callable, entropy: Callable, params
) -> tuple[tuple[jax.Array, jax.Array], Any, jax.Array]:
    """``((L, log p per draw), grad L, source)`` of ``L = -(sum_k w_k log p(z_k) / K + H[q])``
    with ``z = reparam(params)`` (K, d) and the weights of ``copy_weights``: draws whose log
    density is not finite are dropped. The chain rule is written out so that the cotangent of a
    dropped draw is zeroed *after* its log density's backward pass (``0 * inf`` there is NaN,
    which autodiff of a masked sum would spread to the whole gradient). The returned log p are
    those of the draws ``source`` (the kept draws, copies included)."""
    z, z_vjp = jax.vjp(reparam, params)
    logp, logp_vjp = jax.vjp(jax.vmap(log_density), z)
    weights, source = copy_weights(logp)
    keep = weights > 0
    h, h_grad = jax.value_and_grad(entropy)(params)
    k = logp.shape[0]
    loss = -(jnp.sum(jnp.where(keep, weights * logp, 0.0)) / k + h)
    (dz,) = logp_vjp(-weights / k)
    dz = jnp.where(keep.reshape((k,) + (1,) * (dz.ndim - 1)), dz, 0.0)
    (grad,) = z_vjp(dz)
    return (loss, logp[source]), jax.tree.map(jnp.subtract, grad, h_grad), source


def effective_progress(accept, frac, damping) -> jax.Array:
    """How much of a unit natural step the step took: ``t / (1 + damping)`` when accepted (the
    damping is Marquardt-scaled in every natural-coordinate guide: the step shrinks by
    ``1 / (1 + damping)``; ``t`` is the trust-region fraction), 0 when rejected. The stopping
    rule counts its windows in these units, so neither a rejected step nor a step frozen by a
    huge damping counts as progress."""
    return jnp.where(accept, frac / (1.0 + damping), 0.0)


def check_due(progress, check_progress, window: float, growth: float) -> jax.Array:
    """Whether a convergence check is due: at least ``window`` unit natural steps and a factor
    ``growth`` of progress since the last check (so each window is the run's last
    ``1 - 1/growth``)."""
    return progress >= jnp.maximum(check_progress + window, growth * check_progress)


def elbo_change(diffs) -> tuple[float, float, int]:
    """``(mean, standard error, n)`` of the finite entries of ``diffs``: per round, the ELBO
    change of the reported fit since the last check, measured on that round's common random
    numbers (independent rounds; a round whose draws hit a non-finite log density is left
    out). NaNs with fewer than four usable rounds."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 4:
        return math.nan, math.nan, int(d.size)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), int(d.size)


def convergence_bound(change: float, se: float, previous: float, previous_se: float) -> float:
    """An upper bound on what the reported fit still has to gain, from the ELBO changes of
    its last two check windows (each 1.5 times longer than the one before).

    An average of iterates converges no faster than ``1/P`` in its tail (the average's window
    grows with the run), and with windows growing by 1.5 a ``1/P`` tail leaves twice the last
    window's change to gain: ``2 c``. A slower tail shows in the ratio of the two changes,
    ``r = |c| / |c_prev|``, which a power law keeps for every later window: ``c r / (1 - r)`` is
    left. The ratio is read at the last change's upper confidence bound,
    ``r = (|c| + 2 se) / |c_prev|``: a creep that gains the same each window (``r = 1``, a
    logarithmic tail) must not pass on one window whose change came out low by noise (measured:
    a linear regression's exp-family fit gaining 0.04 nat a window, 1.2 nat from its optimum,
    passed on a window measured at 0.024 +/- 0.012). So the bound is
    ``max(2, r / (1 - r)) (|c| + 2 se)``, with ``r`` counted unless the previous change is
    within one standard error of zero (``|c_prev| <= se_prev``: a window already flat says the
    tail is over; a window that gained 1.8 se is not flat: a centred funnel whose average
    converges like ``P^-0.7`` passed on such a pair 0.12 nat from its optimum), and infinite when
    ``r >= 1`` (the fit may not be slowing down)."""
    upper = abs(change) + 2.0 * se
    if not math.isfinite(upper):
        return math.inf
    factor = 2.0
    if math.isfinite(previous) and abs(previous) > previous_se:
        r = upper / abs(previous)
        factor = math.inf if r >= 1 else max(factor, r / (1.0 - r))
    return factor * upper
