r"""Sampled natural-gradient estimators for one exponential-family factor (``ExpFamilyGuide``).

For a factor ``q(x | eta)`` with constant base measure ``h`` (every family ``ExpFamilyGuide``
places) and ``f(x) = log p(data, x)`` in the factor's own space (the other factors' draws and
the Jacobian of the bijection included), the ELBO is ``E_q[f] + H[q]`` with
``grad_eta H = -F(eta) eta``, so the natural gradient (the gradient in the mean parameters) is

    nat = F(eta)^-1 grad_eta E_q[f] - eta,     grad_eta E_q[f] = Cov_q[T(x), f(x)]

(the score of ``q`` with respect to ``eta`` is ``T(x) - m``). Three ways to estimate it from P
draws, by variance (Salimans & Knowles 2013; Ranganath et al. 2014; Mohamed et al. 2020):

* **pathwise** (in ``ExpFamilyGuide``: the engine's autodiff gradient through reparameterised or
  implicitly reparameterised draws, then the closed-form ``fisher_inverse``): unbiased, variance
  ``~ Var_q[grad_x f . dx/deta] / P``, the lowest for smooth ``f``, not zero even when ``f`` is
  linear in ``T``.
* **regression** (``regression_natural_params``): ``nat = Cov_P[T]^-1 Cov_P[T, f] - eta`` with
  sample covariances: the score function with the optimal linear control variate. **Exact** (zero
  variance) when ``f`` is linear in ``T`` (a conjugate site) given ``P >= k + 1`` distinct draws;
  otherwise the part of ``f`` that ``T`` does not explain is noise, ``~ Var[residual] /
  (P Var[T])``, with an O(1/P) ratio bias.
* **score** (``score_natural_gradient``): ``F^-1`` in closed form applied to the score-function
  estimate ``g = sum_k (f_k - b_k)(T_k - m) / P`` with the exact ``m = E_q[T]``. The control
  variate is the leave-one-out baseline ``b_k = mean_{j != k} f_j`` (independent of draw k, so
  ``g`` stays **unbiased**; it equals ``sum_k (f_k - fbar)(T_k - m) / (P - 1)``). Needs only
  log densities (no gradient, no reparameterisation: it is the fallback for any family) and
  ``P >= 2``; its variance is the highest, ``~ Var_q[(f - E f)(T - m)] / P`` with the baseline
  and ``~ E_q[f^2 |T - m|^2] / P`` without it, which the constant part of ``f`` (often hundreds
  of nats) dominates: the baseline removes that part.

**Linear control variate for pathwise** (``linear_cv_coefficients``, on by default with
``control_variate="loo"``): the pathwise estimate of ``grad_eta E_q[f]`` is noisy even for a
conjugate site. For ``f = c . T`` it is ``mean_k (c . dT/du_k) du_k/deta``, whose mean is ``F c``
but whose spread along the Gamma's shape, after ``F^-1`` (an eigenvalue ``~ 2 a^2``), is
``~ |c_x| mean(x) sqrt(a / P)`` nats of natural parameter: from a start 300x off, a unit step sent a
concentration from 100 to 1e8, where it froze the fit (a Gamma-Poisson hierarchy: 1250 steps to
the optimum in float64, never in float32). With ``phi_k = c_k . T(u_k)`` as control variate,

    grad_eta E_q[f] ~= mean_k (df/du_k - c_k . dT/du_k) du_k/deta + F mean_k c_k,

and ``c_k`` the least-squares fit of the per-draw gradients ``df/du_j ~ (dT/du_j)^T c`` over the
*other* draws ``j != k`` (independent of draw ``k``, so the estimate stays **unbiased**; Miller et
al. 2017, Geffner & Domke 2018). For a conditionally conjugate site the residual is only the
noise of its Markov blanket's draws, and the step is the conjugate-computation update
``nat = c - eta`` (Khan & Lin 2017) that the regression estimator gives for a single factor.

The entropy enters in closed form in all three (``-eta`` above): putting ``log q`` inside the
score-function average instead would only add the zero-mean noise ``Cov_P[T, <eta, T>] - F eta``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ngvi.families import ExpFamily, Params

__all__ = [
    "CONTROL_VARIATES",
    "linear_cv_coefficients",
    "regression_natural_params",
    "score_gradient",
    "score_natural_gradient",
]

CONTROL_VARIATES = ("loo", "none")


def regression_natural_params(stats: jax.Array, f: jax.Array) -> jax.Array:
    """Least-squares ``beta = Cov[T]^-1 Cov[T, f]`` per factor (Salimans & Knowles 2013).

    ``stats``: ``(P, *batch, k)`` flattened sufficient statistics of P draws; ``f``: ``(P,)``.
    Exact (zero variance) when ``f`` is linear in ``T`` and the P draws span it."""
    tc = stats - jnp.mean(stats, axis=0)
    fc = f - jnp.mean(f)
    cov = jnp.einsum("p...i,p...j->...ij", tc, tc)
    cross = jnp.einsum("p...i,p->...i", tc, fc)
    return jnp.linalg.solve(cov, cross[..., None])[..., 0]


def score_gradient(
    stats: jax.Array, mean: jax.Array, f: jax.Array, control_variate: str = "loo"
) -> jax.Array:
    """Score-function estimate of ``grad_eta E_q[f] = E_q[f (T - m)]``, shape ``(*batch, k)``.

    ``stats``: ``(P, *batch, k)`` flattened ``T`` of P independent draws; ``mean``: the exact
    ``m = E_q[T]`` ``(*batch, k)``; ``f``: ``(P,)``. ``control_variate="loo"``: baseline
    ``b_k = mean_{j != k} f_j``, i.e. ``sum_k (f_k - fbar)(T_k - m) / (P - 1)`` (unbiased);
    ``"none"``: ``sum_k f_k (T_k - m) / P``."""
    num = f.shape[0]
    score = stats - mean
    if control_variate == "loo":
        return jnp.einsum("p...i,p->...i", score, f - jnp.mean(f)) / (num - 1)
    if control_variate == "none":
        return jnp.einsum("p...i,p->...i", score, f) / num
    raise ValueError(f"control_variate must be one of {CONTROL_VARIATES}, got {control_variate!r}")


def score_natural_gradient(
    family: ExpFamily, eta: Params, stats: jax.Array, f: jax.Array, control_variate: str = "loo"
) -> Params:
    """``nat = F(eta)^-1 g - eta`` with ``g = score_gradient(...)`` and the family's closed-form
    ``fisher_inverse`` (module docstring; constant base measure)."""
    mean = family.flatten(family.natural_to_mean(eta))
    g = family.unflatten(score_gradient(stats, mean, f, control_variate))
    return tuple(n - e for n, e in zip(family.fisher_inverse(eta, g), eta, strict=True))


def linear_cv_coefficients(jac: jax.Array, grad: jax.Array) -> jax.Array:
    """Leave-one-out least squares ``c_k = argmin_c sum_{j != k} |grad_j - jac_j c|^2`` per
    batch element, shape ``(P, *batch, k)`` (module docstring).

    ``jac``: ``(P, *batch, du, k)``, ``dT/du`` of each draw; ``grad``: ``(P, *batch, du)``, the
    draws' ``df/du``. A ridge of ``16 eps`` times each diagonal entry of the normal equations
    (invariant to the statistics' scales, which differ by orders of magnitude: ``1`` and ``x``
    for a Gamma) keeps a fit from few draws finite; it shrinks ``c`` but, like any ``c``
    independent of draw ``k``, leaves the control variate unbiased."""
    jtj = jnp.einsum("p...ij,p...il->p...jl", jac, jac)
    jtg = jnp.einsum("p...ij,p...i->p...j", jac, grad)
    normal, rhs = jnp.sum(jtj, axis=0) - jtj, jnp.sum(jtg, axis=0) - jtg
    finfo = jnp.finfo(normal.dtype)
    diag = jnp.diagonal(normal, axis1=-2, axis2=-1)
    ridge = (
        jnp.eye(normal.shape[-1], dtype=normal.dtype)
        * (16 * finfo.eps * diag + finfo.tiny)[..., None, :]
    )
    return jnp.linalg.solve(normal + ridge, rhs[..., None])[..., 0]
