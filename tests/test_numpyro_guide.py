"""Every ngvi guide as a NumPyro guide (issue 18, items 1-4), checked through NumPyro's and
ArviZ's own functions: ``Predictive(model, guide=guide, params=result.params)`` draws from the
fit (never the initial values), ``Trace_ELBO`` agrees with ngvi's ELBO on models with plates,
``handlers.trace/substitute`` see the model's batch and event dims, the autoguide methods
(``median``, ``quantiles``, ``get_posterior``, ``sample_posterior``) have ``AutoNormal``'s
names, keys and shapes, and parameters refuse a model they were not fitted to."""

import jax

jax.config.update("jax_enable_x64", True)

import pickle  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import scipy.stats as st  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer import SVI, Predictive, Trace_ELBO  # noqa: E402
from numpyro.infer.autoguide import AutoNormal  # noqa: E402

import models  # noqa: E402
import ngvi  # noqa: E402
from ngvi.errors import ConfigError, LayoutError, ModelError  # noqa: E402
from ngvi.families.special import beta_icdf, gamma_icdf  # noqa: E402
from ngvi.nn import dense  # noqa: E402
from ngvi.report.diagnostics import psis_diagnostic, to_inference_data  # noqa: E402

pytestmark = pytest.mark.x64  # float64 in this module only (tests/conftest.py)

KEY = jax.random.PRNGKey(0)


