"""ExpFamilyGuide: families by support and per-site overrides, conjugate models in one natural
step (against ADVI's step count), closed-form entropy on the unconstrained scale, the pathwise
estimator, max_kl, and the NumPyro guide protocol (sample_posterior, Predictive)."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
from jax.scipy.special import xlogy  # noqa: E402
from numpy.polynomial.hermite_e import hermegauss  # noqa: E402
from numpyro.distributions.transforms import biject_to  # noqa: E402
from numpyro.infer import Predictive, init_to_median, init_to_uniform  # noqa: E402

import ngvi.families as fam  # noqa: E402
from ngvi import (  # noqa: E402
    NGVI,
    ConfigError,
    models,  # noqa: E402
)
from ngvi.engine.infer import StepContext  # noqa: E402
from ngvi.guides.expfam import ExpFamilyGuide  # noqa: E402
from ngvi.report.baselines import advi  # noqa: E402

pytestmark = pytest.mark.x64  # float64 in this module only (tests/conftest.py)

KEY = jax.random.PRNGKey(0)
CONJUGATE = {  # model: (site, exact posterior keys in the family's ``standard`` order)
    "beta_bernoulli": ("p", ("concentration1", "concentration0")),
    "gamma_poisson": ("lam", ("concentration", "rate")),
    "normal_normal": ("mu", ("loc", "scale")),
    "dirichlet_categorical": ("pi", ("concentration",)),
}


def every_support():
    """A data-free model with one site of each support (cheap to lay out)."""
    numpyro.sample("m", dist.Normal(0.0, 1.0))
    numpyro.sample("s", dist.HalfNormal(jnp.ones(3)).to_event(1))
    numpyro.sample("p", dist.Beta(2.0, 3.0))
    numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
    numpyro.sample("v", dist.Normal(jnp.zeros(2), 1.0).to_event(1))


def _setup(families=None, **kw):
    guide = ExpFamilyGuide(every_support, families, init_strategy=init_to_uniform, **kw)
    guide.setup(KEY)
    return guide


def test_families_follow_the_support_and_overrides():
    names = {f.site.name: f.name for f in _setup().factors}
    assert names == {"m": "gaussian", "s": "gamma", "p": "beta", "w": "dirichlet", "v": "gaussian"}
    guide = _setup({"s": fam.Exponential, "p": "gaussian"})
    names = {f.site.name: (f.name, f.batch_shape) for f in guide.factors}
    assert names["s"] == ("exponential", (3,)) and names["p"] == ("gaussian", ())
    assert {f.site.name: f.batch_shape for f in _setup().factors}["w"] == ()


def test_bad_families_raise_config_errors():
    with pytest.raises(ConfigError, match=r"\['sigma'\].*\['m', 'p', 's', 'v', 'w'\]"):
        _setup({"sigma": "gamma"})
    with pytest.raises(ConfigError, match="unknown family 'wishart'"):
        ExpFamilyGuide(every_support, families={"m": "wishart"})
    with pytest.raises(ConfigError, match="site 'm' has support"):
        _setup({"m": "gamma"})
    with pytest.raises(ConfigError, match="estimator"):
        ExpFamilyGuide(every_support, estimator="reinforce")


def _one_step(name):
    """One natural step, lr = 1, from the initial factor, with the regression estimator on 8
    draws (``auto`` picks it for a single factor); the engine's gradient is not needed."""
    model, args, kwargs = models.load(name)
    guide = ExpFamilyGuide(model)
    guide.setup(KEY, args, kwargs)
    assert guide.resolved_estimator == "regression"
    params = guide.init_params(guide.target)
    ctx = StepContext(guide.base_noise(KEY, 8), (args, kwargs), None, None)
    step = jax.jit(lambda p, c: guide.natural_step(p, None, 1.0, 0.0, 0, c))
    return guide, step(params, ctx), args, kwargs


