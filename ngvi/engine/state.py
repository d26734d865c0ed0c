"""The engine's records: the state a fit carries from step to step, what each step reports,
what a guide's natural step may see, and what ``NGVI.run`` returns (all NamedTuples: pytrees
that scan, checkpoint and compare cleanly)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from ngvi.engine.convergence import CheckInfo

__all__ = ["NGVIInfo", "NGVIRunResult", "NGVIState", "StepContext"]


class NGVIState(NamedTuple):
    params: Any  # the guide's parameters, last accepted iterate
    avg_params: Any  # exponential moving average of accepted iterates (the reported fit)
    damping: jax.Array  # () Levenberg-Marquardt damping
    rng_key: jax.Array
    step: jax.Array  # () int32, steps taken (accepted or rejected)
    num_rejected: jax.Array  # () int32, total rejected steps
    consecutive_rejected: jax.Array  # () int32
    progress: jax.Array  # () unit natural steps taken (``step.effective_progress``)
    check_params: Any  # avg_params at the last convergence check (the next check's reference)
    check_progress: jax.Array  # () progress at the last convergence check
    converged: jax.Array  # () bool, set by a passed convergence check
    change: jax.Array  # () ELBO change of the average at the last check (NaN before one)
    change_se: jax.Array  # () its standard error
    boost: jax.Array  # () int32 the particles' doubling factor (``convergence``: noise bias)


class NGVIInfo(NamedTuple):
    loss: jax.Array  # -ELBO estimate at the parameters the step started from
    accepted: jax.Array
    damping: jax.Array
    step_kl: jax.Array  # KL(q_old || q_new) of the step (0 when rejected; NaN without max_kl)
    # () int32 why the step was rejected: 0 accepted, 1 loss or gradient not finite at the
    # current parameters (after dropping the bad draws), 2 proposal not finite (the guide's
    # inverse/Cholesky failed or overflowed), 3 loss not finite at the proposal, 4 loss rose
    reason: jax.Array
    num_bad: jax.Array  # () int32 draws with a non-finite log density here (dropped)
    ran: jax.Array  # () bool, False for the padding of a scan that stopped early


class StepContext(NamedTuple):
    """What a guide's ``natural_step`` may use beyond the gradient (curvature estimates such as
    K-FAC factors or Hessian-vector products need the noise, the data and the loss)."""

    eps: jax.Array  # (num_particles, ...) the step's base noise
    data: tuple  # (args, kwargs) of the model
    model_key: Any  # key for the model's own randomness (subsampling), or None
    loss_fn: Callable  # params -> -ELBO on this noise and minibatch
    rng_key: Any = None  # a fresh key for the guide's own randomness (e.g. sampled targets)
    curvature: Any = None  # what the guide's ``value_and_grad`` computed beside the gradient


class NGVIRunResult(NamedTuple):
    params: Any  # averaged parameters (GuideParams): use these
    state: NGVIState
    losses: jax.Array  # (num_steps,) negative ELBO per step
    num_steps: int  # steps actually run (earlier than asked if converged)
    #: the check passed (``state.converged``) and the ELBO is not multimodal by construction
    #: (no mixture site): False after a passed check on a mixture model, with a warning
    converged: bool
    num_rejected: int
    info: NGVIInfo
    interrupted: bool = False
    checks: tuple[CheckInfo, ...] = ()  # the convergence checks of this run
