"""The NGVI engine with the mean-field guide: exact posteriors, NUTS references, the run API,
damping and rejected steps, and the errors for bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Predictive

import ngvi
from ngvi import NGVI, ConfigError, DataError, MeanFieldGaussian, ModelError, models
from ngvi.numerics.lapack import batched_lapack
from ngvi.report.scoring import make_elbo_scorer, meanfield_optimum

jax.config.update("jax_enable_x64", True)

pytestmark = pytest.mark.x64  # float64 in this module only (tests/conftest.py)


def fit(name, steps, tol=0.1, **engine_kw):
    model, args, kwargs = models.load(name)
    guide = MeanFieldGaussian(model)
    result = NGVI(model, guide, **engine_kw).run(
        jax.random.PRNGKey(0), steps, *args, progress_bar=False, tol=tol, **kwargs
    )
    return model, guide, result, args, kwargs


def test_normal_normal_exact_posterior():
    """300 steps (no convergence check: the default tol=0.1 nat stops at 20, within 1e-4 nat of
    the optimum but not yet at 1e-3 relative in the scale, which this test asks for)."""
    model, guide, result, args, kwargs = fit("normal_normal", 300, tol=None)
    mod = models.load_module("normal_normal")
    exact = mod.posterior_moments(*args, **kwargs)["mu"]
    loc, scale = float(result.params["loc"][0]), float(result.params["scale"][0])
    assert loc == pytest.approx(float(exact["mean"]), rel=1e-3)
    assert scale == pytest.approx(float(exact["sd"]), rel=1e-3)
    assert result.losses.shape == (300,) and result.num_steps == 300


def _site_means(guide, params, n=20_000):
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, sample_shape=(n,))
    return {k: np.asarray(v).reshape(n, -1).mean(0) for k, v in draws.items()}


@pytest.mark.parametrize(
    "name,steps",
    [
        # slow: ~13 s; the zoo's rule tests hold default fits to their optima in the default run
        pytest.param("eight_schools", 400, marks=pytest.mark.slow),
        # slow: ~25 s; test_fullrank holds logistic regression to NUTS in the default run
        pytest.param("logistic_regression", 1000, marks=pytest.mark.slow),
    ],
)
def test_posterior_means_match_nuts(name, steps):
    """NGVI reaches the mean-field family optimum (BFGS on a fixed-noise ELBO), and its posterior
    means are within 0.1 NUTS sd of NUTS wherever the mean-field family itself can be: the family
    optimum's own error (eight schools' tau, 0.22 sd; some correlated logistic weights, up to 0.2
    sd) is a limit of mean-field Gaussians, which the full-rank guide removes. All ``steps`` run
    (``tol=None``): a fit stopped at its 0.1-nat check may sit 0.06 sd from the optimum's means
    (measured: eight schools from the warm start), which costs it under 0.01 nat."""
    model, guide, result, args, kwargs = fit(name, steps, tol=None)
    score = make_elbo_scorer(guide.target, args, kwargs)
    loc, scale, best = meanfield_optimum(score, result.params["loc"], result.params["scale"])
    assert best - float(score(result.params["loc"], result.params["scale"])) < 0.1
    ref = models.load_references()["models"][name]["sites"]
    ours = _site_means(guide, result.params)
    family = _site_means(guide, {"loc": loc, "scale": scale})
    checked = []
    for site, r in ref.items():
        sd, nuts_mean = np.asarray(r["sd"]), np.asarray(r["mean"])
        assert np.max(np.abs(ours[site] - family[site]) / sd) < 0.05, site
        reachable = np.abs(family[site] - nuts_mean) / sd < 0.08
        err = np.abs(ours[site] - nuts_mean) / sd
        assert np.all(err[reachable] < 0.1), (site, err)
        checked.extend(reachable)
    assert np.mean(checked) >= 0.5  # most coordinates are held to the NUTS tolerance


def test_run_result_api_and_no_recompile():
    model, args, kwargs = models.load("eight_schools")
    guide = MeanFieldGaussian(model)
    engine = NGVI(model, guide)
    state = engine.init(jax.random.PRNGKey(0), *args, **kwargs)
    state, loss = engine.update(state, *args, **kwargs)
    assert np.isfinite(loss) and int(state.step) == 1
    run = dict(progress_bar=False, tol=None)  # every step: the check could end a run early
    r1 = engine.run(None, 30, *args, init_state=state, **run, **kwargs)
    r2 = engine.run(None, 30, *args, init_state=r1.state, **run, **kwargs)
    assert int(r2.state.step) == 61
    (fn,) = [f for k, f in engine._jitted.items() if k[0] == "run"]
    assert fn._cache_size() == 1  # the second run reused the compiled chunk
    assert np.isfinite(engine.evaluate(r2.state, *args, **kwargs))
    params = engine.get_params(r2.state)
    pred = Predictive(
        model,
        guide=guide,
        params=guide.numpyro_params(params),
        num_samples=50,
        return_sites=["tau", "y"],
    )
    out = pred(jax.random.PRNGKey(2), *args, **kwargs)
    assert out["tau"].shape == (50,) and np.all(out["tau"] > 0)
    assert out["y"].shape == (50, 8)
    draws = guide.sample_posterior(jax.random.PRNGKey(3), params, sample_shape=(7,))
    # without the model's args the deterministic "theta" comes from the setup data (AutoNormal)
    assert set(draws) == {"mu", "tau", "theta_tilde", "theta"}
    assert draws["theta_tilde"].shape == (7, 8)
    with_det = guide.sample_posterior(
        jax.random.PRNGKey(3), params, *args, sample_shape=(7,), **kwargs
    )
    assert with_det["theta"].shape == (7, 8)


def test_tolerance_stops_early_and_reports_the_step():
    model, guide, result, args, kwargs = fit("normal_normal", 2000)
    engine = NGVI(model, guide)
    r = engine.run(jax.random.PRNGKey(0), 2000, *args, tol=1e-6, progress_bar=False, **kwargs)
    assert r.converged and r.num_steps < 2000
    assert r.losses.shape == (r.num_steps,) and int(r.state.step) == r.num_steps


def _mvn_with_data_cov(cov):
    numpyro.sample("z", dist.MultivariateNormal(jnp.zeros(cov.shape[0]), cov))


def _computations(hlo: str) -> dict[str, str]:
    """An optimized HLO module's computations, name -> body text."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name, bodies[head.group(1)] = head.group(1), ""
        elif name is not None:
            bodies[name] += line + "\n"
    return bodies