def _advi_first_within(name, tol=1e-2, num_steps=1500, every=10):
    """First ADVI step (AutoNormal + Adam(0.01), ngvi.baselines.advi) whose constrained posterior
    mean and sd are within ``tol`` (absolute) of the exact ones, checked every ``every`` steps;
    moments by Gauss-Hermite quadrature (scalar sites) or 4000 antithetic draws."""
    model, args, kwargs = models.load(name)
    svi = advi(model, *args, num_steps=1, progress_bar=False, **kwargs).svi
    site = name_site = CONJUGATE[name][0]
    exact = models.load_module(name).posterior_moments(*args, **kwargs)[name_site]

    def chunk(state, _):
        state = jax.lax.fori_loop(0, every, lambda _, s: svi.update(s, *args, **kwargs)[0], state)
        return state, svi.get_params(state)

    run = jax.jit(lambda s: jax.lax.scan(chunk, s, None, length=num_steps // every)[1])
    traj = run(svi.init(KEY, *args, **kwargs))
    loc, scale = traj[f"{site}_auto_loc"], traj[f"{site}_auto_scale"]
    if loc.ndim == 1:
        nodes, weights = hermegauss(40)
        eps, w = jnp.asarray(nodes), jnp.asarray(weights / weights.sum())
    else:
        half = jax.random.normal(KEY, (2000,) + loc.shape[1:])
        eps, w = jnp.concatenate([half, -half]), jnp.full(4000, 1 / 4000)
    support = svi.guide.prototype_trace[site]["fn"].support
    x = biject_to(support)(loc[:, None] + scale[:, None] * eps)
    shape = (-1,) + (1,) * (x.ndim - 2)
    mean = jnp.sum(w.reshape(shape) * x, 1)
    sd = jnp.sqrt(jnp.sum(w.reshape(shape) * (x - mean[:, None]) ** 2, 1))
    err = jnp.maximum(jnp.abs(mean - exact["mean"]), jnp.abs(sd - exact["sd"]))
    ok = np.asarray(err.reshape(err.shape[0], -1).max(1) <= tol)
    return int(np.argmax(ok) + 1) * every if ok.any() else None


@pytest.mark.parametrize(
    "name",
    # Beta and Dirichlet compile slow samplers (~20 s each): they run in the slow job
    [
        pytest.param(n, marks=pytest.mark.slow)
        if n in ("beta_bernoulli", "dirichlet_categorical")
        else n
        for n in CONJUGATE
    ],
)
def test_conjugate_models_in_one_natural_step(name):
    """Conjugate-computation VI (Khan & Lin 2017): log p is linear in the factor's sufficient
    statistics, so the regression estimator is exact and one unit natural step lands on the
    exact posterior; ADVI needs hundreds of steps to reach 1e-2 of its mean and sd."""
    site, keys = CONJUGATE[name]
    guide, params, args, kwargs = _one_step(name)
    (factor,) = guide.factors
    got = factor.family.standard(guide._etas(params)[0])
    exact = models.load_module(name).exact_posterior(*args, **kwargs)[site]
    for k, v in zip(keys, got):
        np.testing.assert_allclose(v, exact[k], rtol=1e-6, err_msg=k)
    advi_steps = _advi_first_within(name)
    print(f"\n{name}: NGVI 1 step; ADVI {advi_steps or '> 1500'} steps to 1e-2 of mean/sd")
    assert advi_steps is None or advi_steps > 100


def test_entropy_on_the_unconstrained_scale_matches_monte_carlo():
    """H[q_u] = H[q_x] - E log|dT/du| in closed form (exp, sigmoid and stick-breaking Jacobians)
    equals -E[log q_u(u)] over 40000 draws, for every family at once."""
    guide = _setup({"v": "gaussian"}, init_scale=0.5)
    params = guide.init_params(guide.target)
    n = 40_000
    q = guide.flat_distribution(params)  # q_u on the flat unconstrained vector

    @jax.jit
    def draw(key):  # sample_posterior's draws (without its deterministic sites), in one compile
        u = q.sample(key, (n,))
        return guide.constrain(u), q.log_prob(u)

    draws, lq = draw(KEY)
    for f in guide.factors:  # constrained draws, in the support, of the site's shape
        x = draws[f.site.name]
        assert x.shape == (n,) + f.site.shape and bool(jnp.all(f.site.support(x))), f.site.name
    assert float(guide.entropy(params)) == pytest.approx(-float(jnp.mean(lq)), abs=0.03)


@pytest.mark.slow  # ~10 s; max_kl per step is held in the default run by test_fullrank
def test_max_kl_on_gamma_poisson():
    """With max_kl every accepted step stays in the KL region (the first unit step is cut back
    to it) and the run still reaches the exact posterior. Near the optimum the regression
    direction changes the loss by less than its Monte Carlo error; the engine must not read
    those coin flips as failures (it once grew the damping to ~1e6 and froze 0.4% short)."""
    model, args, kwargs = models.load("gamma_poisson")
    exact = models.load_module("gamma_poisson").posterior_moments(*args, **kwargs)["lam"]
    guide = ExpFamilyGuide(model)
    result = NGVI(model, guide, max_kl=0.05).run(KEY, 200, *args, progress_bar=False, **kwargs)
    step_kl = np.asarray(result.info.step_kl)[np.asarray(result.info.accepted)]
    assert np.all(step_kl <= 0.05 + 1e-6) and step_kl[0] > 0.045
    a, b = guide.factors[0].family.standard(guide._etas(result.params)[0])
    assert float(a / b) == pytest.approx(float(exact["mean"]), rel=1e-4)
    assert float(jnp.sqrt(a) / b) == pytest.approx(float(exact["sd"]), rel=1e-4)
    assert float(np.max(np.asarray(result.info.damping)[-50:])) < 1.0


@pytest.mark.slow  # ~20 s of Gamma/Beta sampler compiles
def test_mixed_model_run_sample_posterior_and_predictive():
    """Eight schools: Gamma on tau, Gaussians on mu and theta_tilde, pathwise gradients
    (implicit reparameterisation for the Gamma) preconditioned by each family's closed-form
    inverse Fisher; draws lie in their supports, deterministic sites come back with the model's
    args, Predictive works."""
    model, args, kwargs = models.load("eight_schools")
    guide = ExpFamilyGuide(model)
    result = NGVI(model, guide).run(KEY, 300, *args, progress_bar=False, **kwargs)
    assert guide.resolved_estimator == "pathwise" and np.isfinite(result.losses[-1])
    draws = guide.sample_posterior(KEY, result.params, *args, sample_shape=(500,), **kwargs)
    assert draws["tau"].shape == (500,) and bool(jnp.all(draws["tau"] > 0))
    assert draws["theta_tilde"].shape == (500, 8) and draws["theta"].shape == (500, 8)
    ref = models.load_references()["models"]["eight_schools"]["sites"]["mu"]
    assert abs(float(draws["mu"].mean()) - ref["mean"][0]) < 0.3 * ref["sd"][0]
    params = guide.numpyro_params(result.params)
    pred = Predictive(model, guide=guide, params=params, num_samples=30)(KEY, *args)
    assert pred["y"].shape == (30, 8) and bool(jnp.all(jnp.isfinite(pred["y"])))


def _one_pathwise_step(model, args, kwargs, control_variate):
    """One unit natural step from the initial factor with the pathwise estimator on 8 draws,
    the gradient from the guide's ``value_and_grad`` (as the engine calls it)."""
    guide = ExpFamilyGuide(model, estimator="pathwise", control_variate=control_variate)
    guide.setup(KEY, args, kwargs)
    engine = NGVI(model, guide)
    ctx = StepContext(guide.base_noise(KEY, 8), (args, kwargs), None, None)

    def step(p, c):
        loss = lambda q: engine._neg_elbo_and_logp(q, c.eps, c.data, None)
        _, grad, _ = guide.value_and_grad(loss, p, 0, c)
        return guide.natural_step(p, grad, 1.0, 0.0, 0, c)

    return guide, jax.jit(step)(guide.init_params(guide.target), ctx)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow)
        if n in ("beta_bernoulli", "dirichlet_categorical")
        else n
        for n in CONJUGATE
    ],
)
def test_pathwise_with_the_linear_control_variate_is_exact_in_one_step(name):
    """For a conjugate site log p(u) is linear in T(u), so the leave-one-out fit of the draws'
    gradients recovers its coefficients c exactly, the residual the pathwise estimator sees is
    zero, and one unit natural step (nat = c - eta) lands on the exact posterior, as the
    regression estimator's does; plain pathwise (control_variate="none") does not."""
    model, args, kwargs = models.load(name)
    site, keys = CONJUGATE[name]
    exact = models.load_module(name).exact_posterior(*args, **kwargs)[site]
    for cv in ("loo", "none"):
        guide, params = _one_pathwise_step(model, args, kwargs, cv)
        (factor,) = guide.factors
        got = factor.family.standard(guide._etas(params)[0])
        errs = [float(jnp.max(jnp.abs(v / exact[k] - 1))) for k, v in zip(keys, got)]
        if cv == "loo":
            assert max(errs) < 1e-6, errs
        else:
            assert max(errs) > 1e-3, errs