# -- models: plates, constrained sites, a deterministic site, a BNN -------------------------------
def structured(counts, y):
    """A vector with event dim 1 (no plate), and under the plate "group" a Gamma rate (batch
    (G,)) and a simplex (batch (G,), event (K,))."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("group", counts.shape[0]):
        lam = numpyro.sample("lam", dist.Gamma(2.0, 0.5))
        p = numpyro.sample("p", dist.Dirichlet(jnp.ones(counts.shape[1])))
        numpyro.sample("c", dist.Multinomial(counts.sum(-1), p), obs=counts)
        with numpyro.plate("obs", y.shape[0], dim=-2):
            numpyro.sample("y", dist.Poisson(lam * jnp.exp(0.1 * w.sum())), obs=y)


STRUCTURED_DATA = (
    jnp.array([[3, 1, 0], [0, 4, 2], [1, 1, 5]]),
    jnp.array([[2.0, 5.0, 1.0], [3.0, 6.0, 0.0], [1.0, 4.0, 2.0], [2.0, 7.0, 1.0]]),
)


def ar1(y):
    """AR(1): y_t ~ N(rho y_{t-1}, sigma) under the plate "t"."""
    rho = numpyro.sample("rho", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("t", y.shape[0] - 1):
        numpyro.sample("y", dist.Normal(rho * y[:-1], sigma), obs=y[1:])


def _ar1_data(rho=0.66, n=200):
    eps = np.random.default_rng(0).normal(size=n)
    y = np.zeros(n)
    for t in range(1, n):
        y[t] = rho * y[t - 1] + eps[t]
    return jnp.asarray(y)


def bnn(X, y=None):
    h = jnp.tanh(dense("hidden", X, 3))
    mean = dense("out", h, 1)[:, 0]
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(mean, sigma), obs=y)


def _bnn_data():
    X = jax.random.normal(jax.random.PRNGKey(1), (40, 2))
    return (X,), {"y": jnp.sin(X[:, 0]) + 0.1 * X[:, 1]}


def _problem(name):
    if name == "eight_schools":
        return models.load("eight_schools")
    if name == "structured":
        return structured, STRUCTURED_DATA, {}
    if name == "ar1":
        return ar1, (_ar1_data(),), {}
    if name == "gamma_poisson":
        return models.load("gamma_poisson")
    return bnn, *_bnn_data()


GUIDES = {
    "meanfield": ngvi.MeanFieldGaussian,
    "fullrank": ngvi.FullRankGaussian,
    "expfam": ngvi.ExpFamilyGuide,
    "kfac": ngvi.KFACGuide,
}
CASES = [("meanfield", "structured"), ("fullrank", "structured"), ("expfam", "structured")]
CASES.append(("kfac", "bnn"))
#: the default run keeps one Gaussian and the exp-family guide per check (suite time, issue 16);
#: the slow job runs every guide through every check
_SLOW = pytest.mark.slow
CASES_DEFAULT_MF_EF = [
    CASES[0],
    pytest.param(*CASES[1], marks=_SLOW),
    CASES[2],
    pytest.param(*CASES[3], marks=_SLOW),
]
#: Predictive against sample_posterior on the structured model: slow job only (14-17 s in the
#: default run, whose margin under 6 minutes it used up). The default run keeps Predictive with
#: a Gaussian guide's result.params and moved params (the AR(1) test below) and with the
#: exp-family guide on a mixed model (test_expfam_guide's sample_posterior-and-Predictive test)
CASES_PREDICTIVE = [pytest.param(*c, marks=_SLOW) for c in CASES]


def _moved(p: dict) -> dict:
    """Parameters away from a guide's initial values and inside their domain: means shifted,
    Gaussian scales tripled, exp-family natural parameters halved (every factor's variance about
    doubles). The claims below hold at any parameters, and a guide that fell back to its initial
    values would fail them."""
    out = {}
    for k, v in p.items():
        if k in ("loc", "mf:loc") or k.endswith(":M"):
            out[k] = v + 0.4
        elif k in ("scale", "mf:scale"):
            out[k] = v * 3.0
        elif k == "prec_tril" or ".eta" in k:
            out[k] = v * 0.5
        else:
            out[k] = v
    return out


class Case:
    """A guide set up on a model, with parameters: ``result.params`` of a fit of ``steps``
    steps, else the initial parameters moved by ``_moved`` (stamped like result.params)."""

    def __init__(self, guide_name, model_name, steps=0):
        self.model, self.args, self.kwargs = _problem(model_name)
        self.guide = GUIDES[guide_name](self.model)
        if steps:
            engine = ngvi.NGVI(self.model, self.guide, num_particles=8)
            self.result = engine.run(  # all the steps: convergence is tested elsewhere
                KEY,
                steps,
                *self.args,
                progress_bar=False,
                chunk_size=steps,
                tol=None,
                **self.kwargs,
            )
            self.params = self.result.params
        else:
            target = self.guide.setup(KEY, self.args, self.kwargs)
            self.params = self.guide.numpyro_params(_moved(self.guide.init_params(target)))


@pytest.fixture(scope="module")
def fits():
    cache = {}

    def get(guide_name, model_name, steps=0):
        if (guide_name, model_name, steps) not in cache:
            cache[guide_name, model_name, steps] = Case(guide_name, model_name, steps)
        return cache[guide_name, model_name, steps]

    return get


def _latent_names(model, args, kwargs):
    tr = handlers.trace(handlers.seed(model, KEY)).get_trace(*args, **kwargs)
    return [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]


# -- item 1: Predictive with result.params ------------------------------------------------------
def test_predictive_with_result_params_draws_from_the_fit_not_the_init(fits):
    """The SVI habit: AR(1) with rho = 0.66. The fitted rho is near 0.66 (measured 0.71 on these
    200 points) and Predictive's draws have the fit's mean and sd, and follow the params given
    (the warm start already puts the guide's initial value near the fit, so the check moves the
    params instead)."""
    fit = fits("meanfield", "ar1", steps=150)
    loc, scale = fit.guide.median(fit.params)["rho"], fit.params["scale"][0]
    assert abs(float(loc) - 0.66) < 0.15
    pred = Predictive(
        fit.model, guide=fit.guide, params=fit.params, num_samples=4000, return_sites=["rho", "y"]
    )
    draws = pred(jax.random.PRNGKey(1), *fit.args)
    rho = np.asarray(draws["rho"])
    assert abs(rho.mean() - float(loc)) < 4 * float(scale) / np.sqrt(rho.size)
    assert abs(rho.std() / float(scale) - 1) < 0.1
    moved = {**fit.params, "loc": fit.params["loc"].at[0].add(-2.0)}  # rho's unconstrained loc
    other = Predictive(
        fit.model, guide=fit.guide, params=moved, num_samples=4000, return_sites=["rho"]
    )
    assert rho.mean() - np.asarray(other(jax.random.PRNGKey(1), *fit.args)["rho"]).mean() > 0.3
    assert draws["y"].shape == (4000, fit.args[0].shape[0] - 1)  # posterior predictive


@pytest.mark.parametrize("guide_name,model_name", CASES_PREDICTIVE)
def test_predictive_matches_sample_posterior(fits, guide_name, model_name):
    """Predictive's latent draws have the means and sds of ``guide.sample_posterior`` at the
    given parameters (moved away from the initial values)."""
    fit, n = fits(guide_name, model_name), 2000
    latent = _latent_names(fit.model, fit.args, fit.kwargs)
    pred = Predictive(
        fit.model, guide=fit.guide, params=fit.params, num_samples=n, return_sites=latent
    )
    pred = jax.jit(lambda k: pred(k, *fit.args, **fit.kwargs))(jax.random.PRNGKey(2))
    ref = fit.guide.sample_posterior(jax.random.PRNGKey(3), fit.params, sample_shape=(n,))
    for name in latent:
        a, b = np.asarray(pred[name]), np.asarray(ref[name])
        assert a.shape == b.shape
        se = np.sqrt((a.var(0) + b.var(0)) / n)
        assert np.all(np.abs(a.mean(0) - b.mean(0)) <= 5 * se + 1e-12), name
        assert np.all(np.abs(a.std(0) / b.std(0) - 1) < 0.15), name


def test_a_guide_without_its_parameters_raises():
    """No params substituted (no parameter store in NumPyro): a clear error naming the fix,
    never draws from the initial values; a partial set names the missing ones."""
    model, args, kwargs = models.load("eight_schools")
    guide = ngvi.MeanFieldGaussian(model)
    with pytest.raises(ConfigError, match=r"without its parameters \['loc', 'scale'\].*params="):
        Predictive(model, guide=guide, num_samples=3)(KEY, *args, **kwargs)
    with pytest.raises(ConfigError, match="without its parameters"):
        handlers.seed(guide, 0)(*args, **kwargs)
    loc = guide.init_params(guide.target)["loc"]
    with pytest.raises(ConfigError, match=r"without its parameters \['scale'\]"):
        handlers.seed(handlers.substitute(guide, data={"loc": loc}), 0)(*args, **kwargs)


def test_a_model_site_named_like_a_parameter_is_refused():
    """NumPyro substitutes params into the model by name: a model site 'loc' would receive the
    guide's flat 'loc' vector, so the guide refuses with the way around it."""

    def model(y):
        loc = numpyro.sample("loc", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    y = jnp.ones(3)
    guide = ngvi.MeanFieldGaussian(model)
    params = guide.numpyro_params(guide.init_params(guide.setup(KEY, (y,))))
    with pytest.raises(ModelError, match=r"\('loc', 'latent'\).*posterior_samples"):
        Predictive(model, guide=guide, params=params, num_samples=2)(KEY, y)
    draws = guide.sample_posterior(KEY, params, sample_shape=(5,))  # the way around it
    pred = Predictive(model, posterior_samples=draws)(KEY, y)
    assert pred["y"].shape == (5, 3)


# -- item 2: Trace_ELBO and handlers on models with plates ----------------------------------------
@pytest.mark.parametrize("guide_name,model_name", CASES_DEFAULT_MF_EF)
def test_guide_sites_have_the_models_batch_and_event_dims(fits, guide_name, model_name):
    """handlers.trace of the substituted guide: every latent site has the model's batch and
    event shape, and its value lies in the site's support."""
    fit = fits(guide_name, model_name)
    guide = handlers.substitute(handlers.seed(fit.guide, KEY), data=fit.params)
    g_tr = handlers.trace(guide).get_trace(*fit.args, **fit.kwargs)
    m_tr = handlers.trace(handlers.seed(fit.model, KEY)).get_trace(*fit.args, **fit.kwargs)
    for name in _latent_names(fit.model, fit.args, fit.kwargs):
        g, m = g_tr[name]["fn"], m_tr[name]["fn"]
        assert (g.batch_shape, g.event_shape) == (m.batch_shape, m.event_shape), name
        assert bool(jnp.all(m.support(g_tr[name]["value"]))), name


def _ngvi_neg_elbo(guide, params, args, kwargs, n):
    """ngvi's own -ELBO = -(E_q[log p(x, T(z)) + log|J_T(z)|] + H[q]) (the engine's formula:
    closed-form entropy) and the per-particle sd of log p - log q, the terms Trace_ELBO
    averages (its Monte Carlo error is that sd / sqrt(n))."""
    p = guide.check_params(params)

    @jax.jit
    def run(key):
        z = guide.reparam(p, guide.base_noise(key, n))
        logp = jax.vmap(lambda zi: guide.target.log_density(zi, args, kwargs))(z)
        ratios = logp - guide.flat_distribution(p).log_prob(z)
        return -(jnp.mean(logp) + guide.entropy(p)), jnp.std(ratios), jnp.std(logp)

    neg_elbo, sd_ratio, sd_logp = run(jax.random.PRNGKey(11))
    return float(neg_elbo), float(sd_ratio), float(sd_logp)


@pytest.mark.parametrize("guide_name,model_name", CASES_DEFAULT_MF_EF)
def test_trace_elbo_agrees_with_ngvi_elbo(fits, guide_name, model_name):
    """NumPyro's Trace_ELBO with the guide's params equals ngvi's -ELBO within Monte Carlo
    error (2000 particles each, float64)."""
    fit, n = fits(guide_name, model_name), 2000
    elbo = Trace_ELBO(num_particles=n)
    loss = jax.jit(
        lambda k: elbo.loss(k, fit.params, fit.model, fit.guide, *fit.args, **fit.kwargs)
    )(jax.random.PRNGKey(5))
    ours, sd_ratio, sd_logp = _ngvi_neg_elbo(fit.guide, fit.params, fit.args, fit.kwargs, n)
    se = np.sqrt((sd_ratio**2 + sd_logp**2) / n)
    assert np.isfinite(float(loss)) and sd_ratio > 0
    assert abs(float(loss) - ours) < 4 * se, (float(loss), ours, se)


# -- item 3: autoguide methods ------------------------------------------------------------------
@pytest.fixture(scope="module")
def auto_normal():
    """NumPyro's AutoNormal on eight schools (initial params: only keys and shapes are used)."""
    model, args, kwargs = models.load("eight_schools")
    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(0.01), Trace_ELBO())
    return guide, svi.get_params(svi.init(KEY, *args, **kwargs))


