"""A NumPyro model and its data as a flat unconstrained log density, with the site layout.

``make_target(model, args, kwargs)`` checks the model and its data once, then returns a
``Target``: the ordered latent sites, their shapes and constraint transforms, and pure functions

    log_density(z, args, kwargs, rng_key) = log p(x, T(z)) + log |det dT/dz|(z)

on a flat unconstrained vector ``z`` of length ``dim``, and ``constrain(z, ...)`` back to a dict of
constrained values per site. Both are built on NumPyro's own machinery
(``numpyro.infer.util.potential_energy`` / ``constrain_fn``), so plates, ``scale`` and subsampled
plates (``numpyro.plate(..., subsample_size=m)``, which scales the likelihood by N/m) are honoured
exactly as NumPyro does it. Data are passed to these functions rather than closed over, so one
compiled step serves any data of the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.initialization import init_to_median, init_to_uniform
from numpyro.infer.util import constrain_fn, log_density

from ngvi.errors import DataError, ModelError
from ngvi.numerics.logspace import stable_potential_energy

__all__ = [
    "Site",
    "Target",
    "init_candidates",
    "make_target",
    "mixture_sites",
    "site_roles",
    "split_data",
    "join_data",
]


#: the NumPyro distributions that make a posterior multimodal by construction
MIXTURES = (dist.MixtureSameFamily, dist.MixtureGeneral)


class Site(NamedTuple):
    """One latent site: its place in the flat unconstrained vector and its constraint."""

    name: str
    shape: tuple[int, ...]  # constrained (event + batch) shape, as the model samples it
    unconstrained_shape: tuple[int, ...]
    support: Any  # numpyro constraint
    offset: int  # first index in the flat vector
    size: int  # number of unconstrained coordinates
    event_dim: int = 0  # the model's event_dim at this site (the rest of ``shape`` is batch)


class Target(NamedTuple):
    """The static layout of a model's latent space plus pure functions on flat vectors."""

    model: Callable
    sites: tuple[Site, ...]
    dim: int
    init_z: jax.Array  # (dim,) a point where the log density is finite
    unravel: Callable[[jax.Array], dict]
    has_subsample: bool
    signature: str  # names, shapes and supports of the sites: checks a guide against a model
    #: ``(name, role)`` of every named site of the model, role one of "latent", "observed",
    #: "deterministic", "param" (what a guide must not shadow, and which sites it replays)
    roles: tuple[tuple[str, str], ...] = ()
    #: names of the sample sites (latent or observed) whose distribution is a mixture
    #: (``MixtureSameFamily``, ``MixtureGeneral``): the posterior, and so the ELBO, has a local
    #: optimum per way of merging or emptying components (``NGVI`` then never claims convergence)
    mixtures: tuple[str, ...] = ()
    #: (dim,) the start's scale per coordinate (set by the quasi-Newton warm start from its
    #: Hessian approximation, ``ngvi.guides.warmstart``); None: the guide's own ``init_scale``
    init_scale: jax.Array | None = None

    @property
    def deterministic(self) -> tuple[str, ...]:
        """Names of the model's deterministic sites."""
        return tuple(n for n, r in self.roles if r == "deterministic")

    def log_density(self, z: jax.Array, args=(), kwargs=None, rng_key=None) -> jax.Array:
        """log p(x, T(z)) + log|J_T(z)| for one flat unconstrained z of shape (dim,)."""
        model = self.model if rng_key is None else seed(self.model, rng_key)
        return -stable_potential_energy(model, args, kwargs or {}, self.unravel(z))

    def constrain(self, z: jax.Array, args=(), kwargs=None, rng_key=None) -> dict:
        """Constrained values per site (deterministic sites included) for z of shape (..., dim)."""
        model = self.model if rng_key is None else seed(self.model, rng_key)
        lead = z.shape[:-1]
        flat = z.reshape((-1, self.dim))

        def one(zi):
            return constrain_fn(
                model, args, kwargs or {}, self.unravel(zi), return_deterministic=True
            )

        out = jax.vmap(one)(flat)
        return {k: v.reshape(lead + v.shape[1:]) for k, v in out.items()}

    def site_slices(self) -> dict[str, slice]:
        """Where each site lives in the flat vector."""
        return {s.name: slice(s.offset, s.offset + s.size) for s in self.sites}