def test_sparse_dirichlet_starts_valid_in_float64():
    """Dirichlet(0.01 ones(50)): NumPyro's median start has components far below eps (1e-56);
    eta = kappa x0 - 1 rounded to -1, alpha = 0 (the domain's edge), and NaN from step 0 in
    float64 too. The start is formed in log space with concentrations floored at 1."""

    def model(cats):
        pi = numpyro.sample("pi", dist.Dirichlet(0.01 * jnp.ones(50)))
        with numpyro.plate("c", cats.shape[0]):
            numpyro.sample("cat", dist.Categorical(pi), obs=cats)

    guide = ExpFamilyGuide(model, init_strategy=init_to_median(num_samples=15))
    guide.setup(KEY, (jnp.arange(10) % 5,))
    x0 = guide.constrain(guide.target.init_z)["pi"]
    kappa = guide.init_scale**-2
    assert float(kappa * jnp.min(x0)) < float(jnp.finfo(x0.dtype).eps)  # the start that broke it
    (alpha,) = guide.factors[0].family.standard(guide._etas(guide.init_params(guide.target))[0])
    assert bool(jnp.all(jnp.isfinite(alpha))) and float(jnp.min(alpha)) >= 1.0


def sparse_sites(counts, heads, tails, events, n):
    """Sparse Dirichlet, Beta and Gamma sites, each conjugate to its own data (factors of the
    log-likelihood written out), so the mean-field posterior is exact."""
    pi = numpyro.sample("pi", dist.Dirichlet(0.01 * jnp.ones(counts.shape[0])))
    p = numpyro.sample("p", dist.Beta(0.02, 0.02))
    lam = numpyro.sample("lam", dist.Gamma(0.05, 0.05))
    numpyro.factor("cats", jnp.sum(xlogy(counts, pi)))  # 0 log 0 = 0 for underflowed pi_k
    numpyro.factor("flips", heads * jnp.log(p) + tails * jnp.log1p(-p))
    numpyro.factor("events", events * jnp.log(lam) - n * lam)