def _shapes(d):
    return {k: tuple(np.shape(v)) for k, v in d.items()}


@pytest.mark.parametrize(
    "guide_name", ["meanfield", pytest.param("fullrank", marks=pytest.mark.slow), "expfam"]
)
def test_autoguide_methods_have_autonormals_keys_and_shapes(fits, auto_normal, guide_name):
    """median, quantiles and sample_posterior (no model args: the setup data, as AutoNormal)
    return the same sites, deterministic "theta" included, with the same shapes as
    AutoNormal's, per site in the constrained space."""
    fit, (auto, auto_params) = fits(guide_name, "eight_schools"), auto_normal
    g, p = fit.guide, fit.params
    assert _shapes(g.median(p)) == _shapes(auto.median(auto_params))
    q = [0.05, 0.5, 0.95]
    assert _shapes(g.quantiles(p, q)) == _shapes(auto.quantiles(auto_params, q))
    ours = g.sample_posterior(KEY, p, sample_shape=(7,))
    assert _shapes(ours) == _shapes(auto.sample_posterior(KEY, auto_params, sample_shape=(7,)))
    np.testing.assert_allclose(
        ours["theta"], ours["mu"][:, None] + ours["tau"][:, None] * ours["theta_tilde"]
    )
    assert g.get_posterior(p).event_shape == (g.target.dim,)


