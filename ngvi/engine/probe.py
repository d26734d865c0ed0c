"""The Newton probe of a passed convergence check: how much do a few Newton steps on the ELBO,
taken from the reported fit, gain on draws they did not see?

The check's tail bound (``step.convergence_bound``) reads the ELBO changes of the average over
its last windows. A fit that crawls, gaining less per window than the check's noise while much is
left, passes it: on Neal's funnel (mean-field, d = 10) the natural steps follow a fast transient
with a crawl along the funnel's ridge for ~1000 steps, and checks passed 0.14-0.30 nat from the
family optimum (session 13). The natural step is a Newton step in each coordinate of the family,
not across them (the location of ``v`` against the scales of ``x``), so the crawl is invisible to
it, and visible to a Newton step on the ELBO in all the guide's parameters together.

So at a passed check the engine asks the fit itself. From the reported parameters ``theta``:

* ``PROBE_ROUNDS`` Newton steps on the fixed-noise loss ``L_A(theta) = -ELBO`` on
  ``PROBE_DRAWS`` fresh draws ``A`` (a new set per round): ``x = -H^-1 g`` by ``CG_ITERS``
  iterations of conjugate gradients preconditioned by the family's Fisher diagonal
  (``Guide.probe_metric``; where the Fisher matches the Hessian, as near a mean-field optimum,
  only the cross terms are left for CG), stopped at negative curvature (Steihaug); each round
  moves by the best of ``c x``, ``c`` in ``SCALES``, on a second draw set, if any gains;
* the total move's gain ``L(theta) - L(theta')`` on ``GAIN_BATCHES`` batches of independent
  draws, common to both points: its mean and standard error.

A realised gain is an unbiased estimate of what ``theta'`` gains, and no point gains more than
the family optimum does: the gain is a lower bound on the gap. The pass stands unless the gain's
lower confidence bound (mean - 2 se) is above ``REFUSE * tol``; when it is refuted, ``NGVI.run``
goes on from ``theta'``. Measured on the funnel (float32, mean-field with 8 and 32 particles and
full rank with 8, seeds 1-3; passes at gaps 0.06-0.29 nat): six rounds realised 93-100% of the
gap with se 0.002-0.006, every pass more than 0.1 off was refuted, and the fits then converged
0.007-0.015 nat from their optima. One round of Newton steps in ``(0.5, 1, 2)`` realised 40-60%
on the mean-field passes, three rounds 80-93% there but 22% on the full-rank one (the ridge is
nearly flat: a near-zero eigenvalue makes the Newton step far too long, and a fraction of it is
what gains).

The cost is one compiled program per data layout (the loss, its gradient and Hessian-vector
products: 1.3-2.3 s of compile, about three times the ``evaluate`` program's) and 1.4-94 ms a
call on the bundled models; families without a Fisher diagonal to precondition with
(``ExpFamilyGuide``, ``KFACGuide``) are not probed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = [
    "CG_ITERS",
    "GAIN_BATCHES",
    "PROBE_DRAWS",
    "PROBE_ROUNDS",
    "REFUSE",
    "SCALES",
    "ProbeResult",
    "newton_direction",
    "newton_probe",
    "refutes",
]

PROBE_DRAWS = 256  # draws of each round's gradient and curvature (and of its step-size choice)
PROBE_ROUNDS = 6  # Newton steps from the reported fit
CG_ITERS = 10  # preconditioned conjugate-gradient iterations per Newton step
GAIN_BATCHES = 8  # batches of PROBE_DRAWS // 2 independent draws scoring the total gain
SCALES = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)  # multiples of each Newton step tried
REFUSE = 0.5  # a pass does not stand when the gain's lower confidence bound > REFUSE * tol


class ProbeResult(NamedTuple):
    """What the probe's Newton steps gained, per batch of independent draws (nats; NaN for a
    batch whose draws hit a non-finite log density)."""

    gains: jax.Array  # (GAIN_BATCHES,)
    params: object  # the parameters the steps reached


def newton_direction(loss: Callable, flat: jax.Array, metric: jax.Array, iters: int) -> jax.Array:
    """``x ~ -H^-1 g`` for ``g, H`` the gradient and Hessian of ``loss`` at ``flat``: ``iters``
    iterations of conjugate gradients on ``H x = -g`` preconditioned by ``diag(metric)``, with
    Hessian-vector products by forward-over-reverse differentiation, stopped before a direction
    of non-positive curvature (Steihaug 1983) or a non-finite product."""
    g, hvp = jax.linearize(jax.grad(loss), flat)  # one forward-over-reverse pass, reused
    r = -g
    z = r / metric
    x, p, rz = jnp.zeros_like(flat), z, r @ z

    def body(_, carry):
        x, r, p, rz, done = carry
        hp = hvp(p)
        php = p @ hp
        done = done | ~(php > 0) | ~jnp.isfinite(php) | ~(rz > 0)
        a = jnp.where(done, 0.0, rz / jnp.where(done, 1.0, php))
        x, r = x + a * p, jnp.where(done, r, r - a * hp)
        z = r / metric
        rz_new = r @ z
        p = jnp.where(done, p, z + rz_new / jnp.where(done, 1.0, rz) * p)
        return x, r, p, jnp.where(done, rz, rz_new), done

    x, *_ = jax.lax.fori_loop(0, iters, body, (x, r, p, rz, jnp.array(False)))
    return jnp.where(jnp.all(jnp.isfinite(x)), x, jnp.zeros_like(x))


def newton_probe(
    neg_elbo: Callable,
    params,
    metric,
    base_noise: Callable,
    key: jax.Array,
    forward: Callable | None = None,
) -> ProbeResult:
    """The module docstring's probe from ``params``. ``neg_elbo(params, eps, key)`` is -ELBO on
    the base noise ``eps`` (``key``: the model's own randomness, a minibatch), ``base_noise(key,
    n)`` draws ``n`` of it, ``metric`` is the Fisher diagonal (a pytree like ``params``).
    ``forward`` (default ``neg_elbo``): the same loss for the evaluations that are not
    differentiated (each round's step sizes, the gains), e.g. with its draws made apart
    (``ngvi.numerics.fusion.unfused``)."""
    forward = neg_elbo if forward is None else forward
    flat0, unravel = ravel_pytree(params)
    m = ravel_pytree(metric)[0]
    scales = jnp.asarray((0.0,) + SCALES, flat0.dtype)  # 0: the round's starting point

    def round_(i, flat):
        k_dir, k_size = jax.random.split(jax.random.fold_in(key, i))
        eps = base_noise(k_dir, PROBE_DRAWS)
        x = newton_direction(lambda f: neg_elbo(unravel(f), eps, k_dir), flat, m, CG_ITERS)
        eps = base_noise(k_size, PROBE_DRAWS)
        # lax.map, not vmap: a family's own factor (full rank's L) batched over the points
        # would make its triangular solves batched LAPACK calls (ngvi.numerics.lapack)
        losses = jax.lax.map(lambda c: forward(unravel(flat + c * x), eps, k_size), scales)
        gains = losses[0] - losses[1:]
        gains = jnp.where(jnp.isfinite(gains), gains, -jnp.inf)
        best = jnp.argmax(gains)
        return jnp.where(gains[best] > 0, flat + scales[best + 1] * x, flat)

    flat = jax.lax.fori_loop(0, PROBE_ROUNDS, round_, flat0)

    ends = jnp.stack([flat0, flat])

    def batch_gain(k):
        eps = base_noise(k, PROBE_DRAWS // 2)
        losses = jax.lax.map(lambda f: forward(unravel(f), eps, k), ends)
        return losses[0] - losses[1]

    keys = jax.random.split(jax.random.fold_in(key, PROBE_ROUNDS), GAIN_BATCHES)
    return ProbeResult(jax.lax.map(batch_gain, keys), unravel(flat))


def refutes(gains, tol: float) -> tuple[bool, float, float]:
    """``(refuted, mean, se)``: whether the probe's gains per batch refute a pass, their mean
    lower confidence bound ``mean - 2 se`` above ``REFUSE * tol`` (module docstring). Batches
    that are not finite are left out; with fewer than four left the probe says nothing."""
    g = np.asarray(gains, dtype=np.float64)
    g = g[np.isfinite(g)]
    if g.size < 4:
        return False, float("nan"), float("nan")
    mean, se = float(g.mean()), float(g.std(ddof=1) / np.sqrt(g.size))
    return mean - 2.0 * se > REFUSE * tol, mean, se