def _reachable(bodies: dict[str, str], root: str) -> set[str]:
    """The computations ``root`` calls, itself included (fusions, conditionals' branches,
    nested loops...)."""
    calls = r"(?:calls|to_apply|body|condition|branch_computations|true_computation|" + (
        r"false_computation)=(\{[^}]*\}|%[\w.\-]+)"
    )
    seen, todo = set(), [root]
    while todo:
        c = todo.pop()
        if c not in seen and c in bodies:
            seen.add(c)
            todo += re.findall(r"%([\w.\-]+)", " ".join(re.findall(calls, bodies[c])))
    return seen


def test_run_loop_hoists_data_only_work_out_of_its_steps():
    """A model whose data only enter through a Cholesky factor (``MultivariateNormal`` given its
    covariance as data): the compiled run chunk factors it once, outside its loop. Stepping
    through ``lax.cond(done, pad, step)`` in a scan factored it on every step (XLA does not hoist
    out of a conditional's branch; fails on 6a70c0d). The run still stops where ``update`` would
    and its steps are ``update``'s, bit for bit."""
    d = 20
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    cov = jnp.asarray((q * np.logspace(-1, 1, d)) @ q.T)
    engine = NGVI(_mvn_with_data_cov, MeanFieldGaussian(_mvn_with_data_cov))
    state = engine.init(jax.random.PRNGKey(0), cov)
    dynamic, spec = ngvi.model.target.split_data((cov,), {})
    fn = engine._compiled("run", spec, 10)
    hlo = fn.lower(state, dynamic, jnp.asarray(-1.0), state.step + 10).compile().as_text()
    assert "potrf" in hlo  # the factorization is in the program...
    bodies = _computations(hlo)
    (body,) = re.findall(r"while\(.*?body=%([\w.\-]+)", hlo)
    assert not [c for c in _reachable(bodies, body) if "potrf" in bodies[c]]  # ...not in the loop
    stepped = state
    for _ in range(7):
        stepped, _ = engine.update(stepped, cov)
    ran, info = fn(state, dynamic, jnp.asarray(-1.0), state.step + 7)
    assert int(ran.step) == 7 and np.asarray(info.ran).tolist() == [True] * 7 + [False] * 3
    for a, b in zip(jax.tree.leaves(ran.params), jax.tree.leaves(stepped.params)):
        np.testing.assert_array_equal(a, b)