@pytest.mark.slow  # ~30 s of compiles (Gamma / Beta / Dirichlet samplers and their gradients)
def test_sparse_sites_reach_their_exact_posteriors_in_float64():
    """Dirichlet(0.01 ones(50)) with 40 empty categories, Beta(0.02, 0.02), Gamma(0.05, 0.05)
    from NumPyro's median start: Dirichlet(0.01 + counts) x Beta(0.02 + 10, 0.02 + 2) x
    Gamma(0.05 + 4, 0.05 + 8) to 1% (tests/test_expfam_float32.py does the same in float32)."""
    counts = np.bincount(np.random.default_rng(0).integers(0, 10, 200), minlength=50)
    data = (jnp.asarray(counts, float), 10.0, 2.0, 4.0, 8.0)
    model = sparse_sites
    guide = ExpFamilyGuide(model, init_strategy=init_to_median(num_samples=15))
    result = NGVI(model, guide).run(KEY, 60, *data, progress_bar=False)
    assert bool(jnp.all(jnp.isfinite(result.losses)))
    fit = {
        f.site.name: f.family.standard(e) for f, e in zip(guide.factors, guide._etas(result.params))
    }
    exact = {"pi": (0.01 + counts,), "p": (10.02, 2.02), "lam": (4.05, 8.05)}
    for name, want in exact.items():
        for got, ref in zip(fit[name], want, strict=True):
            np.testing.assert_allclose(np.asarray(got), ref, rtol=0.01, err_msg=name)


