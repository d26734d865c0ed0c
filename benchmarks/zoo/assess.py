"""Judge a fitted guide against the zoo's references, always in float64 (whatever the fit's dtype):
the ELBO gap to the family optimum (``scoring``), the posterior-mean error in NUTS sd and the PSIS
k-hat. Targets and set-up guides are built once per model and process under
``jax.enable_x64(True)``, so a float32 process can assess its fits in float64."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.zoo import scoring
from benchmarks.zoo.registry import ZooModel
from ngvi import ExpFamilyGuide, FullRankGaussian, KFACGuide, MeanFieldGaussian
from ngvi.model.layers import fast_target

__all__ = [
    "GUIDES",
    "assess",
    "guide64",
    "judge",
    "load_optima",
    "load_references",
    "mean_error",
    "reuse",
]

HERE = Path(__file__).resolve().parent
REFERENCES = HERE / "references.json"
OPTIMA = HERE / "optima.json"
GUIDES = {
    "meanfield": MeanFieldGaussian,
    "fullrank": FullRankGaussian,
    "expfam": ExpFamilyGuide,
    "kfac": KFACGuide,
}
NUM_DRAWS = 4000  # posterior draws for the mean error and PSIS


def _load(path: Path) -> dict:
    return json.loads(path.read_text())["models"] if path.exists() else {}


def load_references() -> dict:
    return _load(REFERENCES)


def load_optima() -> dict:
    return _load(OPTIMA)


def mean_error(means: dict, ref: dict | None) -> float | None:
    """max over latent coordinates of |E_q x - E_nuts x| / sd_nuts x (constrained space), from
    the guide's posterior means ``{site: flat list}``; None without a reliable reference."""
    if not ref or not ref.get("reliable"):
        return None
    worst = 0.0
    for name, site in ref["sites"].items():
        m = np.asarray(means[name], np.float64).ravel()
        err = np.abs(m - np.asarray(site["mean"])) / np.asarray(site["sd"])
        worst = max(worst, float(np.max(err)) if np.all(np.isfinite(err)) else math.inf)
    return worst


_CACHE: dict = {}


def _cached(fn):
    """Memoise ``fn(entry, *rest)`` per model name and process (a ZooModel holds dicts)."""

    @functools.wraps(fn)
    def wrapper(entry: ZooModel, *rest):
        key = (fn.__name__, entry.name, *rest)
        if key not in _CACHE:
            _CACHE[key] = fn(entry, *rest)
        return _CACHE[key]

    return wrapper


@_cached
def data64(entry: ZooModel) -> tuple[tuple, dict]:
    with jax.enable_x64(True):
        return entry.data()


@_cached
def target64(entry: ZooModel):
    """The model's ``Target`` in float64 (its layout equals the fit's: sorted site names), laid
    out by one compiled trace (``fast_target``: the assessment needs no initialization search)."""
    with jax.enable_x64(True):
        args, kwargs = data64(entry)
        return fast_target(entry.model, args, kwargs, jax.random.PRNGKey(0))


@_cached
def guide64(entry: ZooModel, name: str):
    """A guide of family ``name`` set up on the float64 data (for scoring and sampling)."""
    with jax.enable_x64(True):
        guide = GUIDES[name](entry.model)
        if name in ("meanfield", "fullrank"):
            guide._target = target64(entry)  # the setup of these guides is the target alone
            args, kwargs = data64(entry)
            guide._data = (tuple(args), dict(kwargs))  # deterministic sites' default data
        else:
            args, kwargs = data64(entry)
            guide.setup(jax.random.PRNGKey(0), args, kwargs)
        return guide


def reuse(entry: ZooModel, name: str, guide) -> None:
    """Let a guide set up in float64 (a float64 fit's) serve ``guide64`` and ``target64``."""
    _CACHE.setdefault(("guide64", entry.name, name), guide)
    _CACHE.setdefault(("target64", entry.name), guide.target)


