"""Tests for the bundled NumPyro models in ``models/`` and the ``models.load`` registry."""

from __future__ import annotations

import importlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.util import log_density

from ngvi import models
from ngvi.models import BUNDLED, CONJUGATE, ModelLoadError, load, load_module, load_references

# expected latent (non-observed sample) sites and their shapes, with the data from data()
EXPECTED_LATENT = {
    "eight_schools": {"mu": (), "tau": (), "theta_tilde": (8,)},
    "logistic_regression": {"w": (30,), "b": ()},
    "hierarchical_linear": {
        "mu_a": (),
        "mu_b": (),
        "sigma_a": (),
        "sigma_b": (),
        "a": (50,),
        "b": (50,),
        "sigma_y": (),
    },
    "beta_bernoulli": {"p": ()},
    "normal_normal": {"mu": ()},
    "normal_gamma": {"mu": (), "tau": ()},
    "gamma_poisson": {"lam": ()},
    "dirichlet_categorical": {"pi": (4,)},
    "gaussian_mixture": {"weights": (3,), "locs": (3, 2), "scales": (3, 2)},
    "funnel": {"v": (), "x": ()},
    "correlated_gaussian": {"x": (2,)},
    "bernoulli_mixture": {"weights": (10,), "probs": (10, 64)},
    "bayes_gmm": {"weights": (3,), "tau": (3, 2), "mu": (3, 2)},
    "bnn_classifier": {"hidden_w": (64, 32), "hidden_b": (32,), "out_w": (32, 10), "out_b": (10,)},
    "bnn_regressor": {
        "sigma": (),
        "hidden_w": (10, 50),
        "hidden_b": (50,),
        "out_w": (50, 1),
        "out_b": (1,),
    },
}


def _trace(model_fn, args, kwargs, rng=0, extra=None, density=True):
    """Trace ``model_fn`` with random latent values inside one ``jax.jit``.

    Site metadata (type, observed, support, shape) comes from an abstract trace
    (``jax.eval_shape``, nothing compiled).  Latent values are ``biject_to(support)``
    of standard-normal draws in unconstrained space, substituted into the model, so the
    rejection samplers of Gamma/Beta/Dirichlet never need compiling (they made this file
    slow on a loaded 2-core machine).  Returns ``{site: {"type", "is_observed",
    "value"}}`` plus ``"log_density"`` (the joint log density at those values, NaN if
    ``density=False``) and ``"extra"`` (``extra(trace)``, computed inside the jit).
    """
    meta = {}

    def abstract(key):
        tr = trace(seed(model_fn, key)).get_trace(*args, **kwargs)
        for k, site in tr.items():
            if site["type"] in ("sample", "deterministic"):
                latent = site["type"] == "sample" and not site["is_observed"]
                meta[k] = {
                    "type": site["type"],
                    "is_observed": site.get("is_observed"),
                    "support": site["fn"].support if latent else None,
                    "shape": tuple(site["value"].shape),
                }
        return 0

    key = jax.random.PRNGKey(rng)
    jax.eval_shape(abstract, key)
    latent = [k for k, m in meta.items() if m["support"] is not None]

    def run(key):
        keys = jax.random.split(key, len(latent) + 1)
        params = {}
        for k_i, name in zip(keys[1:], latent):
            t = biject_to(meta[name]["support"])
            u = jax.random.normal(k_i, t.inverse_shape(meta[name]["shape"]))
            params[name] = t(u)
        tr = trace(substitute(seed(model_fn, keys[0]), params)).get_trace(*args, **kwargs)
        values = {k: tr[k]["value"] for k in meta}
        lp = log_density(model_fn, args, kwargs, params)[0] if density else jnp.nan
        return values, lp, (extra(tr) if extra is not None else None)

    values, lp, ex = jax.jit(run)(key)
    out = {
        k: {"type": meta[k]["type"], "is_observed": meta[k]["is_observed"], "value": v}
        for k, v in values.items()
    }
    out["log_density"], out["extra"] = lp, ex
    return out


def _latent(tr):
    return {
        k: tuple(s["value"].shape)
        for k, s in tr.items()
        if isinstance(s, dict) and s["type"] == "sample" and not s["is_observed"]
    }


def test_registry_covers_all_model_files():
    files = {p.stem for p in models._HERE.glob("*.py")} - {"__init__", "make_references"}
    assert set(BUNDLED) == files == set(EXPECTED_LATENT)
    # installed under ngvi's namespace, never as a top-level ``models`` (issue 18, item 7)
    assert BUNDLED == {name: f"ngvi.models.{name}" for name in files}
    assert models.__name__ == "ngvi.models" and models._HERE.name == "models"


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_model_traces_with_expected_sites(name):
    module = importlib.import_module(BUNDLED[name])
    assert module.__doc__ and len(module.__doc__) > 50, "module docstring states the model"
    args, kwargs = module.data()
    for v in list(args) + list(kwargs.values()):
        assert v.dtype in (jnp.float32, jnp.int32)
    tr = _trace(module.model, args, kwargs)
    assert _latent(tr) == EXPECTED_LATENT[name]
    observed = [k for k, s in tr.items() if isinstance(s, dict) and s["is_observed"]]
    assert len(observed) == (0 if name in ("funnel", "correlated_gaussian") else 1)
    # the joint log density is finite at a prior draw
    assert np.isfinite(float(tr["log_density"]))


