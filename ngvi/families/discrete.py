"""Discrete families: Bernoulli, Categorical, Poisson.

None of these is reparameterisable: ``sample`` returns draws that carry no
gradient with respect to ``eta`` (use score-function estimators, or, better,
the natural-gradient identities on ``m`` directly).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import gammaln, logsumexp
from numpyro.distributions import constraints

from .base import Array, ExpFamily, Params, is_static_zero


@dataclasses.dataclass(frozen=True)
class Bernoulli(ExpFamily):
    """Bernoulli with logit natural parameter.

    ``T(x) = x``, ``eta = logit(p)``, ``A = softplus(eta)``, ``m = sigmoid(eta)``,
    ``F = p (1 - p)``, ``h = 1``. Draws are returned as floats in {0., 1.}.
    """

    param_shapes = ((),)
    event_shape = ()
    support = constraints.boolean
    reparameterized = False

    @classmethod
    def from_standard(cls, probs: Array) -> Params:
        probs = jnp.asarray(probs)
        return (jnp.log(probs) - jnp.log1p(-probs),)

    def standard(self, eta: Params) -> tuple[Array]:
        """``(probs,)``."""
        return (jax.nn.sigmoid(eta[0]),)

    def init(self, batch_shape: tuple[int, ...] = (), logit: float = 0.0) -> Params:
        return (jnp.full(batch_shape, logit),)

    def log_partition(self, eta: Params) -> Array:
        return jax.nn.softplus(eta[0])

    def natural_to_mean(self, eta: Params) -> Params:
        return (jax.nn.sigmoid(eta[0]),)

    def mean_to_natural(self, m: Params) -> Params:
        return self.from_standard(m[0])

    def sufficient_stats(self, x: Array) -> Params:
        return (jnp.asarray(x, dtype=jnp.result_type(float)),)

    def log_base_measure(self, x: Array) -> Array:
        return jnp.zeros(jnp.shape(x))

    def fisher(self, eta: Params) -> Array:
        p = jax.nn.sigmoid(eta[0])
        return (p * (1.0 - p))[..., None, None]

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """``v / (p (1 - p) + damping)``."""
        p = jax.nn.sigmoid(eta[0])
        return (v[0] / (p * (1.0 - p) + damping),)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        shape = tuple(sample_shape) + self.batch_shape(eta)
        p = jax.lax.stop_gradient(jax.nn.sigmoid(eta[0]))
        return jax.random.bernoulli(key, p, shape).astype(jnp.result_type(p))

    def to_numpyro(self, eta: Params) -> dist.BernoulliLogits:
        return dist.BernoulliLogits(eta[0])


@dataclasses.dataclass(frozen=True)
class Categorical(ExpFamily):
    """Categorical over ``{0, ..., num_categories - 1}`` in one of two parameterisations.

    * ``minimal=True`` (**default**): ``eta`` = the ``K - 1`` logits relative to the
      last class, ``T(x) = onehot(x)[:K-1]``, ``A = log(1 + sum exp(eta))``. This
      is a *minimal* (regular) exponential family: ``natural <-> mean`` is a
      bijection and the Fisher ``diag(p) - p p^T`` (``p`` = first ``K-1``
      probabilities) is positive definite, with ``det F = prod(pi)``, so the
      natural gradient exists and is unique **without damping**. That is why it is
      the default.
    * ``minimal=False`` (overcomplete): ``eta`` = all ``K`` logits,
      ``A = logsumexp(eta)``, ``F = diag(pi) - pi pi^T`` has rank ``K - 1``
      (null vector ``1``: shifting all logits leaves ``q`` unchanged), so
      ``fisher_inverse`` needs ``damping > 0``; ``mean_to_natural`` returns the
      representative ``log pi`` (with ``A = 0``). Symmetric in the classes.

    ``h = 1``. ``fisher_inverse`` uses Sherman-Morrison on diag-plus-rank-one.
    """

    num_categories: int
    minimal: bool = True

    param_shapes = property(lambda self: ((self._k,),))
    event_shape = ()
    reparameterized = False

    @property
    def _k(self) -> int:
        return self.num_categories - 1 if self.minimal else self.num_categories

    @property
    def support(self):
        return constraints.integer_interval(0, self.num_categories - 1)

    def full_logits(self, eta: Params) -> Array:
        """All ``K`` logits (appending the reference 0 in the minimal case)."""
        if not self.minimal:
            return eta[0]
        e = eta[0]
        return jnp.concatenate([e, jnp.zeros(e.shape[:-1] + (1,), e.dtype)], -1)

    def from_standard(self, probs: Array) -> Params:
        """``eta`` from class probabilities ``(..., K)`` (an instance method)."""
        logp = jnp.log(jnp.asarray(probs))
        if self.minimal:
            return (logp[..., :-1] - logp[..., -1:],)
        return (logp,)

    def standard(self, eta: Params) -> tuple[Array]:
        """``(probs,)`` with ``probs`` of shape ``(..., K)``."""
        return (jax.nn.softmax(self.full_logits(eta), -1),)

    def init(self, batch_shape: tuple[int, ...] = ()) -> Params:
        """The uniform distribution."""
        return (jnp.zeros(batch_shape + (self._k,)),)

    def log_partition(self, eta: Params) -> Array:
        return logsumexp(self.full_logits(eta), -1)

    def natural_to_mean(self, eta: Params) -> Params:
        return (jax.nn.softmax(self.full_logits(eta), -1)[..., : self._k],)

    def mean_to_natural(self, m: Params) -> Params:
        """Minimal: ``log m - log(1 - sum m)``; overcomplete: ``log m``."""
        m = m[0]
        if self.minimal:
            return (jnp.log(m) - jnp.log1p(-jnp.sum(m, -1, keepdims=True)),)
        return (jnp.log(m),)

    def sufficient_stats(self, x: Array) -> Params:
        onehot = jax.nn.one_hot(x, self.num_categories, dtype=jnp.result_type(float))
        return (onehot[..., : self._k],)

    def log_base_measure(self, x: Array) -> Array:
        return jnp.zeros(jnp.shape(x))

    def fisher(self, eta: Params) -> Array:
        p = self.natural_to_mean(eta)[0]
        return jnp.eye(self._k, dtype=p.dtype) * p[..., None, :] - p[..., :, None] * p[..., None, :]

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """``(diag(p) - p p^T + damping I)^{-1} v`` by Sherman-Morrison.

        With ``D = p + damping`` and ``w = p / D``::

            x = v / D + w <w, v> / (1 - <w, p>),
            1 - <w, p> = (1 - sum p) + damping * sum(w)

        (the right-hand form avoids cancellation; ``1 - sum p`` is the last-class
        probability in the minimal case and exactly 0 in the overcomplete case,
        hence ``damping > 0`` is required there). As ``damping -> inf``,
        ``damping * x -> v``.
        """
        if not self.minimal and is_static_zero(damping):
            raise ValueError("overcomplete Categorical has a singular Fisher: use damping > 0")
        logits = self.full_logits(eta)
        pi = jax.nn.softmax(logits, -1)
        p = pi[..., : self._k]
        rest = pi[..., -1] if self.minimal else jnp.zeros(pi.shape[:-1], pi.dtype)
        d = p + damping
        w = p / d
        denom = rest + damping * jnp.sum(w, -1)
        coef = jnp.sum(w * v[0], -1) / denom
        return (v[0] / d + w * coef[..., None],)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        shape = tuple(sample_shape) + self.batch_shape(eta)
        logits = jax.lax.stop_gradient(self.full_logits(eta))
        return jax.random.categorical(key, logits, axis=-1, shape=shape)

    def to_numpyro(self, eta: Params) -> dist.CategoricalLogits:
        return dist.CategoricalLogits(self.full_logits(eta))


@dataclasses.dataclass(frozen=True)
class Poisson(ExpFamily):
    """Poisson with ``eta = log(rate)``.

    ``T(x) = x``, ``A = exp(eta)``, ``m = rate``, ``F = rate``,
    ``log h(x) = -log(x!)``. Draws are floats.
    """

    param_shapes = ((),)
    event_shape = ()
    support = constraints.nonnegative_integer
    reparameterized = False

    @classmethod
    def from_standard(cls, rate: Array) -> Params:
        return (jnp.log(jnp.asarray(rate)),)

    def standard(self, eta: Params) -> tuple[Array]:
        """``(rate,)``."""
        return (jnp.exp(eta[0]),)

    def init(self, batch_shape: tuple[int, ...] = (), rate: float = 1.0) -> Params:
        return (jnp.full(batch_shape, jnp.log(rate)),)

    def log_partition(self, eta: Params) -> Array:
        return jnp.exp(eta[0])

    def natural_to_mean(self, eta: Params) -> Params:
        return (jnp.exp(eta[0]),)

    def mean_to_natural(self, m: Params) -> Params:
        return (jnp.log(m[0]),)

    def sufficient_stats(self, x: Array) -> Params:
        return (jnp.asarray(x, dtype=jnp.result_type(float)),)

    def log_base_measure(self, x: Array) -> Array:
        return -gammaln(jnp.asarray(x, dtype=jnp.result_type(float)) + 1.0)

    def fisher(self, eta: Params) -> Array:
        return jnp.exp(eta[0])[..., None, None]

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """``v / (rate + damping)``."""
        return (v[0] / (jnp.exp(eta[0]) + damping),)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        shape = tuple(sample_shape) + self.batch_shape(eta)
        rate = jax.lax.stop_gradient(jnp.exp(eta[0]))
        return jax.random.poisson(key, rate, shape).astype(jnp.result_type(rate))

    def to_numpyro(self, eta: Params) -> dist.Poisson:
        return dist.Poisson(jnp.exp(eta[0]))
