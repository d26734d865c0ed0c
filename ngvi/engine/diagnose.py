"""Why a fit stopped, in words: the ``FitError`` message after too many rejected steps and the
warnings of a run that ends without an honest ``converged=True``. Every message names the cause
it found in the run's record (``NGVIInfo``) and a fix."""

from __future__ import annotations

import math
import warnings

import numpy as np

from ngvi.engine.convergence import EXCESS_MAX, MIN_PROGRESS, WINDOW
from ngvi.errors import ConvergenceWarning, NGVIWarning

__all__ = [
    "claims_convergence",
    "fit_error_message",
    "local_optimum_note",
    "not_converged_cause",
    "recent_progress",
    "warn_if_not_honest",
]

_STEP_FIXES = "lower lr, set max_kl (e.g. max_kl=1.0), or try float64"

#: cause and fix of a rejected step, by ``NGVIInfo.reason``
CAUSES = {
    1: "the ELBO or its gradient is not finite at the current parameters even after dropping "
    "the draws where the log density is not (it is NaN or overflows wherever q puts its mass, "
    "or its gradient does): check the priors and the data's scale, start elsewhere "
    "(init_strategy=...), or try float64",
    2: "the guide's proposal is not finite (its Fisher inverse or Cholesky failed, or the step "
    "overflowed): lower lr, set max_kl (e.g. max_kl=1.0), raise the initial damping, or try "
    "float64",
    3: "the ELBO is not finite at the proposals (the steps reach where the log density "
    f"overflows or is NaN): {_STEP_FIXES}",
    4: "the steps did not lower the ELBO estimate (it is too noisy for the accept test, or the "
    "log density is too rough for a natural step of this size): raise num_particles, "
    f"{_STEP_FIXES}",
}


def _main_reason(info) -> int:
    """The most frequent rejection reason of the run (4 when none was recorded)."""
    reasons = np.asarray(info.reason)
    reasons = reasons[reasons > 0]
    return int(np.bincount(reasons).argmax()) if reasons.size else 4


def fit_error_message(engine, state, info) -> str:
    """The ``FitError`` text: how many steps were rejected, the cause of the last one and its
    fix, the damping reached."""
    reasons = np.asarray(info.reason)
    last = int(reasons[-1]) if reasons.size and reasons[-1] > 0 else 4
    return (
        f"{engine.max_rejections} consecutive steps were rejected at step {int(state.step)} "
        f"(damping {float(state.damping):.3g}): {CAUSES[last]}. The result holds the last good "
        "state (FitError.result)."
    )


#: below this many unit natural steps a step (``recent_progress``) a fit "barely moved"
FROZEN = 0.1


def recent_progress(info) -> float:
    """Unit natural steps a step over the last half of the run: ``accepted / (1 + damping)``
    averaged (``step.effective_progress`` without the trust region's cut, which the record does
    not keep). A damping held at a few units by an ill-conditioned or curved log density cuts
    steps to a third or a fifth while the fit keeps moving (the ill-conditioned Gaussian of
    ``benchmarks/bench_gym.py``: damping 2.5, 0.26 a step, within 0.03 nat of its optimum);
    a fit frozen by its damping or its rejections is near 0. NaN for an empty record."""
    accepted = np.asarray(info.accepted, bool)
    damping = np.asarray(info.damping, np.float64)
    half = accepted.shape[0] // 2
    moved = np.where(accepted, 1.0 / (1.0 + damping), 0.0)[half:]
    return float(moved.mean()) if moved.size else math.nan