def test_meanfield_median_and_quantiles_are_closed_form(fits):
    """tau > 0: median exp(loc), quantiles exp(loc + scale Phi^-1(q)) (scipy's lognormal);
    mu: Normal quantiles; the deterministic theta is the plug-in mu + tau * theta_tilde."""
    fit = fits("meanfield", "eight_schools")
    p, sl = fit.params, fit.guide.target.site_slices()
    loc, scale = np.asarray(p["loc"]), np.asarray(p["scale"])
    med, qs = fit.guide.median(p), fit.guide.quantiles(p, [0.1, 0.9])
    i = sl["tau"].start
    np.testing.assert_allclose(med["tau"], np.exp(loc[i]), rtol=1e-12)
    ref = st.lognorm.ppf([0.1, 0.9], s=scale[i], scale=np.exp(loc[i]))
    np.testing.assert_allclose(qs["tau"], ref, rtol=1e-10)
    j = sl["mu"].start
    np.testing.assert_allclose(qs["mu"], st.norm.ppf([0.1, 0.9], loc[j], scale[j]), rtol=1e-10)
    np.testing.assert_allclose(med["theta"], med["mu"] + med["tau"] * med["theta_tilde"])


def test_fullrank_quantiles_use_the_marginal_sd(fits):
    fit = fits("fullrank", "eight_schools")
    p = fit.guide.check_params(fit.params)
    sd = np.sqrt(np.diag(np.asarray(fit.guide.covariance(p))))
    j = fit.guide.target.site_slices()["theta_tilde"]
    qs = fit.guide.quantiles(fit.params, [0.25])["theta_tilde"][0]
    np.testing.assert_allclose(qs, st.norm.ppf(0.25, p["loc"][j], sd[j]), rtol=1e-9)


