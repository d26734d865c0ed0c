r"""Log densities of Dirichlet, Beta and Gamma latent sites computed in log space.

NumPyro scores a latent site on the unconstrained scale as ``log p(T(u)) + log |dT/du|``: it
forms the constrained value ``x = T(u)`` first and takes logarithms afterwards. With a
concentration below 1 the prior puts much of its mass where ``x`` is below the smallest float
(``Dirichlet(0.01 * ones(50))``: most components are near ``exp(-100)``; float32 stops at
``1.2e-38 = exp(-87)``), so ``x`` underflows to 0 and the sum is
``(alpha - 1) log 0 + log 0 = inf - inf = NaN``, although ``log p(u)`` itself is finite and
smooth. Here both terms are written in ``log x``, computed from ``u`` without forming ``x``:

* stick-breaking (simplex, ``K`` parts, ``u`` of length ``K - 1``):
  ``v_i = u_i - log(K - 1 - i)``, ``log z_i = log sigmoid(v_i)``,
  ``log(1 - z_i) = log sigmoid(-v_i)``, ``log x_i = log z_i + sum_{j<i} log(1 - z_j)``,
  ``log x_K = sum_j log(1 - z_j)`` and ``log |J| = sum_{i<K} [log x_i + log(1 - z_i)]``;
* sigmoid (unit interval): ``log x = log sigmoid(u)``, ``log(1 - x) = log sigmoid(-u)``,
  ``log |J| = log x + log(1 - x)``;
* exp (positive): ``log x = u``, ``log |J| = u``.

The densities are the textbook ones in ``log x``: Dirichlet ``sum (a_i - 1) log x_i - log B(a)``,
Beta ``(a - 1) log x + (b - 1) log(1 - x) - log B(a, b)``, Gamma
``a log r - log Gamma(a) + (a - 1) log x - r x``. Other sites keep NumPyro's own scoring, and the
values the model sees (``x = T(u)``, NumPyro's transform) are unchanged, so only these sites'
own terms change, and only where NumPyro's would overflow; elsewhere both agree to rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.nn import log_sigmoid
from jax.scipy.special import gammaln
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost
from numpyro.infer.util import log_density
from numpyro.primitives import Messenger

__all__ = ["logspace_site", "stable_potential_energy", "stick_breaking_log"]


def stick_breaking_log(u: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(log x, log |J|)`` of NumPyro's stick-breaking map for ``u`` of shape (..., K-1):
    ``log x`` of shape (..., K) and the log-Jacobian of shape (...) (module docstring)."""
    k1 = u.shape[-1]
    v = u - jnp.log(k1 - jnp.arange(k1, dtype=u.dtype))
    log_z, log_1mz = log_sigmoid(v), log_sigmoid(-v)
    rest = jnp.cumsum(log_1mz, axis=-1)  # log of the stick left after part i
    before = jnp.concatenate([jnp.zeros_like(rest[..., :1]), rest[..., :-1]], axis=-1)
    log_x = jnp.concatenate([log_z + before, rest[..., -1:]], axis=-1)
    return log_x, jnp.sum(log_z + before + log_1mz, axis=-1)


def _base_log_prob(fn: dist.Distribution, u: jnp.ndarray):
    """``log p(T(u)) + log |J|`` of a plain Dirichlet / Beta / Gamma, in log space; else None."""
    if isinstance(fn, dist.Dirichlet) and fn.support is constraints.simplex:
        log_x, log_det = stick_breaking_log(u)
        a = fn.concentration
        norm = jnp.sum(gammaln(a), -1) - gammaln(jnp.sum(a, -1))
        return jnp.sum((a - 1.0) * log_x, axis=-1) - norm + log_det
    if isinstance(fn, dist.Beta) and fn.support is constraints.unit_interval:
        a, b = fn.concentration1, fn.concentration0
        log_x, log_1mx = log_sigmoid(u), log_sigmoid(-u)
        norm = gammaln(a) + gammaln(b) - gammaln(a + b)
        return a * log_x + b * log_1mx - norm  # (a-1) log x + (b-1) log(1-x) + log|J|
    if isinstance(fn, dist.Gamma) and fn.support is constraints.positive:
        a, r = fn.concentration, fn.rate
        return a * jnp.log(r) - gammaln(a) + a * u - r * jnp.exp(u)  # (a-1) u + u = a u
    return None


def logspace_site(fn: dist.Distribution, u: jnp.ndarray):
    """``(x, log p(x) + log |J|)`` with the density term of batch shape ``fn.batch_shape``,
    for a (plate-expanded, ``to_event``) Dirichlet, Beta or Gamma site; ``None`` otherwise."""
    base, ndims = fn, 0
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution)):
        if isinstance(base, dist.Independent):
            ndims += base.reinterpreted_batch_ndims
        base = base.base_dist
    lp = _base_log_prob(base, u)
    if lp is None:
        return None
    full = fn.shape()[: len(fn.shape()) - len(base.event_shape)]
    lp = jnp.broadcast_to(lp, full)
    lp = jnp.sum(lp, axis=tuple(range(lp.ndim - ndims, lp.ndim))) if ndims else lp
    return biject_to(fn.support)(u), lp


class _Scored(dist.Distribution):
    """``fn`` whose log density at the substituted value is the precomputed ``log_prob``."""

    def __init__(self, fn: dist.Distribution, log_prob: jnp.ndarray):
        self.fn, self._log_prob = fn, log_prob
        super().__init__(fn.batch_shape, fn.event_shape)

    @property
    def support(self):
        return self.fn.support

    def sample(self, key, sample_shape=()):
        return self.fn.sample(key, sample_shape)

    def log_prob(self, value):
        return self._log_prob


class _unconstrain_logspace(Messenger):
    """Substitute every latent site of ``params`` (unconstrained values) as NumPyro's
    ``potential_energy`` does, ``x = T(u)`` plus a ``log |J|`` factor, except that Dirichlet,
    Beta and Gamma sites are scored in log space (``logspace_site``)."""

    def __init__(self, fn: Callable, params: dict):
        self.params = params
        super().__init__(fn)

    def process_message(self, msg):
        name = msg.get("name")
        if msg["type"] != "sample" or msg["is_observed"] or name not in self.params:
            return
        fn, u = msg["fn"], self.params[name]
        out = logspace_site(fn, u)
        if out is not None:
            msg["value"], msg["fn"] = out[0], _Scored(fn, out[1])
            return
        support = fn.support
        if isinstance(support, constraints.independent):
            support = support.base_constraint
        if support is constraints.real:  # the identity: no Jacobian term
            msg["value"] = u
            return
        t = biject_to(fn.support)
        value = t(u)
        log_det = t.log_abs_det_jacobian(u, value)
        extra = jnp.ndim(log_det) - jnp.ndim(value) + len(fn.event_shape)
        numpyro.factor(f"_{name}_log_det", sum_rightmost(log_det, extra))
        msg["value"] = value


def stable_potential_energy(model: Callable, args: tuple, kwargs: dict, params: dict):
    """``-(log p(x, T(u)) + log |J|)``: NumPyro's ``potential_energy`` with Dirichlet, Beta and
    Gamma latent sites scored in log space (module docstring)."""
    log_joint, _ = log_density(_unconstrain_logspace(model, params), args, kwargs, {})
    return -log_joint