def test_eight_schools_theta_deterministic():
    m, args, kwargs = load("eight_schools")
    tr = _trace(m, args, kwargs)
    assert tr["theta"]["type"] == "deterministic"
    expected = tr["mu"]["value"] + tr["tau"]["value"] * tr["theta_tilde"]["value"]
    np.testing.assert_allclose(tr["theta"]["value"], expected, rtol=1e-6)
    assert tr["tau"]["value"] > 0


def test_logistic_regression_data_and_subsampling():
    m, (X,), kwargs = load("logistic_regression")
    y = kwargs["y"]
    assert X.shape == (569, 30) and y.shape == (569,)
    np.testing.assert_allclose(X.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(X.std(0), 1.0, atol=1e-3)
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 1.0}
    tr = _trace(
        m, (X,), dict(kwargs, subsample_size=32), extra=lambda t: t["y"]["scale"], density=False
    )
    assert tr["y"]["value"].shape == (32,)
    np.testing.assert_allclose(tr["extra"], 569 / 32, rtol=1e-6)
    # full batch: subsample_size=None (default) uses every row
    tr_full = _trace(m, (X,), kwargs)
    assert tr_full["y"]["value"].shape == (569,)


def test_hierarchical_linear_data_is_deterministic():
    hl = importlib.import_module("ngvi.models.hierarchical_linear")
    (x, group), kwargs = hl.data()
    assert x.shape == group.shape == kwargs["y"].shape == (500,)
    assert np.bincount(np.asarray(group)).tolist() == [10] * 50
    # regenerated from the fixed RandomState seed (bypassing the cache): identical
    _, _, y2 = hl._generate.__wrapped__()
    np.testing.assert_array_equal(kwargs["y"], y2)
    n_latent = sum(int(np.prod(s)) for s in EXPECTED_LATENT["hierarchical_linear"].values())
    assert n_latent == 105


def test_gaussian_mixture_marginal_likelihood_matches_components():
    gm = importlib.import_module("ngvi.models.gaussian_mixture")
    _, kwargs = gm.data()
    X = kwargs["X"]
    assert X.shape == (150, 2)
    assert gm.data(all_features=True)[1]["X"].shape == (150, 4)
    params = {
        "weights": jnp.array([0.2, 0.3, 0.5]),
        "locs": jnp.array([[-1.0, -1.0], [0.0, 0.5], [1.0, 1.0]]),
        "scales": jnp.array([[0.5, 0.6], [0.7, 0.8], [0.9, 1.0]]),
    }

    @jax.jit
    def check(p):
        tr = trace(substitute(seed(gm.model, 0), p)).get_trace(X=X)
        comp = gm.component_log_likelihood(X, **p)
        marginal = jax.nn.logsumexp(comp, axis=-1).sum()
        return tr["X"]["fn"].log_prob(X).sum(), marginal, gm.responsibilities(X, **p)

    ll, marginal, r = check(params)
    np.testing.assert_allclose(ll, marginal, rtol=1e-5)
    assert r.shape == (150, 3)
    np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-5)


def test_funnel_and_correlated_gaussian_options():
    f = importlib.import_module("ngvi.models.funnel")
    assert f.data() == ((), {})
    assert _latent(_trace(f.model, (), {"dim": 3})) == {"v": (), "x": (3,)}
    np.testing.assert_allclose(f.posterior_moments()["x"]["sd"], np.exp(2.25))
    cg = importlib.import_module("ngvi.models.correlated_gaussian")
    assert cg.data() == ((), {})
    np.testing.assert_allclose(cg.covariance(), [[2.0, 1.0], [1.0, 2.0]])
    tr = _trace(
        cg.model, (), {"rho": cg.STRONG_RHO}, extra=lambda t: t["x"]["fn"].covariance_matrix
    )
    np.testing.assert_allclose(tr["extra"], [[2.0, 1.9], [1.9, 2.0]], rtol=1e-6)
    post = cg.exact_posterior(rho=0.95)["x"]
    np.testing.assert_allclose(post["covariance_matrix"], [[2.0, 1.9], [1.9, 2.0]])


# --- load() ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["eight_schools", "models/eight_schools.py", "models/eight_schools.py:model"],
)
def test_load_spellings(spec, monkeypatch):
    monkeypatch.chdir(models._HERE.parent)
    model_fn, args, kwargs = load(spec)
    es = importlib.import_module("ngvi.models.eight_schools")
    assert model_fn is es.model
    assert len(args) == 1 and args[0].shape == (8,) and set(kwargs) == {"y"}