@pytest.fixture(scope="module")
def conjugate_fit():
    """ExpFamilyGuide on Gamma-Poisson: one factor, the regression estimator, one unit step
    lands on the exact posterior Gamma(a0 + sum y, b0 + n)."""
    model, args, kwargs = models.load("gamma_poisson")
    guide = ngvi.ExpFamilyGuide(model)
    res = ngvi.NGVI(model, guide, num_particles=8, average=0.0).run(
        KEY, 5, *args, progress_bar=False, **kwargs
    )
    y = np.asarray(kwargs["y"])
    return guide, res.params, 2.0 + y.sum(), 0.5 + y.size


def test_expfam_site_distributions_are_numpyro_distributions(conjugate_fit):
    """The fitted factor of 'lam' is a dist.Gamma with the exact posterior's parameters;
    median and quantiles are its inverse CDF (scipy's)."""
    guide, params, a, b = conjugate_fit
    lam = guide.site_distributions(params)["lam"]
    assert isinstance(lam, dist.Gamma) and lam.batch_shape == () and lam.event_shape == ()
    np.testing.assert_allclose([lam.concentration, lam.rate], [a, b], rtol=1e-6)
    qs = guide.quantiles(params, [0.025, 0.5, 0.975])["lam"]
    ref = st.gamma.ppf([0.025, 0.5, 0.975], float(lam.concentration), scale=1 / float(lam.rate))
    np.testing.assert_allclose(qs, ref, rtol=1e-9)
    np.testing.assert_allclose(guide.median(params)["lam"], ref[1], rtol=1e-9)