def _mvn_with_latent_scale(chol):
    amp = numpyro.sample("amp", dist.HalfNormal(1.0))
    numpyro.sample("f", dist.MultivariateNormal(jnp.zeros(chol.shape[0]), scale_tril=amp * chol))


def _run_loop(model, arg) -> tuple[bool, str]:
    """(batched LAPACK in the step, the run chunk's loop primitive), after checking 40 steps."""
    engine = NGVI(model, MeanFieldGaussian(model))
    state = engine.init(jax.random.PRNGKey(0), arg)
    data = ((arg,), {})
    batched = batched_lapack(lambda s: engine._step(s, data), state)
    jaxpr = jax.make_jaxpr(lambda s: engine._scan(s, data, -1.0, s.step + 5, 5))(state)
    (loop,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("scan", "while")]
    result = engine.run(jax.random.PRNGKey(1), 40, arg, progress_bar=False, tol=None)
    assert result.num_steps == 40 and np.all(np.isfinite(result.losses))
    return batched, loop.primitive.name


def test_steps_with_batched_lapack_keep_the_scan_of_conditionals():
    """A prior factored per draw (the zoo's LGCP: a latent amplitude times a fixed Cholesky
    factor) makes batched LAPACK calls, which froze jaxlib 0.10.2 when the run chunk's while
    loop let XLA run two at once: such a step stays in a scan of ``lax.cond`` (its loop body is
    a conditional); a fixed covariance applied to many draws is one call and gets the loop."""
    chol = jnp.linalg.cholesky(jnp.eye(6) + 0.5)
    assert _run_loop(_mvn_with_latent_scale, chol) == (True, "scan")
    assert _run_loop(_mvn_with_data_cov, chol @ chol.T) == (False, "while")


def _sized_model(n, y=None):
    """``n`` a Python int: a shape, which must stay static through the run loop."""
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(n), 1.0).to_event(1))
    numpyro.sample("y", dist.Normal(jnp.sum(mu), 1.0), obs=y)


def test_static_data_stay_static_in_the_run_loop():
    """The run chunk traces its step to choose its loop: a Python int among the data (a size)
    must reach the model as a Python int (traced as data it raised "Shapes must be 1D sequences
    of concrete values" on 1f25946, and the zoo's radon, IRT and GMM fits with it)."""
    engine = NGVI(_sized_model, MeanFieldGaussian(_sized_model))
    result = engine.run(
        jax.random.PRNGKey(0), 50, 3, y=jnp.asarray(1.0), progress_bar=False, tol=None
    )
    assert result.params["loc"].shape == (3,) and np.all(np.isfinite(result.losses))


def test_non_finite_step_is_rejected_and_damping_rises():
    """The log density is NaN beyond z = 1 while its optimum is at 5: the unit step overshoots
    into the NaN region, is rejected (parameters kept bit for bit) and the damping rises until
    the steps stay finite."""

    def model():
        z = numpyro.sample("z", dist.Normal(0, 10))
        numpyro.factor("f", jnp.where(z < 1.0, -0.5 * 100 * (z - 5.0) ** 2, jnp.nan))

    start = numpyro.infer.init_to_value(values={"z": 0.0})
    guide = MeanFieldGaussian(model, init_scale=0.1, init_strategy=start)  # exact precision 100
    engine = NGVI(model, guide)
    state = engine.init(jax.random.PRNGKey(0))
    new, _ = engine.update(state)
    assert int(new.num_rejected) == 1
    assert np.array_equal(new.params["loc"], state.params["loc"])
    assert float(new.damping) > float(state.damping)
    r = engine.run(None, 100, init_state=new, progress_bar=False)
    assert np.all(np.isfinite(r.params["loc"])) and float(r.params["loc"][0]) < 1.0
    assert r.num_rejected >= 1


def test_log_density_nan_everywhere_names_the_site():
    def model():
        z = numpyro.sample("z", dist.Normal(0, 1))
        numpyro.factor("bad_term", jnp.where(z > -100, jnp.nan, 0.0))

    with pytest.raises(ModelError, match=r"not finite at any .*'bad_term'"):
        NGVI(model, MeanFieldGaussian(model)).init(jax.random.PRNGKey(0))


