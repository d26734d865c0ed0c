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
from numpyro.infer.initialization import init_to_feasible, init_to_median, init_to_uniform

from ngvi.errors import ConfigError, ModelError
from ngvi.model.target import Target, init_candidates, join_data, make_target, split_data

__all__ = [
    "DEFAULT_STARTS",
    "Guide",
    "check_callable",
    "check_positive",
    "default_precision_schedule",
    "tree_vdot",
]

#: the candidate starts tried when no ``init_strategy`` is given (``Guide.choose_start``)
DEFAULT_STARTS = (
    ("median", init_to_median(num_samples=15)),
    ("feasible", init_to_feasible()),
    ("uniform", init_to_uniform(radius=2.0)),
)

_LATENT = "_ngvi_latent"


class Guide:
    """Shared machinery of ngvi guides; subclasses implement the family's math.

    Like NumPyro's autoguides, a guide learns the model's latent layout on its first ``setup``
    (done by ``NGVI.init``) and keeps it; a later setup with a model of another layout raises.

    The start: with ``init_strategy`` given (any NumPyro init strategy, e.g.
    ``numpyro.infer.init_to_value(values=...)``), the guide's initial ``q`` is centred there.
    Without it, ``NGVI.init`` tries the candidates of ``DEFAULT_STARTS`` (NumPyro's
    ``init_to_median(num_samples=15)``, ``init_to_feasible()``, ``init_to_uniform()``), scores
    the guide's initial ``q`` at each by a fixed-noise ELBO (8 draws) and keeps the best
    (``choose_start``; ``start_scores`` records them). One start does not fit all: a median of
    prior draws can leave a long random-walk path flat and its step size tiny, so that the fit
    crawls, where the feasible point (every unconstrained coordinate 0) lets it move.
    """

    #: True when ``natural_step`` is a descent step on the step's common-random-numbers loss
    #: (its direction is built from that loss's gradient), so the engine may judge it by that
    #: loss alone; False for directions from other estimators (see ``NGVI``'s accept rule).
    crn_descent: bool = True

    #: False for a guide whose initial q does not follow ``init_z`` where it matters (K-FAC's
    #: layers start from their own fan-in scaled draws), so scoring candidate starts, which
    #: traces the model op by op, would only cost time: ``choose_start`` keeps the layout's.
    chooses_start: bool = True

    def __init__(self, model: Callable, *, init_strategy: Callable | None = None):
        if not callable(model):
            raise ConfigError(f"model must be a callable NumPyro model, got {model!r}.")
        check_callable("init_strategy", init_strategy, "e.g. numpyro.infer.init_to_median()")
        self.model = model
        self.user_init_strategy = init_strategy  # None: choose among DEFAULT_STARTS
        self.init_strategy = init_strategy or DEFAULT_STARTS[0][1]  # the layout's first point
        self.start_scores: dict[str, float] = {}  # ELBO of the initial q per candidate start
        self._target: Target | None = None

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

    def choose_start(self, rng_key: jax.Array, args: tuple = (), kwargs: dict | None = None):
        """The set-up target with ``init_z`` at the best of the candidate starts (class
        docstring); the user's ``init_strategy`` alone when given. Each candidate is scored by
        ``ELBO = mean_k log p(x, z_k) + H[q0]`` of the guide's initial ``q0`` centred there, on
        one fixed set of 8 draws (common random numbers); candidates with a non-finite score are
        left out, and the layout's own point stays when none is better."""
        target = self.target
        if self.user_init_strategy is not None or not self.chooses_start:
            return target
        others = init_candidates(target, args, kwargs, [s for _, s in DEFAULT_STARTS[1:]], rng_key)
        found = [(n, z) for (n, _), z in zip(DEFAULT_STARTS[1:], others) if z is not None]
        names = [DEFAULT_STARTS[0][0]] + [n for n, _ in found]
        points = [jnp.asarray(target.init_z)] + [z for _, z in found]
        score = self._start_score(target, args, kwargs)
        eps = self.base_noise(jax.random.fold_in(rng_key, 7), 8)
        scores = [float(score(z, eps)) for z in points]
        self.start_scores = dict(zip(names, scores))
        finite = [i for i, v in enumerate(scores) if math.isfinite(v)]
        best = max(finite, key=lambda i: scores[i]) if finite else 0
        self._target = target._replace(init_z=points[best])
        return self._target

    def _start_score(self, target: Target, args, kwargs) -> Callable:
        """A jitted ``(z0, eps) -> ELBO`` of the initial ``q`` centred at ``z0``."""
        dynamic, spec = split_data(args, dict(kwargs or {}))
        key = jax.random.PRNGKey(0)  # the model's own randomness (subsampling), fixed

        @jax.jit
        def score(z0, eps, dynamic):
            a, k = join_data(dynamic, spec)
            params = self.init_params(target._replace(init_z=z0))
            z = self.reparam(params, eps)
            logp = jax.vmap(lambda zi: target.log_density(zi, a, k, key))(z)
            return jnp.mean(logp) + self.entropy(params)

        return lambda z0, eps: score(z0, eps, dynamic)

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