def test_expfam_site_distributions_keep_the_plates(fits):
    """Under the plate "group": lam is a Gamma with batch (G,), p a Dirichlet with batch (G,)
    and event (K,); a Dirichlet coordinate's quantile is its Beta marginal's (scipy)."""
    fit = fits("expfam", "structured")
    d = fit.guide.site_distributions(fit.params)
    G, K = STRUCTURED_DATA[0].shape
    assert isinstance(d["lam"], dist.Gamma) and d["lam"].batch_shape == (G,)
    assert isinstance(d["p"], dist.Dirichlet)
    assert (d["p"].batch_shape, d["p"].event_shape) == ((G,), (K,))
    assert d["w"].event_shape == (2,)
    alpha = np.asarray(d["p"].concentration)
    qs = fit.guide.quantiles(fit.params, [0.2, 0.7])["p"]
    ref = st.beta.ppf(
        np.array([0.2, 0.7])[:, None, None], alpha, alpha.sum(-1, keepdims=True) - alpha
    )
    np.testing.assert_allclose(qs, ref, rtol=1e-8)


def test_kfac_median_and_quantiles(fits):
    """K-FAC: the median is the mean M; a weight's marginal sd is the diagonal of
    Sigma_in (x) Sigma_out from the stored roots."""
    fit = fits("kfac", "bnn")
    p = fit.guide.check_params(fit.params)
    med, qs = fit.guide.median(fit.params), fit.guide.quantiles(fit.params, [0.9])
    np.testing.assert_allclose(med["hidden_w"], p["hidden:M"][:-1])
    np.testing.assert_allclose(med["hidden_b"], p["hidden:M"][-1])
    SA, SG = np.asarray(p["hidden:SA"]), np.asarray(p["hidden:SG"])
    sd = np.sqrt(np.outer(np.diag(SA @ SA.T), np.diag(SG @ SG.T)))[:-1]
    np.testing.assert_allclose(qs["hidden_w"][0], med["hidden_w"] + st.norm.ppf(0.9) * sd)


def test_quantiles_must_lie_in_the_open_unit_interval(fits):
    fit = fits("meanfield", "eight_schools")
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        fit.guide.quantiles(fit.params, [0.5, 1.0])


def test_gamma_and_beta_inverse_cdfs_match_scipy():
    """NumPyro's Gamma/Beta icdf need TensorFlow Probability; ngvi's bisection matches scipy
    to 1e-8 relative, small shapes and tail quantiles included."""
    q = np.array([1e-8, 0.03, 0.5, 0.97])[:, None]
    a = np.array([0.05, 1.0, 30.0])
    np.testing.assert_allclose(gamma_icdf(q, a, 2.0), st.gamma.ppf(q, a, scale=0.5), rtol=1e-8)
    np.testing.assert_allclose(beta_icdf(q, a, 3.0), st.beta.ppf(q, a, 3.0), rtol=1e-8)


def test_each_familys_marginal_quantiles_match_scipy():
    """The inverse CDFs behind ExpFamilyGuide.quantiles, family by family."""
    from ngvi import families as F

    q = np.array([0.05, 0.5, 0.95])
    cases = [
        (F.Gamma(), F.Gamma.from_standard(3.0, 2.0), st.gamma(3.0, scale=0.5)),
        (F.Exponential(), F.Exponential.from_standard(2.0), st.expon(scale=0.5)),
        (F.Beta(), F.Beta.from_standard(2.0, 5.0), st.beta(2.0, 5.0)),
        (F.DiagGaussian(), F.DiagGaussian.from_standard(1.0, 0.3), st.norm(1.0, 0.3)),
    ]
    for fam, eta, ref in cases:
        np.testing.assert_allclose(fam.marginal_icdf(eta, q), ref.ppf(q), rtol=1e-8)
    alpha = np.array([1.5, 2.0, 4.0])
    got = F.Dirichlet(3).marginal_icdf(F.Dirichlet(3).from_standard(alpha), q[:, None])
    ref = st.beta.ppf(q[:, None], alpha, alpha.sum() - alpha)
    np.testing.assert_allclose(got, ref, rtol=1e-8)


# -- item 4: parameters carry their model's layout ------------------------------------------------
def _setup(model, args, guide_cls=ngvi.MeanFieldGaussian, kwargs=None, **kw):
    guide = guide_cls(model, **kw)
    return guide, guide.numpyro_params(guide.init_params(guide.setup(KEY, args, kwargs)))