def not_converged_cause(engine, state, info, tol: float, checks=()) -> str:
    """Why a run with a convergence check ended without passing it, and the fix. "The fit
    barely moved" is said of a run with a quarter of its steps rejected or whose recent steps
    took less than ``FROZEN`` of a natural step on average (``recent_progress``), not of one
    whose damping merely stands above 1: that fit moves, and its checks say why it is not done."""
    steps = int(np.asarray(info.loss).shape[0])
    rejected = int(np.sum(~np.asarray(info.accepted, bool)))
    damping = float(state.damping)
    progress = float(state.progress)
    if steps and (rejected >= 0.25 * steps or recent_progress(info) < FROZEN):
        reason = _main_reason(info)
        return (
            f"{rejected} of {steps} steps were rejected and the damping grew to {damping:.3g} "
            f"(steps cut to 1/(1 + damping) of a natural step), so the fit barely moved; most "
            f"rejections: {CAUSES[reason]}"
        )
    last = checks[-1] if checks else None
    change, se = float(state.change), float(state.change_se)
    if last is not None and np.isfinite(last.probe_gain) and not last.passed:
        return (
            f"the ELBO's trend passed the check at step {last.step}, but Newton steps from the "
            f"fit gained {last.probe_gain:.3g} +/- {last.probe_se:.2g} nats on draws they did not "
            "see (the fit was crawling along a direction its natural steps barely move in, as in "
            "a funnel); the fit moved to where the Newton steps got: run more steps or continue "
            "with run(..., init_state=result.state)"
        )
    refused = last is not None and last.bound <= tol and progress >= MIN_PROGRESS
    if refused and last.excess > EXCESS_MAX * tol:
        return (
            f"the ELBO's trend passed the last check (step {last.step}), but the iterates "
            f"jitter {last.excess:.3g} nats below their average, which can bias the average on "
            f"a curved ELBO, so the check did not stand and the particles were doubled (now "
            f"{engine.particles}): run more steps, or start with a larger num_particles"
        )
    if refused and np.isfinite(change):
        return (
            f"the ELBO's trend passed the last check (step {last.step}), but the guide could not "
            "verify the fit there (its own warning says why): run more steps"
        )
    if last is None or not np.isfinite(change) or last.bound <= tol:
        return (
            f"only {progress:.3g} unit natural steps were taken (convergence is checked from "
            f"{WINDOW:.0f} and called from {MIN_PROGRESS:.0f}): run more steps"
        )
    trend = last.bound - last.floor
    if trend <= tol < last.bound:
        return (
            f"the ELBO stopped changing ({change:+.3g} +/- {se:.2g} nats at the last check) but "
            f"the averaged fit's noise floor, about {last.floor:.2g} nats from the iterates' "
            "jitter, is above what tol leaves: raise num_particles (less jitter), run more steps "
            "(the average's window grows with the run), or raise tol"
        )
    if abs(change) < tol / 2 and 2 * se > tol / 4:
        return (
            f"the last check could not resolve tol={tol:g}: the ELBO changed by {change:+.3g} "
            f"+/- {se:.2g} nats, within the noise of its estimate: run more steps (the window "
            "grows with the run), raise num_particles, or raise tol"
        )
    return (
        f"the ELBO was still changing at the last check: {change:+.3g} +/- {se:.2g} nats since "
        f"the check before, so up to {last.bound:.3g} nats may be left (tol={tol:g}): run more "
        f"steps (e.g. num_steps={2 * max(steps, 1)}) or continue with "
        "run(..., init_state=result.state)"
    )


def claims_convergence(engine, state) -> bool:
    """``result.converged``: the check passed and the model's ELBO has no local optima known from
    its structure (no mixture site, ``Target.mixtures``). A passed check finds a stationary
    point; only where the ELBO is not multimodal by construction does that mean the optimum."""
    return bool(state.converged) and not engine.guide.target.mixtures


def local_optimum_note(engine, state) -> str | None:
    """Why a fit whose check passed still says ``converged=False`` (a mixture site), and the
    fix; None when that is not the case."""
    mixtures = engine.guide.target.mixtures
    if not bool(state.converged) or not mixtures:
        return None
    return (
        f"the ELBO stopped changing at step {int(state.step)}, but site(s) {list(mixtures)} are "
        "mixtures: their ELBO has a local optimum for each way of merging or emptying "
        "components, and a fit that stopped changing cannot tell one from the best fit, so "
        "converged=False. Fit from several starts (init_strategy=numpyro.infer.init_to_uniform() "
        "with other rng_keys, or init_to_value(...) with the components spread over the data) "
        "and keep the fit with the highest ELBO (-NGVI.evaluate(result.state, ...))"
    )


def _bad_draws_note(engine, info) -> str | None:
    """A note when draws were dropped in the last half of the run (the final q puts mass
    where the log density is not finite)."""
    bad = np.asarray(info.num_bad)
    late = bad[bad.shape[0] // 2 :]
    if not late.size or not np.any(late > 0):
        return None
    total = late.size * engine.particles
    return (
        f"{int(late.sum())} of {total} draws in the last half of the run had a non-finite log "
        "density at the current parameters (NaN, or an overflow) and were dropped: q puts mass "
        "where the model's log density is not finite, and the fit is of q restricted to where "
        "it is. Check the log density there (guard log / sqrt / division with jnp.where), or "
        "try float64 if it overflows"
    )


def warn_if_not_honest(engine, state, info, tol, checks=(), stacklevel: int = 2) -> None:
    """Warn (``ConvergenceWarning``) when a run with a check ends unconverged or converged on a
    multimodal ELBO (``local_optimum_note``), and (``NGVIWarning``) when its late draws had to
    be dropped."""
    note = _bad_draws_note(engine, info)
    if note is not None:
        warnings.warn(note + ".", NGVIWarning, stacklevel=stacklevel + 1)
    note = local_optimum_note(engine, state)
    if note is not None:
        warnings.warn(note + ".", ConvergenceWarning, stacklevel=stacklevel + 1)
    if tol is None or bool(state.converged):
        return
    cause = not_converged_cause(engine, state, info, tol, checks)
    warnings.warn(
        f"the fit did not converge (tol={tol:g}): {cause}.",
        ConvergenceWarning,
        stacklevel=stacklevel + 1,
    )