def test_fit_error_keeps_last_good_state():
    def model():
        z = numpyro.sample("z", dist.Normal(0, 1))
        # finite only very near the start point: every step leaves it
        numpyro.factor("f", jnp.where(jnp.abs(z) < 1e-3, 0.0, jnp.nan))

    guide = MeanFieldGaussian(
        model, init_scale=1.0, init_strategy=numpyro.infer.init_to_value(values={"z": 0.0})
    )
    engine = NGVI(model, guide, max_rejections=5)
    with pytest.raises(ngvi.FitError, match="5 consecutive steps were rejected") as err:
        engine.run(jax.random.PRNGKey(0), 50, progress_bar=False)
    assert "ELBO or its gradient is not finite at the current parameters" in str(err.value)
    res = err.value.result
    assert res is not None and np.all(np.isfinite(res.state.params["loc"]))
    assert np.all(np.asarray(res.info.reason) == 1)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"lr": 0.0}, "lr must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"damping": -0.1}, "damping must"),
        ({"num_particles": 0}, "num_particles must"),
    ],
)
def test_invalid_hyperparameters_raise(kw, match):
    model, _, _ = models.load("normal_normal")
    with pytest.raises(ConfigError, match=match):
        NGVI(model, MeanFieldGaussian(model), **kw)


def test_model_errors_name_the_site():
    def discrete():
        k = numpyro.sample("k", dist.Poisson(3.0))
        numpyro.sample("y", dist.Normal(k, 1.0), obs=1.0)

    def improper():
        numpyro.sample("u", dist.ImproperUniform(dist.constraints.real, (), ()))

    def no_latent(y):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    for model, args, match in [
        (discrete, (), "latent site 'k' is discrete"),
        (improper, (), "site 'u' has an improper prior"),
        (no_latent, (1.0,), "no latent sample site"),
    ]:
        with pytest.raises(ModelError, match=match):
            NGVI(model, MeanFieldGaussian(model)).init(jax.random.PRNGKey(0), *args)


def test_data_errors_name_the_site_and_value():
    def model(y):
        lam = numpyro.sample("lam", dist.Gamma(2.0, 1.0))
        numpyro.sample("y", dist.Poisson(lam), obs=y)

    engine = NGVI(model, MeanFieldGaussian(model))
    with pytest.raises(DataError, match=r"'y' has value -1.0 at index \(2,\)"):
        engine.init(jax.random.PRNGKey(0), jnp.array([1.0, 2.0, -1.0]))
    with pytest.raises(DataError, match="'y' holds a non-finite value"):
        engine.init(jax.random.PRNGKey(0), jnp.array([1.0, jnp.nan]))


def test_guide_for_another_model_is_refused():
    model, args, kwargs = models.load("eight_schools")
    other, _, _ = models.load("normal_normal")
    with pytest.raises(ConfigError, match="another model"):
        NGVI(model, MeanFieldGaussian(other))


@pytest.mark.slow  # ~5 s of 1e6-dim arrays; O(d) memory is also shown by bench_scale
def test_meanfield_scales_to_a_million_latent_dimensions():
    """Mean-field never builds a d x d array: a 1e6-dimensional latent fits and steps."""
    d = 1_000_000

    def model():
        with numpyro.plate("d", d):
            numpyro.sample("z", dist.Normal(1.0, 2.0))

    engine = NGVI(model, MeanFieldGaussian(model), num_particles=2)
    r = engine.run(jax.random.PRNGKey(0), 3, progress_bar=False, chunk_size=3, tol=None)
    assert r.params["loc"].shape == (d,) and np.all(np.isfinite(r.params["scale"]))


def test_mc_error_averages_antithetic_pairs_first():
    """The accept rule's Monte Carlo error: pairs (k, k + K/2) are one unit, so a difference that
    is odd in the noise has no error, and independent units give std / sqrt(n)."""
    from ngvi.engine.step import mc_error as _mc_error

    half = jnp.array([0.3, -1.2, 2.0, 0.7])
    assert float(_mc_error(jnp.concatenate([half, -half]))) == 0.0
    units = jnp.array([1.0, 2.0, 4.0, 7.0])
    expected = float(np.std(np.asarray(units), ddof=1) / 2.0)
    assert float(_mc_error(jnp.concatenate([units, units]))) == pytest.approx(expected)
    assert float(_mc_error(jnp.array([1.0, 2.0, 4.0]))) == pytest.approx(
        float(np.std([1.0, 2.0, 4.0], ddof=1) / np.sqrt(3))
    )
    assert float(_mc_error(jnp.array([5.0]))) == 0.0
