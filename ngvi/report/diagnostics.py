"""Know whether a fit can be trusted: ArviZ conversion and the PSIS k-hat diagnostic.

``to_inference_data`` turns a fitted guide into an ``arviz.InferenceData`` (posterior draws named
by site with plate dims, the ELBO trace, pointwise log-likelihood, posterior predictive and the
observed data), so ``az.summary``, ``az.plot_posterior``, ``az.loo`` and ``az.compare`` work
unchanged. ``psis_diagnostic`` computes Pareto-smoothed importance sampling of the posterior
against the guide (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?: Evaluating
variational inference", ICML) and reads its Pareto k-hat: below 0.5 the approximation is close,
between 0.5 and 0.7 it is usable with PSIS correction, above 0.7 it is unreliable.

Both accept any NumPyro guide with ``sample_posterior`` (ngvi guides, and NumPyro autoguides such
as ``AutoNormal`` with their SVI params), so NGVI and ADVI are diagnosed the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import log_density

from ngvi.errors import ConfigError, DataError, ModelError
from ngvi.guides.base import Guide
from ngvi.model.target import join_data as _join_data
from ngvi.model.target import split_data as _split_data

__all__ = [
    "ModelLayout",
    "PSISResult",
    "TRACE_GROUP",
    "khat_message",
    "khat_verdict",
    "model_layout",
    "psis_diagnostic",
    "psis_khat",
    "to_inference_data",
]

#: Pareto k-hat thresholds of Yao et al. (2018) and Vehtari et al. (2024, "Pareto smoothed
#: importance sampling", JMLR): below GOOD the fit is close, above BAD it cannot be trusted.
KHAT_GOOD, KHAT_BAD = 0.5, 0.7
_MIN_DRAWS = 30  # ArviZ's Pareto tail needs > 4 points: min(n/5, 3 sqrt(n)) > 4 from n ~ 25


# -- model layout: site roles, plate dims and coords ---------------------------------------------
class ModelLayout(NamedTuple):
    """Roles and ArviZ dims of a model's sites, read from one trace of the model."""

    latent: tuple[str, ...]
    deterministic: tuple[str, ...]
    observed: tuple[str, ...]
    dims: dict[str, list[str]]  # site -> one dim name per axis of its value
    coords: dict[str, np.ndarray]  # plate name -> arange(size)
    event_dims: dict[str, int]  # sample site -> event_dim of its distribution
    observed_values: dict[str, np.ndarray]


def _site_dims(name: str, shape: tuple, event_dim: int, stack) -> list[str]:
    """One dim name per axis: the plate's name where a plate of matching size owns the axis
    (plate dim ``-k`` counts from the right of the batch shape), else ``{name}_dim_{i}``."""
    dims = [f"{name}_dim_{i}" for i in range(len(shape))]
    batch_ndim = len(shape) - event_dim
    for frame in stack:
        axis = batch_ndim + frame.dim
        if 0 <= axis < batch_ndim and shape[axis] == frame.size:
            dims[axis] = frame.name
    return dims


def model_layout(
    model: Callable, args: tuple = (), kwargs: dict | None = None, rng_key=None
) -> ModelLayout:
    """Trace ``model(*args, **kwargs)`` once and read each site's role, plates (its
    ``cond_indep_stack``) and, for observed sites, the data."""
    kwargs = dict(kwargs or {})
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    tr = trace(substitute(seed(model, key), substitute_fn=init_to_uniform)).get_trace(
        *args, **kwargs
    )
    latent, det, obs = [], [], []
    dims, coords, event_dims, values = {}, {}, {}, {}
    for name, site in tr.items():
        if site["type"] == "sample":
            if site.get("infer", {}).get("is_auxiliary", False):
                continue
            (obs if site["is_observed"] else latent).append(name)
            event_dims[name] = int(site["fn"].event_dim)
        elif site["type"] != "deterministic":
            continue
        else:
            det.append(name)
        shape = tuple(jnp.shape(site["value"]))
        stack = site.get("cond_indep_stack", [])
        dims[name] = _site_dims(name, shape, event_dims.get(name, 0), stack)
        coords.update({f.name: np.arange(f.size) for f in stack if f.name in dims[name]})
        if site["type"] == "sample" and site["is_observed"]:
            values[name] = np.asarray(site["value"])
    return ModelLayout(tuple(latent), tuple(det), tuple(obs), dims, coords, event_dims, values)


