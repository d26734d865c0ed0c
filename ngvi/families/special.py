"""Special-function solvers used to map mean parameters back to natural parameters.

All solvers run a *fixed* number of iterations (so they are ``jit``-able and
``vmap``-able) and carry a ``custom_jvp`` given by the implicit function theorem,
so derivatives do not flow through the unrolled iterations.

References
----------
* T. Minka (2000), "Estimating a Dirichlet distribution", Appendix C
  (inverse digamma) and Section 1 (fixed point / Newton for the Dirichlet MLE).
* T. Minka (2002), "Estimating a Gamma distribution".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, polygamma

Array = jax.Array

_EULER_GAMMA = 0.5772156649015329


def trigamma(x: Array) -> Array:
    """psi'(x) = d^2/dx^2 log Gamma(x)."""
    return polygamma(1, x)


# ---------------------------------------------------------------------------
# inverse digamma


@jax.custom_jvp
def inv_digamma(y: Array) -> Array:
    """Solve ``digamma(x) = y`` for ``x > 0`` (elementwise).

    Initialisation (Minka 2000, App. C)::

        x0 = exp(y) + 1/2          if y >= -2.22
        x0 = -1 / (y + gamma_E)    otherwise   (psi(x) ~ -1/x - gamma_E near 0)

    followed by 6 Newton steps ``x <- x - (psi(x) - y) / psi'(x)``; ``psi`` is
    concave and increasing, so after the first step the iterates approach the
    root monotonically from the left (5 steps give ~14 digits per Minka).
    A step that would leave ``x > 0`` is replaced by halving ``x``.
    Derivative: ``dx/dy = 1 / psi'(x)``.
    """
    y = jnp.asarray(y)
    x = jnp.where(y >= -2.22, jnp.exp(y) + 0.5, -1.0 / (y + _EULER_GAMMA))

    def step(_, x):
        x_new = x - (digamma(x) - y) / trigamma(x)
        return jnp.where(x_new > 0, x_new, 0.5 * x)

    return jax.lax.fori_loop(0, 6, step, x)


@inv_digamma.defjvp
def _inv_digamma_jvp(primals, tangents):
    (y,), (dy,) = primals, tangents
    x = inv_digamma(y)
    return x, dy / trigamma(x)


# ---------------------------------------------------------------------------
# Gamma shape from log E[x] - E[log x]


@jax.custom_jvp
def gamma_shape_from_log_ratio(s: Array) -> Array:
    """Solve ``log(a) - digamma(a) = s`` for the Gamma shape ``a`` (``s > 0``).

    For a Gamma(a, b), ``s = log E[x] - E[log x]`` does not depend on ``b``.
    ``f(a) = log a - psi(a) - s`` is convex and decreasing with
    ``1/(2a) < log a - psi(a) < 1/a``, so the root lies in ``(1/(2s), 1/s)``.
    Newton from the lower bound ``a0 = 1/(2s)`` therefore increases
    monotonically and converges quadratically (cf. Minka 2002, who uses the same
    bracket for initialisation). 12 fixed iterations.
    Derivative: ``da/ds = 1 / (1/a - psi'(a))``.
    """
    s = jnp.asarray(s)
    a = 0.5 / s

    def step(_, a):
        f = jnp.log(a) - digamma(a) - s
        fp = 1.0 / a - trigamma(a)
        return a - f / fp

    return jax.lax.fori_loop(0, 12, step, a)


@gamma_shape_from_log_ratio.defjvp
def _gamma_shape_jvp(primals, tangents):
    (s,), (ds,) = primals, tangents
    a = gamma_shape_from_log_ratio(s)
    return a, ds / (1.0 / a - trigamma(a))


# ---------------------------------------------------------------------------
# Dirichlet concentration from E[log x]


def dirichlet_fisher_solve(alpha: Array, v: Array, damping: Array | float = 0.0) -> Array:
    """``(diag(psi'(alpha)) - psi'(alpha_0) 1 1^T + damping I)^{-1} v`` (last axis).

    Sherman-Morrison with ``D = psi'(alpha) + damping`` and ``c = -psi'(alpha_0)``::

        (D + c 1 1^T)^{-1} v = v/D - (1/D) * c * sum(v/D) / (1 + c * sum(1/D))
    """
    d = trigamma(alpha) + damping
    c = -trigamma(jnp.sum(alpha, axis=-1, keepdims=True))
    dinv_v = v / d
    dinv_1 = 1.0 / d
    coef = c * jnp.sum(dinv_v, -1, keepdims=True) / (1.0 + c * jnp.sum(dinv_1, -1, keepdims=True))
    return dinv_v - dinv_1 * coef


_LOG_TOTAL_BRACKET = (-20.0, 25.0)  # log(sum alpha) is searched in [e^-20, e^25]


def _alpha_given_total(total: Array, m: Array) -> Array:
    """Minka's fixed-point map: ``alpha_k = psi^{-1}(psi(total) + m_k)``."""
    return inv_digamma(digamma(total) + m)