def test_score_estimator_is_unbiased_and_its_control_variate_cuts_the_variance():
    """On the conjugate Normal-Normal site (a Gaussian factor, cheap draws) the exact natural
    gradient is eta_post - eta. The score-function estimate (8 draws, closed-form F^-1) averaged
    over 2000 seeds equals it within 5 standard errors, with the leave-one-out baseline and
    without; the baseline cuts the variance of every component more than 20-fold."""
    from ngvi.guides.expfam_estimators import score_natural_gradient

    model, args, kwargs = models.load("normal_normal")
    guide = ExpFamilyGuide(model, estimator="score")
    guide.setup(KEY, args, kwargs)
    assert guide.resolved_estimator == "score"
    params = guide.init_params(guide.target)
    (factor,) = guide.factors
    (eta,) = guide._etas(params)

    def both(key):
        ctx = StepContext(guide.base_noise(key, 8), (args, kwargs), None, None)
        nat = guide._natural_gradients(params, None, ctx)[0]  # the guide's path: loo baseline
        xs, logp = guide._draws_and_log_density(params, ctx)
        stats = factor.family.flatten(factor.family.sufficient_stats(xs["mu"]))
        plain = score_natural_gradient(factor.family, eta, stats, logp, "none")
        return jnp.stack(nat), jnp.stack(plain)

    loo, plain = jax.jit(jax.vmap(both))(jax.random.split(KEY, 2000))
    post = models.load_module("normal_normal").exact_posterior(*args, **kwargs)["mu"]
    exact = jnp.stack(fam.DiagGaussian.from_standard(post["loc"], post["scale"])) - jnp.stack(eta)
    for draws in (loo, plain):
        se = jnp.std(draws, 0) / jnp.sqrt(draws.shape[0])
        assert bool(jnp.all(jnp.abs(jnp.mean(draws, 0) - exact) < 5 * se)), (draws.mean(0), exact)
    ratio = jnp.var(plain, 0) / jnp.var(loo, 0)
    print(f"\nscore estimator variance without / with the baseline: {ratio}")
    assert bool(jnp.all(ratio > 20))


def test_estimator_per_site_and_auto_fallbacks():
    """A dict picks the estimator per site (others 'auto' -> pathwise with several factors);
    'auto' on a single factor is regression only with >= k + 1 particles, else pathwise; bad
    names and unknown sites raise."""
    guide = _setup(estimator={"s": "score", "p": "regression"})
    used = {f.site.name: guide.estimator_for(f, 8) for f in guide.factors}
    assert used == {"m": "pathwise", "s": "score", "p": "regression", "w": "pathwise",
                    "v": "pathwise"}  # fmt: skip
    assert guide.resolved_estimator == "mixed"

    def one_gamma():
        numpyro.sample("lam", dist.Gamma(2.0, 1.0))

    single = ExpFamilyGuide(one_gamma, init_strategy=init_to_uniform)
    single.setup(KEY)
    (factor,) = single.factors
    assert single.estimator_for(factor, 3) == "regression"
    assert single.estimator_for(factor, 2) == "pathwise"
    with pytest.raises(ConfigError, match="estimator for site 's' must be one of"):
        ExpFamilyGuide(every_support, estimator={"s": "reinforce"})
    with pytest.raises(ConfigError, match="estimator names site"):
        _setup(estimator={"sigma": "score"})
    with pytest.raises(ConfigError, match="control_variate"):
        ExpFamilyGuide(every_support, control_variate="optimal")


@pytest.mark.slow  # a 400-step NGVI run with a Gamma factor (~20 s of compiles)
def test_mean_field_guide_reaches_the_cavi_fixed_point_not_the_normal_gamma_posterior():
    """models.normal_gamma: the exact posterior is Normal-Gamma (one joint natural step reaches
    it, tests/test_families.py); the mean-field ExpFamilyGuide (Gaussian mu, Gamma tau) reaches
    the closed-form CAVI fixed point instead (measured within 1%), whose sd(mu) is 4% below the
    exact one. The fixed point is asked for, so the run is not stopped at the 0.1-nat tolerance:
    with it the fit stops at step 23 with sd(mu) 8% above CAVI's (0.006 nat of ELBO)."""
    model, args, kwargs = models.load("normal_gamma")
    module = models.load_module("normal_gamma")
    guide = ExpFamilyGuide(model)
    result = NGVI(model, guide).run(KEY, 400, *args, progress_bar=False, tol=None, **kwargs)
    etas = guide._etas(result.params)
    fit = {f.site.name: f.family.standard(eta) for f, eta in zip(guide.factors, etas)}
    cavi = module.mean_field_optimum(*args, **kwargs)
    exact_sd = float(module.posterior_moments(*args, **kwargs)["mu"]["sd"])
    loc, scale = (float(v) for v in fit["mu"])
    a, b = (float(v) for v in fit["tau"])
    assert abs(loc - cavi["mu"]["loc"]) < 0.1 * cavi["mu"]["scale"]
    assert scale == pytest.approx(cavi["mu"]["scale"], rel=0.02) and scale < 0.98 * exact_sd
    tau_mean = cavi["tau"]["concentration"] / cavi["tau"]["rate"]
    assert a / b == pytest.approx(tau_mean, rel=0.03)
    assert a == pytest.approx(cavi["tau"]["concentration"], rel=0.05)