def _replay_draws(
    model, args, kwargs, layout: ModelLayout, latent: dict, rng_key, simulate: bool = True
) -> tuple:
    """Run the model once per posterior draw with the latent sites fixed; returns
    (deterministic values, pointwise log-likelihood, posterior-predictive draws), each a dict of
    arrays with a leading draw axis.

    The log-likelihood is ``site.fn.log_prob(obs)`` unscaled, as ``numpyro.infer.log_likelihood``
    computes it; the predictive draw is ``site.fn.sample`` with the latent draw substituted, so no
    observation has to be removed from the model's arguments (an observed site whose
    distribution depends on another observed site is simulated one step ahead). An observed site
    NumPyro cannot simulate (e.g. a ``Binomial`` whose ``total_count`` is a float array) is left
    out of the predictive with a warning naming it; ``simulate=False`` skips the predictive."""
    dynamic, spec = _split_data(args, kwargs)
    wanted = layout.observed if simulate else ()

    def run(sims: tuple):
        sites = (layout.deterministic, layout.observed, sims)
        return _replay_jit(model, sites, spec, latent, rng_key, dynamic)

    try:
        return run(wanted)
    except Exception:
        failed = _unsimulable(run, wanted)
        if not failed:
            raise  # not the simulation: the model itself fails on these draws
    detail = "; ".join(f"'{s}': {type(e).__name__}: {e}" for s, e in failed.items())
    warnings.warn(
        f"posterior_predictive leaves out observed site(s) {list(failed)}: NumPyro cannot "
        f"simulate them ({detail}). Their log-likelihood is kept (az.loo works). To simulate, "
        "give the distribution the parameter types its sampler needs (e.g. an integer "
        "total_count); pass posterior_predictive=False to skip the group without this warning.",
        UserWarning,
        stacklevel=3,
    )
    return run(tuple(s for s in wanted if s not in failed))


def _unsimulable(run: Callable, sites: tuple) -> dict:
    """``{site: error}`` of the observed sites whose simulation fails when traced alone (a
    trace by ``jax.eval_shape``: nothing is compiled or run); empty when the replay fails
    without simulating anything (the failure is elsewhere)."""
    try:
        jax.eval_shape(partial(run, ()))
    except Exception:
        return {}
    failed = {}
    for s in sites:
        try:
            jax.eval_shape(partial(run, (s,)))
        except Exception as e:  # the sampler's own error, reported in the warning
            failed[s] = e
    return failed


@partial(jax.jit, static_argnums=(0, 1, 2))
def _replay_jit(model, sites, spec, latent, rng_key, dynamic):
    args, kwargs = _join_data(dynamic, spec)
    deterministic, observed, simulate = sites
    n = next(iter(latent.values())).shape[0]

    def one(values, key):
        tr = trace(substitute(seed(model, key), data=values)).get_trace(*args, **kwargs)
        det = {s: tr[s]["value"] for s in deterministic}
        ll = {s: tr[s]["fn"].log_prob(tr[s]["value"]) for s in observed}
        keys = jax.random.split(jax.random.fold_in(key, 1), max(len(observed), 1))
        pp = {s: tr[s]["fn"].sample(k) for s, k in zip(observed, keys) if s in simulate}
        return det, ll, pp

    return jax.vmap(one)(latent, jax.random.split(rng_key, n))


@partial(jax.jit, static_argnums=(0, 1, 2))
def _sample_jit(guide, num_samples, spec, params, rng_key, dynamic):
    args, kwargs = _join_data(dynamic, spec)
    return guide.sample_posterior(rng_key, params, *args, sample_shape=(num_samples,), **kwargs)


# -- InferenceData ---------------------------------------------------------------------------
def _chain(samples: Mapping) -> dict:
    """(draw, ...) arrays -> numpy (1, draw, ...): one chain, as ArviZ expects."""
    return {k: np.asarray(v)[None] for k, v in samples.items()}