def test_load_absolute_path_and_named_function(tmp_path):
    src = textwrap.dedent(
        """
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        def my_model(y=None):
            m = numpyro.sample("m", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(m, 1.0), obs=y)

        def data():
            return (), {"y": jnp.float32(0.5)}
        """
    )
    path = tmp_path / "user_model.py"
    path.write_text(src)
    model_fn, args, kwargs = load(f"{path}:my_model")
    assert model_fn.__name__ == "my_model" and args == () and set(kwargs) == {"y"}
    assert _latent(_trace(model_fn, args, kwargs)) == {"m": ()}
    # the default function name is "model", which this file lacks
    with pytest.raises(ModelLoadError, match=r"user_model\.py.*'model'"):
        load(str(path))
    assert load_module(str(models._HERE / "funnel.py")) is importlib.import_module(
        "ngvi.models.funnel"
    )


def test_load_missing_data_and_unknown(tmp_path):
    path = tmp_path / "no_data.py"
    path.write_text("def model():\n    pass\n")
    with pytest.raises(ModelLoadError, match=r"no_data\.py.*'data'"):
        load(str(path))
    with pytest.raises(ModelLoadError, match="not_a_model"):
        load("not_a_model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "missing.py"))
    with pytest.raises(ModelLoadError, match="nope"):
        load("eight_schools:nope")


# --- exact posteriors and NUTS references ---------------------------------------------

REFS = load_references()


def test_exact_posteriors_match_numpyro_moments():
    """posterior_moments() agrees with the moments of the closed-form distribution."""
    cls = {
        "beta_bernoulli": lambda p: dist.Beta(**p),
        "normal_normal": lambda p: dist.Normal(**p),
        "gamma_poisson": lambda p: dist.Gamma(**p),
        "dirichlet_categorical": lambda p: dist.Dirichlet(jnp.asarray(p["concentration"])),
    }
    for name in CONJUGATE:
        module = importlib.import_module(BUNDLED[name])
        args, kwargs = module.data()
        exact = module.exact_posterior(*args, **kwargs)
        moments = module.posterior_moments(*args, **kwargs)
        assert set(exact) == set(moments) == set(EXPECTED_LATENT[name])
        for site, params in exact.items():
            d = cls[name](params)
            np.testing.assert_allclose(moments[site]["mean"], d.mean, rtol=1e-5)
            np.testing.assert_allclose(moments[site]["sd"], jnp.sqrt(d.variance), rtol=1e-5)
    # a concrete check of the Beta-Bernoulli update: 14 ones in 20 draws
    bb = importlib.import_module("ngvi.models.beta_bernoulli")
    assert bb.exact_posterior(**bb.data()[1]) == {
        "p": {"concentration1": 16.0, "concentration0": 8.0}
    }


@pytest.mark.parametrize("name", CONJUGATE)
def test_conjugate_exact_posterior_agrees_with_nuts(name):
    """NUTS reference moments vs closed form.

    Tolerance: the mean must lie within max(4 * MCSE, 0.05 * sd) of the exact mean
    (MCSE from ArviZ, ~0.015 sd here since ESS ~ 3000-8000), and the sd within 5 %
    (the relative Monte Carlo error of an sd estimate is ~1/sqrt(2 ESS) < 1.5 %).
    """
    module = importlib.import_module(BUNDLED[name])
    args, kwargs = module.data()
    exact = module.posterior_moments(*args, **kwargs)
    ref = REFS["models"][name]["sites"]
    assert set(ref) == set(exact)
    for site, m in exact.items():
        mean, sd = np.ravel(m["mean"]), np.ravel(m["sd"])
        nuts_mean = np.asarray(ref[site]["mean"])
        nuts_sd = np.asarray(ref[site]["sd"])
        mcse = np.asarray(ref[site]["mcse_mean"])
        tol = np.maximum(4.0 * mcse, 0.05 * sd)
        assert np.all(np.abs(nuts_mean - mean) <= tol), (site, nuts_mean, mean, tol)
        np.testing.assert_allclose(nuts_sd, sd, rtol=0.05)


def test_references_quality_and_metadata():
    assert REFS["numpyro_version"] and REFS["jax_version"] and "seed" in REFS
    assert REFS["num_chains"] == 4 and REFS["num_samples"] == 2000
    assert set(REFS["models"]) >= {"eight_schools", "logistic_regression", "hierarchical_linear"}
    assert set(REFS["models"]) >= set(CONJUGATE)
    for name, res in REFS["models"].items():
        assert set(res["sites"]) == set(EXPECTED_LATENT[name]), name
        assert res["divergences"] == 0, name
        for site, s in list(res["sites"].items()) + list(res["deterministic"].items()):
            size = int(np.prod(s["shape"]))
            assert len(s["mean"]) == len(s["sd"]) == len(s["mcse_mean"]) == size
            assert s["r_hat_max"] < 1.01, (name, site, s["r_hat_max"])
            assert s["ess_bulk_min"] > 400 and s["ess_tail_min"] > 400, (name, site)
    assert list(REFS["models"]["eight_schools"]["deterministic"]) == ["theta"]
    assert models.REFERENCES_PATH.stat().st_size < 100_000
