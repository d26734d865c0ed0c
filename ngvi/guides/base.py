"""Guides: variational families over a model's flat unconstrained latent vector.

A guide is an ordinary NumPyro guide plus what the NGVI engine needs: a reparameterized sampler,
the closed-form entropy, and ``natural_step``, which applies the closed-form inverse Fisher of
the family to an ELBO gradient. The base class ``Guide`` holds what every family shares (model
layout, NumPyro protocol, posterior summaries); families only write the math.

As a NumPyro guide, ``guide(*args, **kwargs)`` reads its parameters from ``numpyro.param`` sites
named exactly as the keys of ``result.params`` and samples every latent site with the model's
batch and event dims, so ``Predictive(model, guide=guide, params=result.params)``,
``Trace_ELBO().loss(key, result.params, model, guide, *args)`` and ``handlers.substitute`` work
as with an autoguide; run without its parameters it raises. ``median``, ``quantiles``,
``get_posterior`` and ``sample_posterior`` have NumPyro's autoguide names and signatures.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost
from numpyro.handlers import block, seed, substitute, trace
from numpyro.infer.initialization import init_to_feasible, init_to_median, init_to_uniform

from ngvi.errors import ConfigError, ModelError
from ngvi.guides.params import (
    GuideParams,
    ParamLayout,
    check_param_shapes,
    layout_in_handlers,
    layout_mismatch,
)
from ngvi.guides.warmstart import WarmStart, warm_start
from ngvi.model.target import Target, init_candidates, join_data, make_target, split_data
from ngvi.numerics import random as fast_random

__all__ = [
    "DEFAULT_STARTS",
    "Guide",
    "GuideDistribution",
    "GuideParams",
    "ParamLayout",
    "check_callable",
    "check_positive",
    "check_quantiles",
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
_TRACER_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError)


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

    With ``warm_start=True`` (the Gaussian guides' default) the best candidate then starts an
    L-BFGS path on log p whose points are scored the same way, each with the scale of the L-BFGS
    Hessian's diagonal, and the best point and scale are the start when the path ended at a mode
    of log p and they beat the candidate (``ngvi.guides.warmstart``; ``start_path`` records what it
    found and cost). Without a mode (a funnel's neck) the path is not used. A model with a
    subsampled plate skips it: its log density on one fixed subsample is not the target's.
    """

    #: True when ``natural_step`` is a descent step on the step's common-random-numbers loss
    #: (its direction is built from that loss's gradient), so the engine may judge it by that
    #: loss alone; False for directions from other estimators (see ``NGVI``'s accept rule).
    crn_descent: bool = True

    #: False for a guide whose initial q does not follow ``init_z`` where it matters (K-FAC's
    #: layers start from their own fan-in scaled draws), so scoring candidate starts, which
    #: traces the model op by op, would only cost time: ``choose_start`` keeps the layout's.
    chooses_start: bool = True

    #: True when ``reparam`` is elementwise in the noise (``loc + scale * eps``): on CPU the
    #: engine then makes the accept test's and ``evaluate``'s draws a kernel of their own
    #: (``ngvi.numerics.fusion.unfused``). False for draws through a solve or a matrix product:
    #: inside the conditional that ``unfused`` uses, XLA:CPU deadlocked on a full-rank fit (all
    #: threads idle, the run waiting on them), and such draws are not fused into their consumers
    #: anyway.
    elementwise_draws: bool = False

    def __init__(
        self, model: Callable, *, init_strategy: Callable | None = None, warm_start: bool = False
    ):
        if not callable(model):
            raise ConfigError(f"model must be a callable NumPyro model, got {model!r}.")
        check_callable("init_strategy", init_strategy, "e.g. numpyro.infer.init_to_median()")
        self.model = model
        self.user_init_strategy = init_strategy  # None: choose among DEFAULT_STARTS
        self.init_strategy = init_strategy or DEFAULT_STARTS[0][1]  # the layout's first point
        self.start_scores: dict[str, float] = {}  # ELBO of the initial q per candidate start
        self.warm_start = bool(warm_start)
        self.start_path: WarmStart | None = None  # the warm start's path, when one ran
        self._start_timing_runs = 0  # extra timed runs of the path (benchmarks' steady state)
        #: the start's compiled programs per data spec (as the engine's steps: traced on the
        #: first target set up for that spec), so that a second fit does not compile them again;
        #: the Newton probe's too (``ngvi.engine.probe``: it depends on the guide and the data
        #: only, so every engine on this guide shares it)
        self._start_programs: dict = {}
        self._target: Target | None = None
        self._data: tuple = ((), {})  # the (args, kwargs) of the last setup

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
        self._data = (tuple(args), dict(kwargs or {}))  # for deterministic sites, as AutoNormal
        return target

    def ensure_setup(self, args: tuple = (), kwargs: dict | None = None) -> Target:
        """The ``Target``, setting the guide up on ``(args, kwargs)`` first if it is not yet (its
        traces of the model kept out of any enclosing NumPyro trace)."""
        if self._target is None:
            # concrete even under Predictive's vmap/scan: setup checks the data's values
            try:
                with block(), jax.ensure_compile_time_eval():
                    self.setup(jax.random.PRNGKey(0), args, kwargs)
            except _TRACER_ERRORS as e:  # data traced by an outer jit
                raise ModelError(
                    f"{type(self).__name__} must be set up on concrete data before it runs "
                    "under jax.jit: fit it first (NGVI(...).run) or call guide.setup(rng_key, "
                    "args, kwargs) outside the jitted function."
                ) from e
        return self.target

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
        target = target._replace(init_z=points[best])
        if self.warm_start and not target.has_subsample:
            target = self._warm_start(target, args, kwargs, jax.random.fold_in(rng_key, 11))
        self._target = target
        return self._target

    def _warm_start(self, target: Target, args, kwargs, rng_key: jax.Array) -> Target:
        """``target`` with the warm start's point and scale when its path ended at a mode of log p
        and found a better start than ``init_z`` with the guide's ``init_scale`` (8 fixed draws
        score both); the target as it is otherwise."""
        dynamic, spec = split_data(args, dict(kwargs or {}))
        key = jax.random.PRNGKey(0)  # the model's own randomness, fixed as in the start's score

        def log_density(z, dynamic):
            a, k = join_data(dynamic, spec)
            return target.log_density(z, a, k, key)

        eps = Guide.base_noise(self, rng_key, 8)
        z0 = jnp.asarray(target.init_z)
        path = warm_start(
            log_density,
            dynamic,
            z0,
            self.init_scale,
            eps,
            timing_runs=self._start_timing_runs,
            cache=self._start_programs.setdefault(("path", spec), {}),
        )
        self.start_path = path
        if path.at_mode and path.elbo > path.start_elbo:
            return target._replace(init_z=path.z, init_scale=path.scale)
        return target

    def _start_score(self, target: Target, args, kwargs) -> Callable:
        """A jitted ``(z0, eps) -> ELBO`` of the initial ``q`` centred at ``z0`` (compiled once
        per data spec, ``_start_programs``)."""
        dynamic, spec = split_data(args, dict(kwargs or {}))
        key = jax.random.PRNGKey(0)  # the model's own randomness (subsampling), fixed
        score = self._start_programs.get(("score", spec))
        if score is None:

            @jax.jit
            def score(z0, eps, dynamic):
                a, k = join_data(dynamic, spec)
                params = self.init_params(target._replace(init_z=z0))
                z = self.reparam(params, eps)
                logp = jax.vmap(lambda zi: target.log_density(zi, a, k, key))(z)
                return jnp.mean(logp) + self.entropy(params)

            self._start_programs["score", spec] = score
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
            return fast_random.normal(rng_key, (num_particles, d))
        half = fast_random.normal(rng_key, (num_particles // 2, d))
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

    def verify_fit(self, params: dict, data: tuple, rng_key: jax.Array) -> str | None:
        """Called by ``NGVI.run`` when a convergence check passes: why the family's own
        estimates cannot be trusted at ``params`` (the guide has warned, and may have changed
        how it steps, which ``step_variant`` then says), or ``None``; the engine refuses the
        convergence. ``data`` is ``(args, kwargs)``. The base family has nothing to verify."""
        return None

    def probe_metric(self, params: dict) -> dict:
        """The diagonal of the family's Fisher information in its parameters (a pytree like
        ``params``): the preconditioner of the Newton probe that a passed convergence check must
        survive (``ngvi.engine.probe``). Families without one are not probed (``probed``)."""
        raise NotImplementedError

    @property
    def probed(self) -> bool:
        """Whether ``NGVI.run`` probes a passed check with Newton steps (``probe_metric``)."""
        return type(self).probe_metric is not Guide.probe_metric

    @property
    def step_variant(self) -> Any:
        """A hashable naming how the family steps now, part of the key of the engine's compiled
        programs (``FullRankGaussian``: its resolved Hessian estimator); the base family has
        one way."""
        return None

    def average(self, avg: dict, params: dict, w) -> dict:
        """Move the reported iterate average a fraction ``w`` towards ``params``; guides whose
        params carry running statistics (not a distribution) may keep those out of it."""
        return jax.tree.map(lambda a, p: a + w * (p - a), avg, params)

    def flat_distribution(self, params: dict) -> dist.Distribution:
        raise NotImplementedError

    # -- NumPyro protocol --------------------------------------------------------------------
    # The guide's numpyro.param sites are named exactly as the keys of its params, so
    # result.params works with Predictive(params=...), handlers.substitute(data=...) and the
    # ELBOs' param_map; it has no parameter store, so without them it raises (never samples its
    # initial values). Each latent site is emitted with the model's batch and event dims.
    def _param_specs(self, target: Target, init: dict) -> dict:
        """Initial values (or shapes) and constraints of the guide's numpyro.param sites."""
        raise NotImplementedError

    def _layout_detail(self) -> str:
        """Family choices that change what the parameter arrays mean (none by default)."""
        return ""

    @property
    def layout(self) -> ParamLayout:
        """The guide family and the model's latent sites its parameters are laid out for."""
        sites = tuple((s.name, s.shape, str(s.support)) for s in self.target.sites)
        return ParamLayout(type(self).__name__, sites, self._layout_detail())

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{numpyro.param name: shape}`` of this guide's parameters on its model."""
        shapes = jax.eval_shape(lambda: self.init_params(self.target))
        return {k: tuple(v.shape) for k, v in shapes.items()}

    def check_params(self, params: Mapping) -> dict:
        """``params`` as a plain dict after checking they belong to this guide and model.

        ``LayoutError`` names both layouts when ``params`` (``GuideParams``, e.g.
        ``result.params``) were fitted for other latent sites or another family, even when every
        shape matches, and when a plain dict's keys or shapes differ. Keys written with the old
        ``ngvi_`` prefix are accepted."""
        if not isinstance(params, Mapping):
            raise ConfigError(
                f"params must be the dict of a fit (result.params), got {type(params).__name__}."
            )
        given = getattr(params, "layout", None)
        if given is not None and given != self.layout:
            raise layout_mismatch(given, self.layout)
        plain = {k.removeprefix("ngvi_"): v for k, v in params.items()}
        check_param_shapes(plain, self.param_shapes(), self.layout)
        return plain

    def numpyro_params(self, params: Mapping) -> GuideParams:
        """``params`` keyed by the guide's numpyro.param names (the same keys) and stamped with
        this guide's layout: what ``NGVI`` returns as ``result.params``."""
        return GuideParams(self.check_params(params), self.layout)

    def __call__(self, *args, **kwargs) -> dict:
        """Sample every latent site (constrained) as a NumPyro guide, with the parameters that a
        handler supplies (``Predictive(params=...)``, ``handlers.substitute(data=...)``, an ELBO's
        ``param_map``)."""
        self.ensure_setup(args, kwargs)
        return self._sample_sites(self._param_sites())

    def _param_sites(self) -> dict:
        """The parameters read from numpyro.param sites; raises when they are not supplied."""
        layout, shapes = self.layout, self.param_shapes()
        self._check_shadowing(shapes)
        given = layout_in_handlers()
        if given is not None and given != layout:
            raise layout_mismatch(given, layout)
        specs = self._param_specs(self.target, shapes)
        values = {k: numpyro.param(k, constraint=c) for k, (_, c) in specs.items()}
        missing = sorted(k for k, v in values.items() if v is None)
        if missing:
            raise ConfigError(
                f"{type(self).__name__} was run as a NumPyro guide without its parameters "
                f"{missing}: it keeps no parameter store and will not sample its initial values. "
                "Pass the fitted parameters: Predictive(model, guide=guide, "
                "params=result.params), handlers.substitute(guide, data=result.params), or "
                "Trace_ELBO().loss(key, result.params, model, guide, ...); fit it with "
                "ngvi.NGVI(model, guide).run (numpyro's SVI would start from no parameters)."
            )
        check_param_shapes(values, shapes, layout)
        return values

    def _check_shadowing(self, shapes: dict) -> None:
        """NumPyro substitutes params by name into the model too: a model site named like a
        parameter would receive it."""
        clash = sorted((n, r) for n, r in self.target.roles if n in shapes)
        if clash:
            raise ModelError(
                f"the model's site(s) {clash} have the names of {type(self).__name__}'s "
                f"parameters {sorted(shapes)}: NumPyro's handlers (Predictive, substitute) would "
                "put the parameter into the site. Rename the site, or draw with "
                "guide.sample_posterior(key, params, *args, sample_shape=(n,)) and pass the draws "
                "to Predictive(model, posterior_samples=draws)."
            )

    def _sample_sites(self, params: dict) -> dict:
        """Draw the flat latent vector (an auxiliary site) and emit each site as a Delta with the
        model's batch and event dims (as NumPyro's AutoContinuous does)."""
        z = numpyro.sample(_LATENT, self.flat_distribution(params), infer={"is_auxiliary": True})
        return self._emit_sites(self.target, z)

    def _emit_sites(self, target: Target, z: jax.Array) -> dict:
        """Site ``x = T(u)`` with log density ``-log|dT/du|`` summed over its event dims, so the
        auxiliary ``log q(z)`` plus the sites' terms is ``log q`` of the constrained values."""
        unc = target.unravel(z)
        out = {}
        for site in target.sites:
            t = biject_to(site.support)
            value = t(unc[site.name])
            batch_ndim = len(site.shape) - site.event_dim
            if numpyro.get_mask() is False:
                log_density = jnp.zeros(site.shape[:batch_ndim])
            else:
                log_det = t.log_abs_det_jacobian(unc[site.name], value)
                log_density = -sum_rightmost(log_det, jnp.ndim(log_det) - batch_ndim)
            fn = dist.Delta(value, log_density, event_dim=site.event_dim)
            out[site.name] = numpyro.sample(site.name, fn)
        return out

    # -- autoguide methods (NumPyro's names and signatures) ------------------------------------
    def _marginals(self, params: dict) -> tuple[jax.Array, jax.Array]:
        """Mean and standard deviation (d,) of each flat unconstrained coordinate under q."""
        raise NotImplementedError

    def get_posterior(self, params: Mapping) -> dist.Distribution:
        """q over the flat unconstrained latent vector, event shape ``(d,)`` (as NumPyro's
        ``AutoContinuous.get_posterior``); ``target.unravel`` splits a draw by site."""
        return self.flat_distribution(self.check_params(params))

    def sample_posterior(
        self, rng_key: jax.Array, params: Mapping, *args, sample_shape: tuple = (), **kwargs
    ) -> dict:
        """Constrained draws per latent site, shape ``sample_shape + site.shape``, and the
        model's deterministic sites at those draws (on ``*args, **kwargs``, else on the data the
        guide was set up with, as NumPyro's ``AutoNormal`` does)."""
        z = self.flat_distribution(self.check_params(params)).sample(rng_key, sample_shape)
        return self.with_deterministic(self.constrain(z), *args, **kwargs)

    def median(self, params: Mapping) -> dict:
        """Posterior median of every latent site, ``T(loc)`` (``T`` the site's bijection,
        monotone per coordinate), and the deterministic sites there, as ``AutoNormal.median``."""
        loc, _ = self._marginals(self.check_params(params))
        return self.with_deterministic(self.constrain(loc))

    def quantiles(self, params: Mapping, quantiles) -> dict:
        """Marginal posterior quantiles per site, shape ``(len(quantiles),) + site.shape``:
        ``T(loc + sd Phi^-1(q))`` per unconstrained coordinate (exact for elementwise
        bijections; for a simplex or other vector bijection the image of the coordinate
        quantiles, as NumPyro's autoguides). Deterministic sites are evaluated at those values
        (a plug-in, as ``AutoNormal.quantiles``; for their quantiles use ``sample_posterior``)."""
        q = check_quantiles(quantiles)
        loc, sd = self._marginals(self.check_params(params))
        u = dist.Normal(loc, sd).icdf(q.reshape((-1, 1)))
        return self.with_deterministic(self.constrain(u))

    def with_deterministic(self, values: dict, /, *args, **kwargs) -> dict:
        """``values`` (latent sites, any leading batch shape) plus the model's deterministic
        sites computed from them on ``*args, **kwargs`` (default: the setup data)."""
        target = self.target
        if not target.deterministic:
            return values
        if not (args or kwargs):
            args, kwargs = self._data
        site = target.sites[0]
        lead = jnp.shape(values[site.name])[: jnp.ndim(values[site.name]) - len(site.shape)]
        flat = {k: v.reshape((-1,) + v.shape[len(lead) :]) for k, v in values.items()}
        model = seed(target.model, jax.random.PRNGKey(0))  # subsample indices, as AutoNormal

        def one(v):
            tr = trace(substitute(model, data=v)).get_trace(*args, **kwargs)
            return {n: tr[n]["value"] for n in target.deterministic}

        det = jax.vmap(one)(flat)
        det = {k: v.reshape(lead + v.shape[1:]) for k, v in det.items()}
        return {**values, **det}

    def constrain(self, z: jax.Array, *args, **kwargs) -> dict:
        """Flat unconstrained samples (..., dim) to constrained values per latent site (with the
        model's args/kwargs, deterministic sites too)."""
        target = self.target
        if args or kwargs:
            return target.constrain(z, args, kwargs)
        lead = z.shape[:-1]
        flat = z.reshape((-1, target.dim))
        unc = jax.vmap(target.unravel)(flat)
        return {
            s.name: biject_to(s.support)(unc[s.name]).reshape(lead + s.shape) for s in target.sites
        }


class GuideDistribution(dist.Distribution):
    """q(z) on the flat latent vector as a NumPyro distribution, for a guide with ``reparam`` and
    ``log_prob_one(params, z)`` (the log density of one flat vector)."""

    support = dist.constraints.real_vector

    def __init__(self, guide: Guide, params: dict):
        self.guide, self.params = guide, params
        super().__init__(batch_shape=(), event_shape=(guide.target.dim,))

    def sample(self, key, sample_shape=()):
        d = self.guide.target.dim
        eps = jax.random.normal(key, (int(np.prod(sample_shape)), d))
        return self.guide.reparam(self.params, eps).reshape(tuple(sample_shape) + (d,))

    def log_prob(self, value):
        d = self.guide.target.dim
        flat = value.reshape((-1, d))
        lp = jax.vmap(lambda z: self.guide.log_prob_one(self.params, z))(flat)
        return lp.reshape(value.shape[:-1])


def check_quantiles(quantiles) -> jax.Array:
    """The requested quantiles as an array, each strictly between 0 and 1."""
    q = np.asarray(quantiles, dtype=float)
    if q.size == 0 or not np.all((q > 0) & (q < 1)):
        raise ConfigError(f"quantiles must lie strictly between 0 and 1, got {quantiles!r}.")
    return jnp.asarray(q, dtype=jnp.result_type(float))


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
