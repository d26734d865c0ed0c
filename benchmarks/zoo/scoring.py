"""Deterministic ELBO scorers with common random numbers, one per guide family, and their
family optima by L-BFGS (float64). See ``/work/shared/PERFORMANCE-NOTES.md``: every fit and the
family optimum are scored by the same fixed-noise ELBO, so gaps compare without Monte Carlo noise.

* mean-field Gaussian ``N(loc, diag scale^2)``: ``ELBO = mean_k log p(loc + scale * e_k)
  + sum log scale + d/2 log(2 pi e)`` (``ngvi.report.scoring.make_elbo_scorer``) with antithetic
  noise whose every column has sample second moment exactly 1, so the scorer is exact for a
  quadratic log density and its optimum does not overfit the noise;
* full-rank Gaussian ``N(loc, C C^T)``, ``C`` the lower Cholesky factor of the covariance:
  ``mean_k log p(loc + C e_k) + sum log diag C + d/2 log(2 pi e)`` with whitened antithetic
  noise (``mean e e^T = I`` exactly); a fit's precision factor is turned into ``C`` first, so
  the score depends on the distribution only;
* exponential-family guide: ``mean_k log p(u_k) + H[q]`` with ``u_k = guide.reparam(params,
  keys)`` on fixed keys (implicit reparameterisation makes it a smooth function of the natural
  parameters) and the guide's closed-form entropy;
* any other guide (K-FAC): ``mean_k log p(z_k) + H[q]``, ``z_k ~ q`` on a fixed key (no family
  optimum; the harness compares it with the mean-field optimum).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to

from ngvi.guides.fullrank import whitened_antithetic_noise
from ngvi.model.target import Target
from ngvi.report.scoring import make_elbo_scorer, mean_log_density

__all__ = [
    "NUM_SAMPLES",
    "SEED",
    "ef_box",
    "expfam_scorer",
    "fullrank_scorer",
    "generic_elbo",
    "lbfgs",
    "meanfield_noise",
    "meanfield_scorer",
    "precision_to_cov_chol",
]

NUM_SAMPLES = 4096
SEED = 0
_LOG_2PIE = math.log(2 * math.pi * math.e)


def meanfield_noise(dim: int, num: int = NUM_SAMPLES, seed: int = SEED) -> jax.Array:
    """(num, dim) antithetic pairs, each column scaled to sample second moment exactly 1."""
    half = jax.random.normal(jax.random.PRNGKey(seed), (num // 2, dim))
    half = half / jnp.sqrt(jnp.mean(half**2, axis=0))
    return jnp.concatenate([half, -half])


def meanfield_scorer(target: Target, args, kwargs, seed: int = SEED) -> Callable:
    """``score(loc, scale) -> ELBO`` (module docstring) on the noise of ``seed``."""
    return make_elbo_scorer(target, args, kwargs, eps=meanfield_noise(target.dim, seed=seed))


def _mean_logp(target: Target, args, kwargs, z: jax.Array) -> jax.Array:
    """mean_k log p(z_k) over the rows of z (K, d), in chunks to bound memory."""
    return mean_log_density(target, args, kwargs, z)


def fullrank_scorer(target: Target, args, kwargs, seed: int = SEED) -> Callable:
    """``score(loc, cov_chol) -> ELBO`` with ``cov_chol`` the lower Cholesky factor of the
    covariance (module docstring), on the noise of ``seed``."""
    eps = whitened_antithetic_noise(jax.random.PRNGKey(seed), NUM_SAMPLES, target.dim)

    @jax.jit
    def score(loc, chol):
        z = loc + eps @ chol.T
        d = loc.shape[0]
        ent = jnp.sum(jnp.log(jnp.diagonal(chol))) + 0.5 * d * _LOG_2PIE
        return _mean_logp(target, args, kwargs, z) + ent

    return score


def precision_to_cov_chol(prec_tril) -> jax.Array:
    """The lower Cholesky factor of ``Sigma = (L L^T)^-1`` from the precision factor ``L``."""
    inv = jax.scipy.linalg.solve_triangular(prec_tril, jnp.eye(prec_tril.shape[0]), lower=True)
    return jnp.linalg.cholesky(inv.T @ inv)


def expfam_scorer(guide, args, kwargs, seed: int = SEED) -> Callable:
    """``score(params) -> ELBO`` for a set-up ``ExpFamilyGuide`` on the fixed keys of ``seed``."""
    keys = jax.random.split(jax.random.PRNGKey(seed), NUM_SAMPLES)
    target = guide.target

    @jax.jit
    def score(params):
        return _mean_logp(target, args, kwargs, guide.reparam(params, keys)) + guide.entropy(params)

    return score


def generic_elbo(guide, params, args, kwargs) -> float:
    """mean_k log p(z_k) + H[q] with z_k ~ q on a fixed key and the guide's closed-form entropy
    (any guide; K-FAC's flat distribution samples but has no log density)."""
    z = guide.flat_distribution(params).sample(jax.random.PRNGKey(SEED), (NUM_SAMPLES,))
    return float(_mean_logp(guide.target, args, kwargs, z) + guide.entropy(params))


def ef_box(guide, params: dict) -> tuple[Callable, Callable]:
    """(to_unconstrained, from_unconstrained) for the guide's natural parameters, whose domains
    are boxes (``guide._param_specs``: real, greater_than(lo) or less_than(hi))."""
    specs = guide._param_specs(guide.target, params)
    tr = {k: biject_to(c) for k, (_, c) in specs.items()}
    to_u = lambda p: {k: tr[k].inv(v) for k, v in p.items()}
    from_u = lambda u: {k: tr[k](v) for k, v in u.items()}
    return to_u, from_u


def lbfgs(fun: Callable, x0, maxiter: int = 5000) -> tuple[np.ndarray, float, dict]:
    """Minimise the jittable scalar ``fun`` of a pytree from ``x0`` with scipy's L-BFGS-B on
    exact JAX gradients (float64); returns (x, fun(x), info)."""
    flat0, unravel = ravel_pytree(x0)
    vg = jax.jit(jax.value_and_grad(lambda x: fun(unravel(x))))

    def f(x):
        v, g = vg(jnp.asarray(x))
        v, g = float(v), np.asarray(g, dtype=np.float64)
        if not np.isfinite(v) or not np.all(np.isfinite(g)):
            return np.inf, np.zeros_like(g)
        return v, g

    opts = {"maxiter": maxiter, "maxcor": 30, "ftol": 1e-14, "gtol": 1e-9, "maxls": 50}
    res = scipy.optimize.minimize(
        f, np.asarray(flat0, np.float64), jac=True, method="L-BFGS-B", options=opts
    )
    info = {"iterations": int(res.nit), "success": bool(res.success), "message": str(res.message)}
    return unravel(jnp.asarray(res.x)), float(res.fun), info
