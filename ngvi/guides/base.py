"""Guides: variational families over a model's flat unconstrained latent vector.

A guide is an ordinary NumPyro guide (``guide(*args, **kwargs)`` samples every latent site, so
``numpyro.infer.Predictive(model, guide=guide, params=params)`` works) plus what the NGVI engine
needs: a reparameterized sampler, the closed-form entropy, and ``natural_step``, which applies the
closed-form inverse Fisher of the family to an ELBO gradient. The base class ``Guide`` holds what
every family shares (model layout, NumPyro protocol, posterior sampling); families only write the
math.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import biject_to
from numpyro.infer.initialization import init_to_median

from ngvi.errors import ConfigError, ModelError
from ngvi.model.target import Target, make_target

__all__ = ["Guide", "check_callable", "check_positive", "default_precision_schedule", "tree_vdot"]

_LATENT = "_ngvi_latent"


class Guide:
    """Shared machinery of ngvi guides; subclasses implement the family's math.

    Like NumPyro's autoguides, a guide learns the model's latent layout on its first ``setup``
    (done by ``NGVI.init``) and keeps it; a later setup with a model of another layout raises.
    """

    #: True when ``natural_step`` is a descent step on the step's common-random-numbers loss
    #: (its direction is built from that loss's gradient), so the engine may judge it by that
    #: loss alone; False for directions from other estimators (see ``NGVI``'s accept rule).
    crn_descent: bool = True

    def __init__(self, model: Callable, *, init_strategy: Callable | None = None):
        if not callable(model):
            raise ConfigError(f"model must be a callable NumPyro model, got {model!r}.")
        check_callable("init_strategy", init_strategy, "e.g. numpyro.infer.init_to_median()")
        self.model = model
        self.init_strategy = init_strategy or init_to_median(num_samples=15)
        self._target: Target | None = None

    @property
    def engine_defaults(self) -> dict:
        """The ``NGVI`` settings this family needs, ``{"lr": ..., "num_particles": ...}`` (either
        key may be absent): ``NGVI(model, guide)`` uses them for every argument the user leaves
        at None, and its own defaults (``lr=1.0``, ``num_particles=8``) for the rest. The base
        family needs nothing beyond those."""
        return {}

    # -- layout ---------------------------------------------------------------------------
    def setup(self, rng_key: jax.Array, args: tuple = (), kwargs: dict | None = None) -> Target:
        """Lay out the model's latent space (once) and return the ``Target``."""
        target = make_target(
            self.model, args, kwargs, rng_key=rng_key, init_strategy=self.init_strategy
        )
        if self._target is not None and self._target.signature != target.signature:
            raise ModelError(
                f"this {type(self).__name__} was set up for a model with latent sites "
                f"[{self._target.signature}] but is now given [{target.signature}]: build a new "
                "guide for the new model."
            )
        self._target = target
        return target

    @property
    def target(self) -> Target:
        if self._target is None:
            raise ModelError(
                f"{type(self).__name__} is not set up yet: call NGVI(...).init or run first, or "
                "guide.setup(rng_key, args, kwargs)."
            )
        return self._target

    # -- what a family implements ------------------------------------------------------------
    def init_params(self, target: Target) -> dict:
        raise NotImplementedError

    def base_noise(self, rng_key: jax.Array, num_particles: int) -> jax.Array:
        """Standard normal noise (num_particles, d) in antithetic pairs (eps, -eps), moment-matched
        so every coordinate has sample mean 0 and sample second moment 1 exactly.

        The pairs make the reparameterized mean gradient exact for a quadratic log density and
        the moment matching does the same for the Stein/Price Hessian E[g eps]/sigma. An odd
        number of particles gives plain Monte Carlo noise."""
        d = self.target.dim
        if num_particles % 2:
            return jax.random.normal(rng_key, (num_particles, d))
        half = jax.random.normal(rng_key, (num_particles // 2, d))
        half = half * jax.lax.rsqrt(jnp.mean(half**2, axis=0))
        return jnp.concatenate([half, -half])

    def reparam(self, params: dict, eps: jax.Array) -> jax.Array:
        raise NotImplementedError

    def entropy(self, params: dict) -> jax.Array:
        raise NotImplementedError

    def value_and_grad(
        self, loss_and_logp: Callable, params: dict, step, ctx
    ) -> tuple[tuple[jax.Array, jax.Array], dict, Any]:
        """``((loss, log p per particle), grad loss, curvature)`` for the engine's step.

        The default is autodiff of the engine's ``loss_and_logp(params)`` and no curvature
        (``None``). A guide whose curvature estimate needs quantities of the same forward pass
        (K-FAC: layer inputs, pre-activation gradients) overrides this to compute the loss, its
        gradient and those statistics from one forward pass; the engine hands the third item to
        ``natural_step`` as ``ctx.curvature``."""
        (loss, logp), grad = jax.value_and_grad(loss_and_logp, has_aux=True)(params)
        return (loss, logp), grad, None

    def reparam_proposal(self, params: dict, proposal: dict, eps: jax.Array, ctx) -> jax.Array:
        """``reparam(proposal, eps)``, the samples the engine's accept test scores the proposal
        on (the step's noise: common random numbers). A guide may reuse what the gradient pass
        computed (``ctx.curvature``) when it is unchanged by the step (K-FAC: the weight
        perturbations between refreshes); the result must equal ``reparam(proposal, eps)``."""
        return self.reparam(proposal, eps)

    def natural_step(self, params: dict, grad: dict, lr, damping, step, ctx=None) -> dict:
        """New parameters after one damped natural step on the loss -ELBO with gradient ``grad``.

        ``ctx`` (``ngvi.infer.StepContext``) carries the step's noise, data and loss function for
        guides whose curvature needs more than the gradient. Carried statistics (e.g. running
        Kronecker factors) live in ``params`` as leaves the sampler does not differentiate."""
        raise NotImplementedError

    def kl(self, p: dict, q: dict) -> jax.Array:
        raise NotImplementedError

    def average(self, avg: dict, params: dict, w) -> dict:
        """Move the reported iterate average a fraction ``w`` towards ``params``; guides whose
        params carry running statistics (not a distribution) may keep those out of it."""
        return jax.tree.map(lambda a, p: a + w * (p - a), avg, params)

    def flat_distribution(self, params: dict) -> dist.Distribution:
        raise NotImplementedError

    # -- NumPyro protocol --------------------------------------------------------------------
    def _param_specs(self, target: Target, init: dict) -> dict:
        """Initial values and constraints of the guide's numpyro.param sites."""
        raise NotImplementedError

    def __call__(self, *args, **kwargs) -> dict:
        """Sample every latent site (constrained) as a NumPyro guide."""
        if self._target is None:
            self.setup(jax.random.PRNGKey(0), args, kwargs)
        target = self.target
        init = self.init_params(target)
        params = {
            k: numpyro.param(f"ngvi_{k}", v, constraint=c)
            for k, (v, c) in self._param_specs(target, init).items()
        }
        z = numpyro.sample(_LATENT, self.flat_distribution(params), infer={"is_auxiliary": True})
        return self._emit_sites(target, z)

    def _emit_sites(self, target: Target, z: jax.Array) -> dict:
        unc = target.unravel(z)
        out = {}
        for site in target.sites:
            t = biject_to(site.support)
            value = t(unc[site.name])
            log_det = t.log_abs_det_jacobian(unc[site.name], value)
            event_dim = len(site.shape)
            log_det = jnp.sum(log_det) if jnp.ndim(log_det) else log_det
            out[site.name] = numpyro.sample(
                site.name, dist.Delta(value, -log_det, event_dim=event_dim)
            )
        return out

    def numpyro_params(self, params: dict) -> dict:
        """``params`` under the names the NumPyro guide uses (for Predictive and handlers)."""
        return {f"ngvi_{k}": v for k, v in params.items()}

    def sample_posterior(
        self, rng_key: jax.Array, params: dict, *args, sample_shape: tuple = (), **kwargs
    ) -> dict:
        """Constrained samples per latent site, shape ``sample_shape + site.shape``.

        Given the model's args/kwargs, deterministic sites are returned too."""
        params = {k.removeprefix("ngvi_"): v for k, v in params.items()}
        z = self.flat_distribution(params).sample(rng_key, sample_shape)
        return self.constrain(z, *args, **kwargs)

    def constrain(self, z: jax.Array, *args, **kwargs) -> dict:
        """Flat unconstrained samples (..., dim) to constrained values per site."""
        target = self.target
        if args or kwargs:
            return target.constrain(z, args, kwargs)
        lead = z.shape[:-1]
        flat = z.reshape((-1, target.dim))
        unc = jax.vmap(target.unravel)(flat)
        return {
            s.name: biject_to(s.support)(unc[s.name]).reshape(lead + s.shape) for s in target.sites
        }


def check_positive(name: str, value: Any) -> None:
    """ConfigError unless ``value`` is a positive finite real number."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}.")


def check_callable(name: str, value: Any, what: str) -> None:
    """ConfigError unless ``value`` is None (the default) or callable."""
    if value is not None and not callable(value):
        raise ConfigError(f"{name} must be None or a callable ({what}), got {value!r}.")


def default_precision_schedule(step) -> jax.Array:
    """Precision step size b_t = max(1 / (1 + 0.3 t), 0.01): a unit first step, then a running
    average of the noisy Hessian estimates (measured faster than a constant rate)."""
    return jnp.maximum(1.0 / (1.0 + 0.3 * step), 0.01)


def tree_vdot(a: Any, b: Any) -> jax.Array:
    """Sum of elementwise products of two pytrees of the same structure."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