@_cached
def scorer64(entry: ZooModel, name: str, seed: int = scoring.SEED):
    """The family's fixed-noise ELBO scorer (``scoring``) on the float64 data, noise of ``seed``."""
    args, kwargs = data64(entry)
    with jax.enable_x64(True):
        if name == "meanfield":
            return scoring.meanfield_scorer(target64(entry), args, kwargs, seed)
        if name == "fullrank":
            return scoring.fullrank_scorer(target64(entry), args, kwargs, seed)
        if name == "expfam":
            return scoring.expfam_scorer(guide64(entry, "expfam"), args, kwargs, seed)
        return None


def elbo64(entry: ZooModel, name: str, params: dict, seed: int = scoring.SEED) -> float:
    """The family's deterministic ELBO of ``params`` (``scoring``) on the noise of ``seed``
    (a full-rank fit's precision factor, or an optimum's covariance factor ``cov_chol``);
    K-FAC: ``generic_elbo``."""
    score = scorer64(entry, name, seed)
    with jax.enable_x64(True):
        if name == "meanfield":
            value = score(params["loc"], params["scale"])
        elif name == "fullrank":
            chol = params.get("cov_chol")
            if chol is None:
                chol = scoring.precision_to_cov_chol(params["prec_tril"])
            value = score(params["loc"], chol)
        elif name == "expfam":
            value = score(params)
        else:
            args, kwargs = data64(entry)
            return scoring.generic_elbo(guide64(entry, name), params, args, kwargs)
        return float(value)


def assess(entry: ZooModel, name: str, params: dict, diagnostics: bool = True) -> dict:
    """{elbo, khat, post_mean, assess_error} of fitted ``params`` (any dtype), in float64:
    ``elbo`` the family's fixed-noise ELBO (``elbo64``), ``post_mean`` the guide's posterior mean
    per latent site (constrained, from ``NUM_DRAWS`` draws), ``khat`` the PSIS k-hat (these two
    left None without ``diagnostics``: the ELBO alone decides the verdict)."""
    out = {"elbo": None, "khat": None, "post_mean": None, "assess_error": None}
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), params)
        if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p64)):
            out.update(elbo=-math.inf, assess_error="non-finite parameters")
            return out
        out["elbo"] = _safe(lambda: elbo64(entry, name, p64))
        if not diagnostics:
            return out
        guide = guide64(entry, name)
        args, kwargs = data64(entry)
        try:
            key = jax.random.PRNGKey(1)
            draws = guide.sample_posterior(key, p64, sample_shape=(NUM_DRAWS,))
            out["post_mean"] = {k: _r(np.mean(np.asarray(v), axis=0)) for k, v in draws.items()}
            from ngvi.report.diagnostics import psis_diagnostic

            res = psis_diagnostic(guide, p64, *args, num_samples=NUM_DRAWS, **kwargs)
            out["khat"] = float(res.khat)
        except Exception as e:  # a diagnostic that cannot run is reported, not fatal
            out["assess_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def judge(cell: dict, ref: dict | None, optimum: dict | None) -> dict:
    """The cell's reference optimum, ELBO gap (nats) and posterior-mean error (NUTS sd); K-FAC is
    compared with the mean-field optimum (its own family has no computed optimum)."""
    family = "meanfield" if cell["guide"] == "kfac" else cell["guide"]
    opt = (optimum or {}).get(family, {}).get("elbo")
    elbo = cell.get("elbo")
    gap = None
    if opt is not None and elbo is not None:
        gap = opt - elbo if math.isfinite(elbo) else math.inf
    if cell.get("error") and elbo is None:
        gap = math.inf  # the fit gave no result at all
    err = mean_error(cell["post_mean"], ref) if cell.get("post_mean") else None
    return {
        "reference": f"{family} optimum" if opt is not None else None,
        "optimum": opt,
        "gap": gap,
        "mean_error": err,
    }


def _r(x, digits: int = 7) -> list:
    return [float(f"{v:.{digits}g}") for v in np.asarray(x, dtype=np.float64).ravel()]


def _safe(fn):
    try:
        v = fn()
        return v if math.isfinite(v) else -math.inf
    except FloatingPointError:
        return None