@jax.custom_jvp
def dirichlet_from_mean_log(mean_log: Array) -> Array:
    """Solve ``psi(alpha_k) - psi(sum_j alpha_j) = mean_log_k`` (last axis) for ``alpha``.

    This is the Dirichlet maximum-likelihood problem given sufficient statistics
    (Minka 2000). Given the total ``s = sum alpha``, the stationarity conditions
    are solved exactly by Minka's fixed-point map
    ``alpha_k(s) = psi^{-1}(psi(s) + m_k)`` (his eq. 9), so the ``K``-dimensional
    problem reduces to the scalar root of

        h(t)  = log sum_k alpha_k(e^t) - t,
        h'(t) = s psi'(s) sum_k (1 / psi'(alpha_k)) / sum_k alpha_k - 1

    in ``t = log s``. ``h > 0`` for small ``s`` and ``h < 0`` for large ``s``
    (because ``sum exp(m_k) < 1``), and its root is unique (the log-likelihood is
    strictly concave). We run 45 steps of Newton's method on ``h`` safeguarded by
    bisection on the bracket ``log s in [-20, 25]`` (Newton steps leaving the
    current bracket are replaced by its midpoint), started at the approximation
    ``psi(a) ~ log(a - 1/2)``: ``s0 = (K - S) / (2 (1 - S))``, ``S = sum exp(m)``.
    The plain ``K``-dimensional Newton iteration (Minka eq. 15-18) is not used: it
    diverges from poor starting points for skewed ``alpha`` (e.g. ``(54.6, 0.37,
    0.14)``), whereas this scheme is globally convergent.
    Derivative: ``d alpha = F(alpha)^{-1} d m`` with ``F`` the Dirichlet Fisher.
    """
    m = jnp.asarray(mean_log)
    k = m.shape[-1]
    big_s = jnp.minimum(jnp.sum(jnp.exp(m), -1, keepdims=True), 1.0 - 1e-12)
    lo0, hi0 = _LOG_TOTAL_BRACKET
    t = jnp.clip(jnp.log((k - big_s) / (2.0 * (1.0 - big_s))), lo0 + 1.0, hi0 - 1.0)

    def step(_, state):
        t, lo, hi = state
        s = jnp.exp(t)
        alpha = _alpha_given_total(s, m)
        total = jnp.sum(alpha, -1, keepdims=True)
        h = jnp.log(total) - t
        dh = s * trigamma(s) * jnp.sum(1.0 / trigamma(alpha), -1, keepdims=True) / total - 1.0
        lo = jnp.where(h > 0, t, lo)
        hi = jnp.where(h > 0, hi, t)
        t_new = t - h / dh
        inside = (t_new > lo) & (t_new < hi) & (dh < 0)
        return jnp.where(inside, t_new, 0.5 * (lo + hi)), lo, hi

    state = (t, jnp.full_like(t, lo0), jnp.full_like(t, hi0))
    t = jax.lax.fori_loop(0, 45, step, state)[0]
    return _alpha_given_total(jnp.exp(t), m)


@dirichlet_from_mean_log.defjvp
def _dirichlet_from_mean_log_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    alpha = dirichlet_from_mean_log(m)
    return alpha, dirichlet_fisher_solve(alpha, dm)


# ---------------------------------------------------------------------------
# inverse CDFs (quantiles) of the Gamma and Beta distributions


def _bisect(cdf, q: Array, lo: Array, hi: Array, iters: int) -> Array:
    """The root of ``cdf(u) = q`` for ``cdf`` increasing on ``[lo, hi]`` by ``iters`` fixed
    bisection steps (elementwise, jit/vmap-able; no gradient is defined through it)."""

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = cdf(mid) < q
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return 0.5 * (lo + hi)


def gamma_icdf(q: Array, concentration: Array, rate: Array | float = 1.0) -> Array:
    """Quantile ``x`` of Gamma(a, rate): ``P(a, rate x) = q`` with ``P`` the regularized lower
    incomplete gamma function, by bisection on ``log(rate x)`` over
    ``[log tiny, log(a + 40 sqrt(a) + 60)]`` (100 steps: below the dtype's resolution; the
    bracket holds every q up to 1 - 1e-20). Small shapes, whose quantiles underflow a linear
    scale, are resolved in log space. (NumPyro's ``Gamma.icdf`` needs TensorFlow Probability.)"""
    q, a = jnp.broadcast_arrays(jnp.asarray(q), jnp.asarray(concentration))
    dtype = jnp.result_type(q, a, float)
    q, a = q.astype(dtype), a.astype(dtype)
    lo = jnp.full_like(a, jnp.log(jnp.finfo(dtype).tiny))
    hi = jnp.log(a + 40.0 * jnp.sqrt(a) + 60.0)
    log_y = _bisect(lambda u: jax.scipy.special.gammainc(a, jnp.exp(u)), q, lo, hi, 100)
    return jnp.exp(log_y) / rate


def beta_icdf(q: Array, concentration1: Array, concentration0: Array) -> Array:
    """Quantile ``x`` of Beta(a, b): ``I_x(a, b) = q`` (regularized incomplete beta), by
    bisection on ``logit x`` over the dtype's range (100 steps), so quantiles close to 0 or 1
    keep their relative precision."""
    q, a, b = jnp.broadcast_arrays(
        jnp.asarray(q), jnp.asarray(concentration1), jnp.asarray(concentration0)
    )
    dtype = jnp.result_type(q, a, b, float)
    q, a, b = q.astype(dtype), a.astype(dtype), b.astype(dtype)
    edge = -jnp.log(jnp.finfo(dtype).tiny)
    lo, hi = jnp.full_like(a, -edge), jnp.full_like(a, edge)
    u = _bisect(lambda u: jax.scipy.special.betainc(a, b, jax.nn.sigmoid(u)), q, lo, hi, 100)
    return jax.nn.sigmoid(u)