def _attr(value: Any) -> Any:
    """netCDF-safe attribute: numbers and strings as they are, everything else as its repr."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    return repr(value)


#: The custom InferenceData group holding the optimization trace (ELBO per step). It is not in
#: ArviZ's schema, so ArviZ's tools (summary, plot_trace, loo, compare), which read the
#: chain/draw groups, never meet its ``step`` dim.
TRACE_GROUP = "vi_trace"


def _vi_trace(losses, method: str) -> xr.Dataset:
    """The ELBO trace ``-losses`` over a ``step`` dim."""
    elbo = -np.asarray(losses, dtype=float).reshape(-1)
    return xr.Dataset(
        {"elbo": ("step", elbo)}, coords={"step": np.arange(elbo.size)}, attrs={"method": method}
    )


def _psis_attrs(guide, params, args, kwargs, num_samples: int, rng_key) -> dict:
    """The PSIS k-hat of the fit as netCDF-safe attributes (``psis_diagnostic`` on
    ``max(num_samples, 30)`` fresh draws); a warning and ``psis_khat = nan`` when the log ratios
    cannot be formed (NaN densities)."""
    n = max(int(num_samples), _MIN_DRAWS)
    try:
        res = psis_diagnostic(guide, params, *args, num_samples=n, rng_key=rng_key, **kwargs)
    except DataError as e:
        warnings.warn(f"PSIS k-hat not computed: {e}", UserWarning, stacklevel=3)
        return {"psis_khat": math.nan, "psis_verdict": "failed", "psis_message": str(e)}
    return {
        "psis_khat": res.khat,
        "psis_verdict": khat_verdict(res.khat),
        "psis_message": res.message,
        "psis_ess": res.ess,
        "psis_num_samples": n,
    }


def to_inference_data(
    guide,
    params,
    *args,
    num_samples: int = 1000,
    rng_key: jax.Array | None = None,
    losses=None,
    settings: Mapping | None = None,
    posterior_predictive: bool = True,
    psis: bool = True,
    **kwargs,
) -> az.InferenceData:
    """An ``arviz.InferenceData`` of a fitted guide on the model's data ``(*args, **kwargs)``.

    Groups: ``posterior`` (``num_samples`` constrained draws of every latent and deterministic
    site, one chain, dims named after the model's plates), and where the model observes data
    ``log_likelihood`` (pointwise ``log p(y_i | theta_s)``, for ``az.loo`` / ``az.compare``),
    ``posterior_predictive`` and ``observed_data``; with ``losses`` the custom group
    ``vi_trace`` holds the ELBO trace ``-losses`` over dim ``step`` (outside ArviZ's chain/draw
    groups, so ``az.summary`` on every chain/draw group works).

    ``posterior.attrs`` hold the method (the guide's class), ``settings`` and, with ``psis``,
    the fit's PSIS k-hat (``psis_khat``, ``psis_verdict``: exact / good / ok / unreliable,
    ``psis_message``, ``psis_ess``; see ``psis_diagnostic``). ``posterior_predictive=False``
    skips the simulation; a site NumPyro cannot simulate is left out with a warning.

    ``guide`` is an ngvi guide or any NumPyro guide with ``sample_posterior`` (e.g. ADVI's
    ``AutoNormal`` with its SVI params).
    """
    if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 2):
        raise ConfigError(f"num_samples must be an integer >= 2, got {num_samples!r}.")
    if not hasattr(guide, "sample_posterior"):
        raise ConfigError(f"guide must have sample_posterior, got {type(guide).__name__}.")
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    k_layout, k_post, k_rep = jax.random.split(key, 3)
    layout = model_layout(guide.model, args, kwargs, k_layout)
    dynamic, spec = _split_data(args, kwargs)
    draws = _sample_jit(guide, int(num_samples), spec, params, k_post, dynamic)
    missing = [s for s in layout.latent if s not in draws]
    if missing:
        raise ModelError(f"the guide gave no draws of latent site(s) {missing} of the model.")
    latent = {s: jnp.asarray(draws[s]) for s in layout.latent}
    det, ll, pp = _replay_draws(
        guide.model, args, kwargs, layout, latent, k_rep, simulate=posterior_predictive
    )
    method = type(guide).__name__
    attrs = {"method": method, **{k: _attr(v) for k, v in (settings or {}).items()}}
    if psis:  # fold_in: the posterior draws stay those of the same rng_key without PSIS
        k_psis = jax.random.fold_in(key, 3)
        attrs.update(_psis_attrs(guide, params, args, kwargs, num_samples, k_psis))
    dims = layout.dims
    ll_dims = {s: dims[s][: len(dims[s]) - layout.event_dims[s]] for s in layout.observed}
    idata = az.from_dict(
        posterior=_chain({**latent, **det}),
        log_likelihood=_chain(ll) or None,
        posterior_predictive=_chain(pp) or None,
        observed_data=layout.observed_values or None,
        coords=layout.coords,
        dims=dims,
        posterior_attrs=attrs,
    )
    if ll:  # log-likelihood dims drop the event axes of multivariate likelihoods
        idata.log_likelihood = az.dict_to_dataset(
            _chain(ll), coords=layout.coords, dims=ll_dims, library=None
        )
    if losses is not None:
        idata.add_groups({TRACE_GROUP: _vi_trace(losses, method)})
    return idata


# -- PSIS k-hat ------------------------------------------------------------------------------
class PSISResult(NamedTuple):
    """What PSIS says about a fit (Yao et al. 2018)."""

    khat: float  # Pareto shape of the importance-ratio tail; -inf for an exact fit
    log_ratios: np.ndarray  # (num_samples,) log p(x, z) - log q(z) on draws z ~ q
    ess: float  # PSIS effective sample size 1 / sum w_i^2 (normalized smoothed weights)
    message: str  # the verdict with the 0.5 / 0.7 thresholds explained
    corrected_means: dict | None  # PSIS-weighted posterior means per site (if asked)


def _check_log_ratios(log_ratios) -> np.ndarray:
    lr = np.asarray(log_ratios, dtype=np.float64).reshape(-1)
    if np.isnan(lr).any():
        bad = np.flatnonzero(np.isnan(lr))
        raise DataError(
            f"log ratios contain NaN at {bad.size} of {lr.size} draws (first at index {bad[0]}): "
            "the model's log density or the guide's log density is NaN there. Check the model "
            "at those draws (e.g. a scale that underflows) or fit in float64."
        )
    if np.isposinf(lr).any():
        raise DataError(
            "log ratios contain +inf: the guide puts (numerically) zero density on a draw it "
            "made. Fit in float64 or check the guide's scale."
        )
    if lr.size < _MIN_DRAWS:
        raise DataError(
            f"PSIS needs at least {_MIN_DRAWS} log ratios to fit the Pareto tail, got {lr.size}."
        )
    return lr


def _is_constant(lr: np.ndarray) -> bool:
    """All ratios equal up to float32 rounding of the log densities (an exact fit)."""
    finite = np.isfinite(lr).all()
    return bool(
        finite and np.ptp(lr) <= 1e3 * np.finfo(np.float32).eps * max(1.0, np.abs(lr).max())
    )


def _smooth(lr: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed normalized log weights and k-hat, by ArviZ's ``psislw``."""
    if _is_constant(lr):
        return np.full(lr.shape, -math.log(lr.size)), -math.inf
    with warnings.catch_warnings():  # the verdict goes into our own message
        warnings.simplefilter("ignore")
        lw, khat = az.psislw(lr)
    return np.asarray(lw), float(khat)


def psis_khat(log_ratios) -> float:
    """Pareto k-hat of importance ratios ``r_s = p(x, z_s) / q(z_s)``, ``z_s ~ q``, given
    ``log r_s`` (Vehtari, Simpson, Gelman, Yao & Gabry 2024, via ``arviz.psislw``).

    The ratio tail ``P(r > t) ~ t^(-1/k)`` has finite variance iff k < 1/2. Constant ratios
    (q equals the posterior) give ``-inf``: bounded ratios have negative k, and constant ones
    are its limit. NaN or +inf ratios and fewer than 30 draws raise ``DataError``.

    Sign convention: q = N(0, 0.5^2) against p = N(0, 1) gives ``r = exp(3 z^2 / 2)`` times a
    constant, with z^2 = chi2_1 / 4, so ``P(r > t) ~ t^(-4/3)``: k = 3/4 exactly (in general
    ``k = 1 - sigma_q^2 / sigma_p^2``); finite-sample estimates come out near 0.7.
    """
    return _smooth(_check_log_ratios(log_ratios))[1]


def khat_verdict(khat: float) -> str:
    """One word for a k-hat (Yao et al. 2018): ``exact`` (-inf), ``good`` (< 0.5), ``ok``
    (0.5-0.7: usable with PSIS correction), ``unreliable`` (> 0.7), ``failed`` (NaN)."""
    if math.isnan(khat):
        return "failed"
    if khat == -math.inf:
        return "exact"
    return "good" if khat < KHAT_GOOD else ("ok" if khat < KHAT_BAD else "unreliable")


def khat_message(khat: float, ess: float | None = None) -> str:
    """The verdict of Yao et al. (2018) for a k-hat value."""
    ess_txt = "" if ess is None else f", PSIS ESS {ess:.0f}"
    if khat == -math.inf:
        return (
            "exact: the importance ratios p/q are constant, so the guide matches the posterior "
            f"(k-hat = -inf{ess_txt})."
        )
    head = f"k-hat = {khat:.2f}{ess_txt}: "
    if khat < KHAT_GOOD:
        return head + (
            "good (< 0.5): the ratios p/q have a light tail, the guide is close to the "
            "posterior and its estimates can be trusted."
        )
    if khat < KHAT_BAD:
        return head + (
            "ok (0.5-0.7): the guide is usable but not exact; PSIS-corrected estimates "
            "(corrected_means=True) are reliable, plain VI estimates may be biased."
        )
    return head + (
        "unreliable (> 0.7): the ratios p/q are heavy-tailed, the guide misses posterior mass "
        "(too narrow, or missing correlation); neither VI nor PSIS-corrected estimates can be "
        "trusted. Use a richer guide (full-rank) or NUTS."
    )


def _flat_log_ratios(guide: Guide, params, key, n: int, args, kwargs) -> tuple:
    """ngvi guide: ``log p(x, T(z)) + log|J_T(z)| - log q(z)`` on z ~ q in the flat
    unconstrained space (``Target.log_density`` includes the Jacobian), and the constrained
    draws."""
    params = {k.removeprefix("ngvi_"): v for k, v in params.items()}
    q = guide.flat_distribution(params)
    z = q.sample(key, (n,))
    target = guide.target
    log_p = jax.vmap(lambda zi: target.log_density(zi, args, kwargs))(z)
    return log_p - q.log_prob(z), guide.constrain(z, *args, **kwargs)


def _trace_log_ratios(guide, params, key, n: int, args, kwargs) -> tuple:
    """Any NumPyro guide: ``log p(x, theta) - log q(theta)`` from traces of the guide (with its
    params) and of the model replayed on the guide's draws (the Trace_ELBO particle)."""

    def one(k):
        log_q, g_tr = log_density(seed(guide, k), args, kwargs, params)
        log_p, m_tr = log_density(replay(guide.model, g_tr), args, kwargs, {})
        latent = {
            s: site["value"]
            for s, site in m_tr.items()
            if site["type"] == "sample" and not site["is_observed"]
        }
        return log_p - log_q, latent

    return jax.vmap(one)(jax.random.split(key, n))


@partial(jax.jit, static_argnums=(0, 1, 2))
def _log_ratios_jit(guide, num_samples, spec, params, rng_key, dynamic):
    """Compiled once per guide, sample size and data layout (the data themselves are inputs)."""
    args, kwargs = _join_data(dynamic, spec)
    ratios = _flat_log_ratios if isinstance(guide, Guide) else _trace_log_ratios
    return ratios(guide, params, rng_key, num_samples, args, kwargs)


def _weighted_means(draws: dict, lw: np.ndarray) -> dict:
    w = np.exp(lw - np.max(lw))
    w = w / w.sum()
    return {s: np.tensordot(w, np.asarray(v, dtype=np.float64), axes=1) for s, v in draws.items()}


def psis_diagnostic(
    guide,
    params,
    *args,
    num_samples: int = 4000,
    rng_key: jax.Array | None = None,
    corrected_means: bool = False,
    **kwargs,
) -> PSISResult:
    """PSIS diagnostic of a fitted guide (Yao et al. 2018, "Yes, but did it work?").

    Draws ``z_s ~ q``, forms ``log r_s = log p(x, z_s) - log q(z_s)`` (for an ngvi guide in the
    flat unconstrained space, Jacobian included; for other NumPyro guides from traces in the
    constrained space: the ratio is the same), fits a generalized Pareto distribution to the
    largest ratios (``arviz.psislw``) and reports its shape k-hat: < 0.5 good, 0.5-0.7 usable
    with PSIS correction, > 0.7 unreliable. With ``corrected_means`` the PSIS-weighted posterior
    means ``sum_s w_s theta_s`` of every site are returned too.
    """
    if not (isinstance(num_samples, (int, np.integer)) and num_samples >= _MIN_DRAWS):
        raise ConfigError(f"num_samples must be an integer >= {_MIN_DRAWS}, got {num_samples!r}.")
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    dynamic, spec = _split_data(args, kwargs)
    log_ratios, draws = _log_ratios_jit(guide, int(num_samples), spec, params, key, dynamic)
    lr = _check_log_ratios(log_ratios)
    lw, khat = _smooth(lr)
    ess = float(1.0 / np.sum(np.exp(2 * (lw - np.logaddexp.reduce(lw)))))
    means = _weighted_means(draws, lw) if corrected_means else None
    return PSISResult(khat, lr, ess, khat_message(khat, ess), means)
