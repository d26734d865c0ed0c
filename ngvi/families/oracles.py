"""Reference (slow, generic) computations used as test oracles.

These deliberately avoid the closed forms of the families:

* ``fisher_autodiff``: ``F = hess A(eta)`` by ``jax.hessian`` in ``flatten``
  coordinates;
* ``fisher_monte_carlo``: ``F = Cov_q[T(x)]`` from ``n`` draws;
* ``kl_monte_carlo``: ``KL(p || q) = E_p[log p(x) - log q(x)]`` with its standard error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import Array, ExpFamily, Params


def fisher_autodiff(family: ExpFamily, eta: Params) -> Array:
    """``jax.hessian`` of ``log_partition`` w.r.t. the flattened ``eta``; ``(..., k, k)``."""
    flat = family.flatten(eta)
    batch, k = flat.shape[:-1], flat.shape[-1]

    def a_of(vec: Array) -> Array:
        return family.log_partition(family.unflatten(vec))

    hess = jax.jit(jax.vmap(jax.hessian(a_of)))(flat.reshape((-1, k)))
    return hess.reshape(batch + (k, k))


def fisher_monte_carlo(family: ExpFamily, key: Array, eta: Params, n: int) -> Array:
    """Unbiased sample covariance of ``flatten(T(x))`` over ``n`` draws ``x ~ q(eta)``."""
    return stats_covariance(family, family.sample(key, eta, (n,)))


def stats_covariance(family: ExpFamily, x: Array) -> Array:
    """Sample covariance of ``flatten(T(x))`` over the leading axis of draws ``x``."""
    t = family.flatten(family.sufficient_stats(x))
    t = t - jnp.mean(t, axis=0)
    return jnp.einsum("n...i,n...j->...ij", t, t) / (t.shape[0] - 1)


def kl_monte_carlo(
    family: ExpFamily, key: Array, eta_p: Params, eta_q: Params, n: int
) -> tuple[Array, Array]:
    """``(estimate, standard_error)`` of ``E_p[log p(x) - log q(x)]`` from ``n`` draws."""
    x = jax.lax.stop_gradient(family.sample(key, eta_p, (n,)))
    return kl_from_samples(family, x, eta_p, eta_q)


def kl_from_samples(
    family: ExpFamily, x: Array, eta_p: Params, eta_q: Params
) -> tuple[Array, Array]:
    """``(mean, standard error)`` of ``log p(x) - log q(x)`` over draws ``x ~ p``."""
    diff = family.log_prob(x, eta_p) - family.log_prob(x, eta_q)
    return jnp.mean(diff, 0), jnp.std(diff, 0) / jnp.sqrt(diff.shape[0])
