"""The convergence check of ``NGVI.run``: is the reported fit within ``tol`` nats of its optimum?

Progress ``P`` counts unit natural steps (``step.effective_progress``). A check is due whenever
``P >= max(P_c + WINDOW, GROWTH * P_c)``, ``P_c`` the progress at the last check, so each window
is the last third of the run. It runs between scanned chunks, on the compiled ``evaluate`` (one
compiled loss, shared with the user's calls): rounds of K fresh draws score, on common random
numbers, the average at the last check, the average now and the current iterate. From them:

* the ELBO change of the average over the window, its mean and standard error
  (``step.elbo_change``), and what the tail may still hold (``step.convergence_bound``: at
  least twice the change's upper confidence bound, more when the last two windows show a slower
  tail);
* the average's own noise floor, which no trend shows (``noise_floor``).

The fit has converged when their sum is at most ``tol`` and ``P >= MIN_PROGRESS``. Everything
is a function of the state, so a resumed fit checks exactly as one that never stopped.

**Noise bias.** The average of iterates that jitter about the optimum of a non-quadratic ELBO
is not the optimum: its offset grows with the iterates' spread (third derivatives times their
covariance), which no trend and no ``1/m`` floor shows. Measured on the zoo's horseshoe
regression (mean-field, 43 dimensions): with 8 particles the iterates sat 1.1 nats below their
average and the average stayed 0.30 nat below the family optimum for thousands of steps (a
full-rank fit passed there, 0.48 nat off); with 16 particles 0.10 nat, with 32 none. So
``NGVI.run`` does not let a check pass while the iterates' excess over the average (``excess``,
nats) is above ``EXCESS_MAX * tol``: it doubles the particles (at most ``MAX_BOOST`` times the
starting count) and lets the next window show what the fit gains from less noise. The cost
falls on such fits only; on the zoo's smooth models the excess at convergence was 0.001-0.36.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ngvi.engine.step import averaging_weight, check_due, convergence_bound, elbo_change

__all__ = [
    "CHECK_DRAWS",
    "EXCESS_MAX",
    "GROWTH",
    "MAX_BOOST",
    "MIN_PROGRESS",
    "WINDOW",
    "CheckInfo",
    "boosted",
    "due",
    "run_check",
]

WINDOW = 10.0  # unit natural steps between convergence checks, at least
GROWTH = 1.5  # ... and at least this factor of the progress at the last check
MIN_PROGRESS = 20.0  # no convergence before this many unit natural steps
EXCESS_MAX = 4.0  # a pass needs the iterates' excess over the average <= EXCESS_MAX * tol ...
MAX_BOOST = 4  # ... or the particles already doubled up to this factor (module docstring)
CHECK_DRAWS = 32  # draws of each fit in a check's first batch (rounds of num_particles)


class CheckInfo(NamedTuple):
    """One convergence check of ``NGVI.run``."""

    step: int
    progress: float  # unit natural steps taken
    change: float  # ELBO change of the reported fit since the previous check (nats)
    se: float  # its Monte Carlo standard error
    floor: float  # the average's estimated excess from the iterates' jitter (nats)
    bound: float  # what the fit may still gain: step.convergence_bound + floor (nats)
    passed: bool  # bound <= tol (and progress >= MIN_PROGRESS)
    rounds: int  # rounds of num_particles draws the check used
    excess: float = math.nan  # ELBO(average) - ELBO(last iterate) (nats): the iterates' jitter
    particles: int = 0  # num_particles the window before the check ran with
    #: what the Newton probe of a passed check gained (``ngvi.engine.probe``; NaN if not run)
    probe_gain: float = math.nan
    probe_se: float = math.nan


def due(state) -> jax.Array:
    """Whether a check is due (the state's ``progress`` against its ``check_progress``)."""
    return check_due(state.progress, state.check_progress, WINDOW, GROWTH)


def run_check(
    state, evaluate: Callable, tol: float, num_particles: int, average: float
) -> tuple[Any, CheckInfo]:
    """``(state, CheckInfo)`` after one check; the next window starts here whether it passed
    or not. ``evaluate(state, key)`` is -ELBO of ``state.avg_params`` on K fresh draws.

    A first batch of ``max(8, ceil(CHECK_DRAWS / K))`` rounds; more batches while the answer is
    still open (the change's confidence interval straddles the bound), as long as the check
    stays within ``step / 12`` rounds, about a quarter of the steps' draws since the last
    check."""
    old = state._replace(avg_params=state.check_params)
    now = state._replace(avg_params=state.params)
    prev = (float(state.change), float(state.change_se))
    batch = max(8, -(-CHECK_DRAWS // num_particles))
    budget = max(batch, int(state.step) // 12)  # rounds of K draws
    base = jax.random.fold_in(state.rng_key, 2)
    diffs, excess = [], []
    while True:
        for k in jax.random.split(jax.random.fold_in(base, len(diffs)), batch):
            # one computation in flight at a time: XLA's CPU collectives (data sharded over
            # several devices) can deadlock on interleaved launches of different programs
            new_loss = jax.block_until_ready(evaluate(state, k))
            diffs.append(jax.block_until_ready(evaluate(old, k)) - new_loss)  # new - then
            excess.append(jax.block_until_ready(evaluate(now, k)) - new_loss)  # new - iterate
        change, se, _ = elbo_change(jnp.stack(diffs))
        e = float(np.nanmean(np.asarray(jnp.stack(excess))))
        floor = noise_floor(state, e, average)
        bound = convergence_bound(change, se, *prev) + floor
        best_case = convergence_bound(max(abs(change) - 2 * se, 0.0), 0.0, *prev) + floor
        if bound <= tol or best_case > tol or len(diffs) + batch > budget:
            break  # decided, or out of budget
    ok = bool(state.progress >= MIN_PROGRESS) and bound <= tol
    dtype = state.change.dtype
    state = state._replace(
        check_params=state.avg_params,
        check_progress=state.progress,
        converged=jnp.array(ok),  # a NaN change or floor never passes
        change=jnp.asarray(change, dtype),
        change_se=jnp.asarray(se, dtype),
    )
    info = CheckInfo(
        int(state.step),
        float(state.progress),
        change,
        se,
        floor,
        bound,
        ok,
        len(diffs),
        e,
        num_particles,
    )
    return state, info


def boosted(info: CheckInfo, tol: float, boost: int) -> int:
    """The particles' doubling factor after a check: doubled (at most to ``MAX_BOOST``) when it
    passed while the iterates' excess over the average is above ``EXCESS_MAX * tol`` (module
    docstring, noise bias); such a pass does not stand."""
    noisy = info.passed and info.excess > EXCESS_MAX * tol and boost < MAX_BOOST
    return 2 * boost if noisy else boost


def noise_floor(state, excess: float, average: float) -> float:
    """The average's own excess over the optimum, from the iterate's: iterates jitter about
    the optimum with an excess ``e`` (measured: ELBO(avg) - ELBO(iterate)), about one fresh
    draw per unit natural step; the average of ``m`` of them has excess ``e / m`` (for a
    quadratic ELBO), ``m`` the average's effective memory in unit steps: ``(2 - w) / w``
    accepted steps for an exponential average of weight ``w`` (``step.averaging_weight``),
    times the progress per accepted step. Infinite when ``e`` could not be measured."""
    accepted = int(state.step - state.num_rejected)
    if not math.isfinite(excess):
        return math.inf
    if accepted < 1:
        return 0.0
    w = float(averaging_weight(accepted, average))
    memory = (2.0 - w) / w * float(state.progress) / accepted
    return max(excess, 0.0) / max(memory, 1.0)