def is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def split_data(args: tuple, kwargs: dict):
    """Arrays in (args, kwargs) become traced inputs; everything else is static (hashable)."""
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=lambda x: x is None)
    dynamic = [x if is_array(x) else None for x in leaves]
    static = tuple(None if is_array(x) else x for x in leaves)
    return dynamic, (treedef, static)


def join_data(dynamic, spec):
    treedef, static = spec
    leaves = [d if s is None and d is not None else s for d, s in zip(dynamic, static)]
    return jax.tree.unflatten(treedef, leaves)


def _trace_model(model, args, kwargs, rng_key):
    """Trace the model once with every latent site at a valid point (improper sites included)."""
    traced = substitute(seed(model, rng_key), substitute_fn=init_to_uniform)
    try:
        return trace(traced).get_trace(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise invalid_parameter(model, args, kwargs, rng_key, e) or model_failed(e) from e


def model_failed(e: Exception) -> DataError:
    """The error for a model that raised on its data (wrong arguments, shapes that do not
    broadcast with its plates)."""
    return DataError(
        f"the model failed on its data: {e}. Check that the args/kwargs match the model's "
        "signature and that the data shapes broadcast with the model's plates."
    )


def invalid_parameter(model, args, kwargs, rng_key, error: Exception) -> ModelError | None:
    """The error naming the site, the parameter and its value when NumPyro's argument validation
    raised ``error`` (e.g. "Normal distribution got invalid scale parameter", which names
    neither); ``None`` when no site has an invalid parameter (another failure).

    The model is traced again with validation off (``numpyro.validation_enabled(False)``) and
    each sample site's parameters are checked against their ``arg_constraints``."""
    try:
        with numpyro.validation_enabled(False):
            traced = substitute(seed(model, rng_key), substitute_fn=init_to_uniform)
            tr = trace(traced).get_trace(*args, **kwargs)
    except Exception:  # the model fails for another reason too: keep the original error
        return None
    for site in tr.values():
        bad = _bad_parameter(_base_dist(site["fn"])) if site["type"] == "sample" else None
        if bad is None:
            continue
        fn_name, param, value, idx, constraint = bad
        where = f" at index {idx}" if idx else ""
        positive = isinstance(constraint, type(dist.constraints.positive))
        example = " (e.g. jax.nn.softplus(x) + 1e-6, or a HalfNormal prior)" if positive else ""
        return ModelError(
            f"site '{site['name']}': its {fn_name} distribution got {param} = {value}{where}, "
            f"outside the parameter's constraint {constraint} ({error}). Give it a {param} "
            f"inside {constraint}; when {param} is computed from data or a latent value, map "
            f"it into that set{example}."
        )
    return None


def _bad_parameter(fn) -> tuple | None:
    """``(distribution, parameter, value, index, constraint)`` of the first parameter of ``fn``
    outside its ``arg_constraints`` (the value as text), else ``None``."""
    for param, value in fn.get_args().items():
        constraint = fn.arg_constraints[param]
        if dist.constraints.is_dependent(constraint):
            continue
        ok = np.asarray(constraint(value))
        if ok.all():
            continue
        idx = tuple(int(i) for i in np.argwhere(~ok)[0]) if ok.ndim else ()
        v = np.asarray(value)[idx]
        text = repr(v.item()) if v.ndim == 0 else np.array2string(v, separator=", ")
        return type(fn).__name__, param, text.replace("\n", ""), idx, constraint
    return None


class ObservedFacts(NamedTuple):
    """What the observed-data checks need of a site's distribution (static: no arrays)."""

    shape: tuple  # batch + event shape
    batch_shape: tuple
    event_shape: tuple
    dist_name: str
    support: str  # the support's repr, for the message


def observed_facts(site) -> tuple[ObservedFacts, Any]:
    """``(facts, in_support)`` of an observed site: static shape facts and the boolean array
    ``support(value)`` (``None`` without a support). Traceable, so a jitted trace of the model
    (``ngvi.nn.fast_target``) can return it for ``check_observed``."""
    fn = site["fn"]
    support = getattr(fn, "support", None)
    shapes = (tuple(fn.shape()), tuple(fn.batch_shape), tuple(fn.event_shape))
    facts = ObservedFacts(*shapes, _dist_name(fn), f"{support}")
    return facts, None if support is None else support(jnp.asarray(site["value"]))


def _check_observed(site) -> None:
    """Observed values must be finite and inside the likelihood's support."""
    facts, ok = observed_facts(site)
    check_observed(site["name"], site["value"], ok, facts)


def check_observed(name: str, value, in_support, facts: ObservedFacts) -> None:
    """Raise ``DataError`` naming the site, the index and the value for a non-finite
    observation, data whose shape does not match its distribution, or a value outside the
    support (``in_support``: ``support(value)``, ``None`` to skip)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value, in_support = _global_observed(value, in_support)
        if value is None:
            return
    arr = np.asarray(value)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = arr[~np.isfinite(arr)].ravel()[0]
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise DataError(
            f"observed site '{name}' holds a non-finite value ({bad}) at index {idx}: "
            "drop or impute missing observations before fitting."
        )
    _check_observed_shape(name, arr.shape, facts)
    if in_support is None:
        return
    ok = np.asarray(in_support)
    if not np.all(ok):
        pos = np.argwhere(~np.broadcast_to(ok, ok.shape))
        idx = tuple(int(i) for i in pos[0]) if pos.size else ()
        bad = np.broadcast_to(arr, ok.shape)[idx] if arr.ndim else arr
        raise DataError(
            f"observed site '{name}' has value {bad} at index {idx} outside the support of its "
            f"{facts.dist_name} likelihood ({facts.support}): fix the data or choose a "
            "likelihood whose support contains it."
        )


def _global_observed(value: jax.Array, in_support):
    """Data spread over several processes (``jax.make_array_from_process_local_data``): check
    them on their devices; only when a check fails, gather them (and ``in_support``) to report
    the bad entry. ``(None, None)`` when they pass."""
    ok = jnp.all(jnp.isfinite(value)) if jnp.issubdtype(value.dtype, jnp.floating) else True
    if in_support is not None:
        ok = ok & jnp.all(in_support)
    if bool(ok):
        return None, None
    from jax.experimental import multihost_utils

    gather = lambda x: None if x is None else multihost_utils.process_allgather(x, tiled=True)
    return gather(value), gather(in_support)


def _base_dist(fn):
    """The distribution under the plate/to_event/mask wrappers."""
    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _dist_name(fn) -> str:
    """The distribution's name under the plate/to_event/mask wrappers."""
    return type(_base_dist(fn)).__name__


def _check_observed_shape(name: str, shape: tuple, facts: ObservedFacts) -> None:
    """The data must have the distribution's shape or extend it on the left: a distribution
    larger than its data would score every observation several times."""
    model_shape = facts.shape
    hint = (
        f"observed site '{name}' has data of shape {shape} but its {facts.dist_name} "
        f"distribution has shape {model_shape} (batch {facts.batch_shape} + event "
        f"{facts.event_shape})"
    )
    try:
        full = tuple(np.broadcast_shapes(shape, model_shape))
    except ValueError:
        raise DataError(
            f"{hint}, which do not broadcast: pass data of shape {model_shape}, or size the "
            "plate from the data (numpyro.plate('n', len(y)))."
        ) from None
    if full != tuple(shape):
        raise DataError(
            f"{hint}: the log likelihood would broadcast to {full} and count each observation "
            f"{math.prod(full) // max(math.prod(shape), 1)} times. Reshape the data to "
            f"{model_shape} or the distribution's parameters to the data's shape."
        )


def _check_latent(site) -> None:
    name, fn = site["name"], site["fn"]
    if fn.support.is_discrete or getattr(fn, "is_discrete", False):
        raise ModelError(
            f"latent site '{name}' is discrete ({type(fn).__name__}, support {fn.support}): ngvi "
            "fits continuous latent variables (it does not enumerate discrete sites). Marginalize "
            "it out of the model (dist.MixtureSameFamily, or numpyro.factor with a logsumexp "
            "over its values) and fit with ngvi.NGVI, or observe it. For a mixture of an array X "
            "(N, D) rather than a model, ngvi.em fits it directly: ngvi.em.fit_gmm(X, K, "
            "num_iters) (Gaussian, EM), ngvi.em.fit_cavi_gmm(X, K, num_iters) (Bayesian GMM, "
            "VB), ngvi.em.fit_bernoulli_mixture(X, K, num_iters) (binary X)."
        )


def _latent_sites(tr) -> list:
    out = []
    for site in tr.values():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            _check_observed(site)
        elif not site.get("infer", {}).get("is_auxiliary", False):
            _check_latent(site)
            out.append(site)
    return out


def _improper_without_likelihood(model, args, kwargs, z0, unravel, sites, rng_key) -> None:
    """An ImproperUniform site that no observed site depends on makes the posterior improper."""
    improper = [s for s in sites if isinstance(s["fn"], dist.ImproperUniform)]
    if not improper:
        return

    dynamic, spec = split_data(args, kwargs)

    @jax.jit  # one compile, not an op-by-op gradient of the whole model
    def loglik_grad(z, dynamic):
        a, k = join_data(dynamic, spec)

        def loglik(z):
            params = constrain_fn(seed(model, rng_key), a, k, unravel(z))
            _, tr = log_density(seed(model, rng_key), a, k, params)
            terms = [
                jnp.sum(s["fn"].log_prob(s["value"]))
                for s in tr.values()
                if s["type"] == "sample" and s["is_observed"]
            ]
            return sum(terms) if terms else jnp.zeros(())

        return jax.grad(loglik)(z)

    g = unravel(loglik_grad(z0 + 0.1, dynamic))
    for s in improper:
        if not np.any(np.asarray(g[s["name"]]) != 0):
            raise ModelError(
                f"latent site '{s['name']}' has an improper prior ({type(s['fn']).__name__}) "
                "and no observed site depends on it, so its posterior is improper: give it a "
                "proper prior or condition it on data."
            )


def make_target(
    model: Callable,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    rng_key: jax.Array | None = None,
    init_strategy: Callable | None = None,
) -> Target:
    """Check ``model(*args, **kwargs)`` and lay out its latent sites as one flat vector.

    Raises ``ModelError`` for a discrete latent site, an improper posterior, no latent site or a
    log density that is not finite at any initial point, and ``DataError`` for non-finite or
    out-of-support observations; every message names the site.
    """
    kwargs = dict(kwargs or {})
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    init_strategy = init_strategy or init_to_median(num_samples=15)
    tr = _trace_model(model, args, kwargs, rng_key)
    latent = _latent_sites(tr)
    if not latent:
        raise ModelError(
            "the model has no latent sample site: every numpyro.sample is observed, so there is "
            "no posterior to fit. Remove obs= from the sites you want to infer."
        )
    has_subsample = any(
        s["type"] == "plate" and s["args"][1] is not None and s["args"][1] != s["args"][0]
        for s in tr.values()
    )
    unc = {s["name"]: biject_to(s["fn"].support).inv(s["value"]) for s in latent}
    z_proto, unravel = ravel_pytree(unc)
    z0 = _find_init(model, args, kwargs, latent, unravel, rng_key, init_strategy)
    _improper_without_likelihood(model, args, kwargs, z0, unravel, latent, rng_key)
    sites, offset = [], 0
    for s in sorted(latent, key=lambda s: s["name"]):  # ravel_pytree orders dict keys by name
        ushape = tuple(jnp.shape(unc[s["name"]]))
        size = int(math.prod(ushape))
        shape, event_dim = tuple(jnp.shape(s["value"])), int(s["fn"].event_dim)
        sites.append(Site(s["name"], shape, ushape, s["fn"].support, offset, size, event_dim))
        offset += size
    signature = ";".join(f"{s.name}{s.shape}{s.support}" for s in sites)
    return Target(
        model,
        tuple(sites),
        int(z_proto.size),
        z0,
        unravel,
        has_subsample,
        signature,
        site_roles(tr),
        mixture_sites(tr),
    )


def site_roles(tr) -> tuple[tuple[str, str], ...]:
    """``(name, role)`` of every sample, deterministic and param site of a model trace."""
    roles = []
    for name, site in tr.items():
        if site["type"] == "sample" and not site.get("infer", {}).get("is_auxiliary", False):
            roles.append((name, "observed" if site["is_observed"] else "latent"))
        elif site["type"] in ("deterministic", "param"):
            roles.append((name, site["type"]))
    return tuple(roles)


def mixture_sites(tr) -> tuple[str, ...]:
    """Names of the sample sites of a model trace whose distribution, under any wrappers
    (``to_event``, ``mask``, ``expand``, transforms), is a NumPyro mixture."""
    names = []
    for name, site in tr.items():
        if site["type"] != "sample" or site.get("infer", {}).get("is_auxiliary", False):
            continue
        fn = site["fn"]
        while not isinstance(fn, MIXTURES) and hasattr(fn, "base_dist"):
            fn = fn.base_dist
        if isinstance(fn, MIXTURES):
            names.append(name)
    return tuple(names)


def _find_init(model, args, kwargs, latent, unravel, rng_key, init_strategy, tries: int = 20):
    """A flat unconstrained point with a finite log density and gradient, else a ModelError
    naming the sites whose log probability is not finite."""
    for i in range(tries):
        key = jax.random.fold_in(rng_key, i)
        strategy = init_strategy if i == 0 else init_to_uniform(radius=2.0)
        tr = trace(substitute(seed(model, key), substitute_fn=strategy)).get_trace(*args, **kwargs)
        unc = {s["name"]: biject_to(s["fn"].support).inv(tr[s["name"]]["value"]) for s in latent}
        z, _ = ravel_pytree(unc)

        pe, g = _potential_and_grad(model, args, kwargs, unravel, key, z)
        if np.isfinite(pe) and np.all(np.isfinite(g)):
            return z
    bad = _nonfinite_sites(tr)
    raise ModelError(
        f"the model's log density is not finite at any of {tries} initial points; the log "
        f"probability of site(s) {bad} is -inf or NaN there. Check the parameters of these sites "
        "(e.g. a scale that can be zero or negative) and that the data lie in their support."
    )


def init_candidates(
    target: Target, args: tuple, kwargs: dict | None, strategies, rng_key: jax.Array
) -> list[jax.Array | None]:
    """Flat unconstrained points (dim,), one per NumPyro init strategy (``init_to_median``,
    ``init_to_uniform``, ...), from one trace of the model each; ``None`` for a strategy that
    raises or gives a non-finite point (the caller scores the others)."""
    out = []
    for i, strategy in enumerate(strategies):
        key = jax.random.fold_in(rng_key, i)
        model = substitute(seed(target.model, key), substitute_fn=strategy)
        try:
            tr = trace(model).get_trace(*args, **(kwargs or {}))
            parts = [
                jnp.reshape(biject_to(s.support).inv(tr[s.name]["value"]), (-1,))
                for s in target.sites  # sorted by name: the flat layout's order
            ]
        except (TypeError, ValueError, KeyError, NotImplementedError):
            out.append(None)
            continue
        z = jnp.concatenate(parts).astype(jnp.result_type(float))
        ok = z.shape == (target.dim,) and bool(jnp.all(jnp.isfinite(z)))
        out.append(z if ok else None)
    return out


def _potential_and_grad(model, args, kwargs, unravel, key, z):
    """Potential energy and its gradient, compiled once (data as traced inputs, not constants)."""
    dynamic, spec = split_data(args, kwargs)

    @jax.jit
    def f(z, dynamic, key):
        a, k = join_data(dynamic, spec)
        energy = lambda z: stable_potential_energy(seed(model, key), a, k, unravel(z))
        return jax.value_and_grad(energy)(z)

    return f(z, dynamic, key)


def _nonfinite_sites(tr) -> list[str]:
    bad = []
    for s in tr.values():
        if s["type"] == "sample":
            lp = s["fn"].log_prob(s["value"])
            if not np.all(np.isfinite(np.asarray(lp))):
                bad.append(s["name"])
    return bad or ["<unknown>"]