def _two_scalars(names, support):
    def model(y):
        a = numpyro.sample(names[0], dist.Normal(0.0, 1.0))
        b = numpyro.sample(names[1], support)
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(a, b), obs=y)

    return model


def test_another_models_params_of_the_same_size_are_refused():
    """Two models with two scalar latents each: every array of A's params fits B's guide, yet
    to_inference_data, psis_diagnostic, Predictive, Trace_ELBO and sample_posterior refuse
    them with a LayoutError naming both layouts."""
    y = jnp.array([0.3, -0.2, 1.1])
    model_a = _two_scalars(("mu", "tau"), dist.HalfNormal(1.0))
    model_b = _two_scalars(("alpha", "beta"), dist.HalfNormal(1.0))
    _, params_a = _setup(model_a, (y,))
    guide_b, params_b = _setup(model_b, (y,))
    assert {k: v.shape for k, v in params_a.items()} == {k: v.shape for k, v in params_b.items()}
    both = r"mu \(\).*tau \(\).*alpha \(\).*beta \(\)"
    with pytest.raises(LayoutError, match=both):
        to_inference_data(guide_b, params_a, y, num_samples=10)
    with pytest.raises(LayoutError, match=both):
        psis_diagnostic(guide_b, params_a, y, num_samples=50)
    with pytest.raises(LayoutError, match=both):
        Predictive(model_b, guide=guide_b, params=params_a, num_samples=2)(KEY, y)
    with pytest.raises(LayoutError, match=both):
        Trace_ELBO().loss(KEY, params_a, model_b, guide_b, y)
    with pytest.raises(LayoutError, match=both):
        guide_b.sample_posterior(KEY, params_a, sample_shape=(3,))
    idata = to_inference_data(guide_b, params_b, y, num_samples=10)  # its own params pass
    assert set(idata.posterior.data_vars) == {"alpha", "beta"}


def test_another_models_params_of_another_size_are_refused():
    """A plain dict (no layout) of the wrong shapes: the error names both sets of shapes."""
    model, args, kwargs = models.load("eight_schools")
    gp_model, gp_args, gp_kwargs = models.load("gamma_poisson")
    guide, _ = _setup(gp_model, gp_args, kwargs=gp_kwargs)
    with pytest.raises(LayoutError, match=r"'loc': \(10,\).*'loc': \(1,\)"):
        to_inference_data(
            guide,
            dict(_setup(model, args, kwargs=kwargs)[1]),
            *gp_args,
            num_samples=10,
            **gp_kwargs,
        )


def test_another_guides_params_are_refused():
    """Full-rank params to a mean-field guide (other keys) and an ExpFamilyGuide fitted with
    other per-site families (same keys and shapes, other meaning)."""
    model, args, kwargs = models.load("eight_schools")
    guide_mf, _ = _setup(model, args, kwargs=kwargs)
    _, params_fr = _setup(model, args, ngvi.FullRankGaussian, kwargs)
    with pytest.raises(LayoutError, match="FullRankGaussian over.*MeanFieldGaussian over"):
        psis_diagnostic(guide_mf, params_fr, *args, num_samples=50, **kwargs)
    guide_gamma, _ = _setup(model, args, ngvi.ExpFamilyGuide, kwargs)
    _, params_gauss = _setup(model, args, ngvi.ExpFamilyGuide, kwargs, families={"tau": "gaussian"})
    with pytest.raises(LayoutError, match="tau=gaussian.*tau=gamma"):
        guide_gamma.median(params_gauss)


def test_the_layout_survives_jit_tree_map_and_pickle(fits):
    fit = fits("meanfield", "eight_schools")
    p = fit.params
    assert isinstance(p, ngvi.GuideParams) and p.layout == fit.guide.layout
    for q in (
        jax.jit(lambda x: x)(p),
        jax.tree.map(lambda x: x + 0, p),
        pickle.loads(pickle.dumps(p)),
    ):
        assert isinstance(q, ngvi.GuideParams) and q.layout == p.layout
    assert p.copy().layout == p.layout  # NumPyro's ELBOs copy their params
