"""Honest fits (issue 17): ``converged=True`` means within ``tol`` of the family optimum, a
rejected or frozen step is never progress, a fit that is not converged says why and how to fix
it, a draw where the log density is NaN is dropped rather than damped, and the default start is
chosen among NumPyro's strategies by the ELBO.

float64 (the conjugate optima are compared to 0.1 nat of a closed form)."""

import math
import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import init_to_median, init_to_value
from scipy import special, stats

from ngvi import (
    NGVI,
    ConvergenceWarning,
    ExpFamilyGuide,
    FullRankGaussian,
    MeanFieldGaussian,
    NGVIWarning,
    models,
)
from ngvi.engine import probe
from ngvi.engine.diagnose import CAUSES, fit_error_message
from ngvi.engine.infer import NGVIInfo
from ngvi.engine.probe import newton_direction
from ngvi.engine.step import (
    NOT_FINITE_HERE,
    Verdict,
    check_due,
    convergence_bound,
    copy_weights,
    effective_progress,
    levenberg_marquardt,
    unfused,
    value_and_grad_dropping_non_finite,
)
from ngvi.report.scoring import make_elbo_scorer, meanfield_optimum

jax.config.update("jax_enable_x64", True)

pytestmark = pytest.mark.x64

KEY = jax.random.PRNGKey(0)


def _run(engine, *args, steps=2000, seed=0, **kwargs):
    """``engine.run`` with its warnings recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine.run(jax.random.PRNGKey(seed), steps, *args, progress_bar=False, **kwargs)
    return result, [w for w in caught if issubclass(w.category, NGVIWarning)]


# -- the pure pieces -----------------------------------------------------------------------------
def test_progress_counts_accepted_undamped_steps_only():
    """A rejected step adds nothing; a step damped to 1/(1 + d) of a natural step adds that."""
    assert float(effective_progress(jnp.array(False), 1.0, 0.0)) == 0.0
    assert float(effective_progress(jnp.array(True), 1.0, 0.0)) == 1.0
    assert float(effective_progress(jnp.array(True), 1.0, 3.0)) == 0.25
    assert float(effective_progress(jnp.array(True), 0.5, 1.0)) == 0.25  # trust region t
    assert float(effective_progress(jnp.array(True), 1.0, 3e37)) < 1e-30
    # checks at 10, 20, 30, 45, 67.5, ...: the window is the last third of the run
    assert not check_due(9.9, 0.0, 10.0, 1.5) and check_due(10.0, 0.0, 10.0, 1.5)
    assert not check_due(44.9, 30.0, 10.0, 1.5) and check_due(45.0, 30.0, 10.0, 1.5)


def test_convergence_bound_reads_the_tail():
    """Twice the last change's upper bound for a 1/P tail; more when the last two changes show a
    slower tail (the ratio read at the last change's upper bound); infinite when the fit may not
    have slowed down; NaN is never converged."""
    assert convergence_bound(0.01, 0.005, math.nan, math.nan) == pytest.approx(0.04)
    assert convergence_bound(0.01, 0.005, 0.009, 0.01) == pytest.approx(0.04)  # flat before
    assert convergence_bound(0.01, 0.0, 0.1, 0.0) == pytest.approx(0.02)  # fast: factor 2
    slow = convergence_bound(0.06, 0.01, 0.1, 0.01)  # r = (0.06 + 0.02) / 0.1: r / (1 - r) = 4
    assert slow == pytest.approx(4 * 0.08)
    # a creep gaining ~0.043 nat a window (1.2 nat from its optimum) whose last window came out
    # low by noise: the point ratio 0.55 would give 2 * 0.047 < 0.1; its upper bound is >= 1
    assert convergence_bound(0.0236, 0.0117, 0.0427, 0.0168) == math.inf
    # a previous window 1.8 se above zero is not flat (a centred funnel, 0.12 nat from its
    # optimum: factor 2 would pass it at 0.072)
    assert convergence_bound(0.0058, 0.0149, 0.0299, 0.0163) == math.inf
    assert convergence_bound(0.1, 0.0, 0.1, 0.0) == math.inf
    assert convergence_bound(-0.2, 0.0, 0.1, 0.0) == math.inf  # worse than before: not slowing
    assert convergence_bound(math.nan, 0.0, 0.1, 0.0) == math.inf


def test_non_finite_draws_get_weight_zero_whole_pairs():
    """Bad draws (and their antithetic partners) are dropped: their weight moves to the first
    good pair, which is what the draws ``source`` hold."""
    logp = jnp.array([1.0, jnp.nan, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])  # pair (1, 5) is bad
    w, source = copy_weights(logp)
    np.testing.assert_array_equal(source, [0, 0, 2, 3, 4, 4, 6, 7])
    np.testing.assert_array_equal(w, [2, 0, 1, 1, 2, 0, 1, 1])
    assert float(jnp.sum(w)) == 8
    _, source = copy_weights(jnp.full(4, jnp.nan))  # nothing to keep: unchanged
    np.testing.assert_array_equal(source, [0, 1, 2, 3])


def test_dropped_draws_leave_no_nan_in_the_gradient():
    """log p = -exp(z) overflows to -inf at one draw: a masked sum's gradient is NaN there
    (0 * inf in the backward pass), the engine's is the gradient over the kept draws."""
    eps = jnp.array([-1.0, 0.5, 800.0, 1.0, -0.5, -800.0])  # pairs (k, k + 3); pair 2 overflows
    reparam = lambda p: p["loc"] + eps[:, None]
    log_density = lambda z: -jnp.exp(z[0])
    entropy = lambda p: jnp.zeros(())
    params = {"loc": jnp.zeros(1)}
    (loss, logp), grad, source = value_and_grad_dropping_non_finite(
        reparam, log_density, entropy, params
    )
    np.testing.assert_array_equal(source, [0, 1, 0, 3, 4, 3])
    kept = jnp.array([-1.0, 0.5, -1.0, 1.0, -0.5, 1.0])  # pair 0 copied into pair 2
    assert float(loss) == pytest.approx(float(jnp.mean(jnp.exp(kept))))
    assert float(grad["loc"][0]) == pytest.approx(float(jnp.mean(jnp.exp(kept))))
    np.testing.assert_allclose(logp, -jnp.exp(kept))

    def masked(p):
        lp = jax.vmap(log_density)(reparam(p))
        return -jnp.mean(jnp.where(jnp.isfinite(lp), lp, 0.0))

    assert np.isnan(float(jax.grad(masked)(params)["loc"][0])), "why the chain rule is explicit"


def test_damping_is_untouched_when_the_current_point_is_not_finite():
    """A non-finite loss at the current parameters is not the step length's fault."""
    verdict = Verdict(jnp.array(False), jnp.nan, jnp.nan, jnp.array(True), NOT_FINITE_HERE)
    assert float(levenberg_marquardt(jnp.asarray(0.3), verdict, 0.0)) == pytest.approx(0.3)
    worse = verdict._replace(reason=jnp.asarray(4))
    assert float(levenberg_marquardt(jnp.asarray(0.3), worse, 0.0)) == pytest.approx(1.2)


@pytest.mark.parametrize("reason", [1, 2, 3, 4])
def test_fit_error_message_names_cause_damping_and_fix(reason):
    class Engine:
        max_rejections = 50

    state = type("S", (), {"step": 80, "damping": jnp.asarray(3e37)})()
    info = NGVIInfo(*(jnp.zeros(3),) * 4, jnp.full(3, reason), jnp.zeros(3, int), jnp.ones(3))
    msg = fit_error_message(Engine, state, info)
    assert "50 consecutive steps were rejected at step 80 (damping 3e+37)" in msg
    assert CAUSES[reason] in msg
    assert any(fix in CAUSES[reason] for fix in ("try float64", "lower lr")), CAUSES[reason]


# -- rejected steps are not progress ---------------------------------------------------------------
def walled():
    """N(3, 0.1) behind a NaN wall at |z| = 0.05: every step toward the optimum from z = 0 leaves
    the finite region, so steps are rejected and the damping grows until they are frozen at the
    wall. The old rule (the KL between averaged iterates below tol for 10 steps, rejected steps
    included) called such a fit converged."""
    z = numpyro.sample("z", dist.Normal(0.0, 10.0))
    numpyro.factor("f", jnp.where(jnp.abs(z) < 0.05, -50.0 * (z - 3.0) ** 2, jnp.nan))


def test_rejections_and_frozen_steps_never_converge():
    start = init_to_value(values={"z": 0.0})
    guide = MeanFieldGaussian(walled, init_scale=1e-3, init_strategy=start)
    result, caught = _run(NGVI(walled, guide), steps=60)
    assert not result.converged
    assert result.num_rejected > 10 and float(result.state.progress) < 20.0
    assert float(np.max(np.asarray(result.info.damping))) > 10.0
    (warning,) = [w for w in caught if w.category is ConvergenceWarning]
    msg = str(warning.message)
    assert "steps were rejected and the damping grew to" in msg
    assert "try float64" in msg, "names a fix"


# -- converged means within tol of the optimum ---------------------------------------------------
def _normal_normal_elbo(y, loc: float, scale: float) -> tuple[float, float]:
    """(ELBO of N(loc, scale^2), log p(y)) in closed form: ELBO = log p(y) - KL(q || posterior)."""
    mod = models.load_module("normal_normal")
    y = np.asarray(y, np.float64)
    cov = mod.SIGMA**2 * np.eye(y.size) + mod.S0**2
    evidence = float(stats.multivariate_normal(np.full(y.size, mod.M0), cov).logpdf(y))
    post = mod.exact_posterior(y)["mu"]
    r2 = (scale / post["scale"]) ** 2
    kl = 0.5 * (r2 + ((loc - post["loc"]) / post["scale"]) ** 2 - 1.0 - np.log(r2))
    return evidence - kl, evidence


def _conjugate_evidence(name, y) -> float:
    """log p(y) in closed form: Beta-Bernoulli, Gamma-Poisson."""
    mod = models.load_module(name)
    y = np.asarray(y, np.float64)
    if name == "beta_bernoulli":
        s, n = y.sum(), y.size
        return float(special.betaln(mod.A0 + s, mod.B0 + n - s) - special.betaln(mod.A0, mod.B0))
    a, b, s, n = mod.A0, mod.B0, y.sum(), y.size
    return float(
        a * np.log(b)
        - special.gammaln(a)
        + special.gammaln(a + s)
        - (a + s) * np.log(b + n)
        - special.gammaln(y + 1).sum()
    )


def test_converged_fit_is_within_tol_of_the_exact_optimum():
    """Mean-field holds the normal-normal posterior, so the family optimum is log p(y) and the
    fit's gap is the closed-form KL to the posterior."""
    model, args, kwargs = models.load("normal_normal")
    guide = MeanFieldGaussian(model)
    result, caught = _run(NGVI(model, guide), *args, steps=1000, **kwargs)
    assert result.converged and not caught and result.num_steps < 100
    loc, scale = float(result.params["loc"][0]), float(result.params["scale"][0])
    elbo, evidence = _normal_normal_elbo(kwargs["y"], loc, scale)
    assert 0.0 <= evidence - elbo < 0.1


@pytest.mark.slow  # 6 fits, ~10 s each
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", ["normal_normal", "beta_bernoulli", "gamma_poisson"])
def test_converged_mean_field_fit_is_within_tol_of_the_family_optimum(name, seed):
    """The family optimum: log p(y) where the family holds the posterior (normal-normal), else
    BFGS on a 4096-draw fixed-noise ELBO (whose own noise is far below 0.1 nat here)."""
    model, args, kwargs = models.load(name)
    guide = MeanFieldGaussian(model)
    result, caught = _run(NGVI(model, guide), *args, steps=1000, seed=seed, **kwargs)
    assert result.converged and not caught and result.num_steps < 200
    if name == "normal_normal":
        loc, scale = float(result.params["loc"][0]), float(result.params["scale"][0])
        elbo, best = _normal_normal_elbo(kwargs["y"], loc, scale)
    else:
        score = make_elbo_scorer(guide.target, args, kwargs)
        elbo = float(score(result.params["loc"], result.params["scale"]))
        best = meanfield_optimum(score, result.params["loc"], result.params["scale"])[2]
    assert best - elbo < 0.1


def _funnel(dim: int = 9):
    """Neal's funnel: v ~ N(0, 3), x_i | v ~ N(0, exp(v / 2))."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(jnp.zeros(dim), jnp.exp(v / 2.0)).to_event(1))


def _fullrank_gap(engine, params, draws: int = 4096) -> float:
    """ELBO of the full-rank family optimum minus the fit's, on one fixed-noise float64 ELBO
    (``draws`` draws; L-BFGS from the fit over ``loc`` and the lower triangle of ``L``)."""
    from scipy import optimize

    d = params["loc"].shape[0]
    low = np.tril_indices(d)
    eps = jnp.asarray(engine.guide.base_noise(jax.random.PRNGKey(7), draws), jnp.float64)

    def unpack(v):
        return {"loc": v[:d], "prec_tril": jnp.zeros((d, d)).at[low].set(v[d:])}

    loss = jax.jit(jax.value_and_grad(lambda v: engine._neg_elbo(unpack(v), eps, ((), {}), None)))
    v0 = np.concatenate([np.asarray(params["loc"]), np.asarray(params["prec_tril"])[low]])
    fun = lambda v: tuple(np.asarray(a, np.float64) for a in loss(jnp.asarray(v)))
    best = optimize.minimize(fun, v0, jac=True, method="L-BFGS-B", options={"maxiter": 5000})
    return float(fun(v0)[0]) - float(best.fun)


# Neal's funnel: session 13's silent miss. The check's tail bound assumes the average relaxes
# within a window; here a fast transient is followed by a crawl along the funnel's ridge for ~1000
# steps, and checks passed 0.14-0.30 nat off. The Newton probe (ngvi.engine.probe) refutes them.
@pytest.mark.slow  # ~10 s each
@pytest.mark.parametrize(
    ("family", "particles", "seed"),
    [("meanfield", 32, 1), ("meanfield", 32, 2), ("meanfield", 8, 1), ("fullrank", 8, 1)],
)
def test_converged_funnel_fit_is_within_tol_of_the_family_optimum(family, particles, seed):
    """Neal's funnel (d = 10): a fit that reports converged is within 0.1 nat of the family
    optimum (L-BFGS on a 4096-draw fixed-noise ELBO), and on these seeds it got there because the
    probe refuted an earlier pass (measured in float32 and float64 without the probe: mean-field
    converged at step 20-30 0.14-0.30 nat off with 32 particles, at step 102 0.21 off with 8;
    full rank at step 102, 0.21 off)."""
    guide = (MeanFieldGaussian if family == "meanfield" else FullRankGaussian)(_funnel)
    engine = NGVI(_funnel, guide, num_particles=particles)
    result, caught = _run(engine, steps=3000, seed=seed)
    assert result.converged and not caught
    refuted = [c for c in result.checks if math.isfinite(c.probe_gain) and not c.passed]
    assert refuted and refuted[0].probe_gain - 2 * refuted[0].probe_se > 0.05, result.checks
    if family == "meanfield":
        score = make_elbo_scorer(guide.target, (), {})
        loc, scale = result.params["loc"], result.params["scale"]
        gap = meanfield_optimum(score, loc, scale)[2] - float(score(loc, scale))
    else:
        gap = _fullrank_gap(engine, result.params)
    assert gap < 0.1


@pytest.mark.slow
def test_without_the_probe_the_funnel_fit_passes_far_from_its_optimum(monkeypatch):
    """What the probe is for (the test above could fail): without it the same mean-field fit
    reports converged 0.1-0.3 nat from the family optimum."""
    monkeypatch.setattr(MeanFieldGaussian, "probed", property(lambda self: False))
    guide = MeanFieldGaussian(_funnel)
    result, _ = _run(NGVI(_funnel, guide, num_particles=32), steps=3000, seed=1)
    score = make_elbo_scorer(guide.target, (), {})
    loc, scale = result.params["loc"], result.params["scale"]
    gap = meanfield_optimum(score, loc, scale)[2] - float(score(loc, scale))
    assert result.converged and result.num_steps < 100 and gap > 0.1


# -- the Newton probe's pieces (ngvi.engine.probe) -------------------------------------------------
def test_newton_direction_is_newtons_step_and_stops_at_negative_curvature():
    """Preconditioned CG reaches ``-H^-1 g`` of a quadratic in ``d`` iterations whatever the
    (positive) preconditioner; on an indefinite quadratic whose first direction has negative
    curvature it returns no step; a NaN Hessian product gives no step either."""
    rng = np.random.RandomState(0)
    a = rng.normal(size=(6, 6))
    h = jnp.asarray(a @ a.T + 6 * np.eye(6))
    b = jnp.asarray(rng.normal(size=6))
    loss = lambda x: 0.5 * x @ h @ x - b @ x  # g(0) = -b: Newton's step is H^-1 b
    for metric in (jnp.ones(6), jnp.diagonal(h), jnp.asarray(rng.uniform(0.1, 10.0, 6))):
        x = newton_direction(loss, jnp.zeros(6), metric, iters=6)
        np.testing.assert_allclose(x, jnp.linalg.solve(h, b), rtol=1e-8)
    indefinite = lambda x: -0.5 * x @ x - b @ x
    assert float(jnp.abs(newton_direction(indefinite, jnp.zeros(6), jnp.ones(6), 6)).max()) == 0
    nan = lambda x: 0.5 * jnp.sum(x**2) * jnp.nan - b @ x
    assert float(jnp.abs(newton_direction(nan, jnp.zeros(6), jnp.ones(6), 6)).max()) == 0


def _kl_hessian_diagonal(kl, p):
    """The Fisher diagonal by autodiff: the diagonal of the Hessian of ``q -> KL(p || q)`` at p."""
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    return jnp.diagonal(jax.jit(jax.hessian(lambda f: kl(p, unravel(f))))(flat))


def test_probe_metrics_are_the_families_fisher_diagonals():
    """``probe_metric`` against autodiff (the Hessian of the KL at its minimum is the Fisher):
    mean-field in ``(loc, scale)``, full rank in ``(loc, L)`` below the diagonal (above it the
    metric is infinite: the probe never moves those entries)."""
    rng = np.random.RandomState(1)
    mf = {"loc": jnp.asarray(rng.normal(size=3)), "scale": jnp.asarray(rng.uniform(0.2, 2, 3))}
    guide = MeanFieldGaussian(_funnel)
    expected = _kl_hessian_diagonal(guide.kl, mf)
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(guide.probe_metric(mf))[0], expected, rtol=1e-10
    )
    d = 4
    tril = np.tril(rng.normal(size=(d, d))) * 0.5 + np.diag(rng.uniform(0.5, 2.0, d))
    fr = {"loc": jnp.asarray(rng.normal(size=d)), "prec_tril": jnp.asarray(tril)}
    guide = FullRankGaussian(_funnel)
    expected = np.asarray(_kl_hessian_diagonal(guide.kl, fr))
    metric = guide.probe_metric(fr)
    got = np.asarray(jax.flatten_util.ravel_pytree(metric)[0])
    below = np.concatenate([np.ones(d, bool), np.tril(np.ones((d, d), bool)).ravel()])
    np.testing.assert_allclose(got[below], expected[below], rtol=1e-10)
    assert np.all(np.isinf(got[~below]))


def test_calls_lapack_finds_factorisations_inside_nested_programs():
    """The probe and the full-rank curvature check evaluate a model that calls LAPACK one draw
    at a time (``ngvi.numerics.lapack``: batched LAPACK froze jaxlib 0.10.2's CPU pool): the
    test finds a Cholesky inside a distribution, under ``lax.cond`` and ``lax.scan``."""
    from ngvi.numerics.lapack import calls_lapack

    x = jnp.ones(3)
    mvn = lambda z: dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3) * z[0] ** 2 + 0.1).log_prob(z)
    assert calls_lapack(mvn, x)
    assert calls_lapack(lambda z: jax.lax.cond(z[0] > 0, mvn, lambda z: z[0], z), x)
    assert calls_lapack(lambda z: jax.lax.scan(lambda c, _: (c + mvn(z), None), 0.0, None, 2)[0], x)
    assert not calls_lapack(lambda z: dist.Normal(0.0, 1.0).log_prob(z).sum(), x)


def test_probe_refutes_on_the_gains_lower_confidence_bound():
    gains = np.array([0.07, 0.08, 0.075, 0.072, 0.078, 0.074, 0.071, 0.079])
    refuted, mean, se = probe.refutes(gains, tol=0.1)
    assert refuted and mean == pytest.approx(gains.mean())
    assert se == pytest.approx(gains.std(ddof=1) / math.sqrt(8))
    assert not probe.refutes(gains - 0.03, tol=0.1)[0]  # 0.045 on average: within tol / 2
    noisy = np.array([0.3, -0.1, 0.25, -0.05, 0.2, 0.0, 0.15, -0.1])
    assert not probe.refutes(noisy, tol=0.1)[0]  # mean 0.08 but its lower bound is below 0
    assert not probe.refutes(np.array([1.0, 1.0, np.nan, np.nan, np.nan]), tol=0.1)[0]


def test_engines_on_one_guide_share_the_compiled_probe():
    """The probe depends on the guide and the data layout only: a second engine on the same
    guide (other settings) probes with the program the first compiled (1.3-2.3 s of compile)."""
    model, args, kwargs = models.load("normal_normal")
    guide = MeanFieldGaussian(model)
    first, _ = _run(NGVI(model, guide), *args, steps=500, **kwargs)
    (program,) = [f for k, f in guide._start_programs.items() if k[0] == "probe"]
    second, _ = _run(NGVI(model, guide, num_particles=4), *args, steps=500, **kwargs)
    for result in (first, second):
        assert result.converged and math.isfinite(result.checks[-1].probe_gain)
    assert program._cache_size() == 1  # traced and compiled once, called by both engines


def test_a_refuted_pass_moves_the_fit_to_the_probe_and_converges_later(monkeypatch):
    """The engine's side: a pass the probe refutes reads failed and records the probe's gain,
    the run goes on from the probe's point and converges at a later check that the probe does
    not refute. On a conjugate normal model the probe finds nothing to gain at convergence;
    the first refusal is forced."""
    model, args, kwargs = models.load("normal_normal")
    plain, _ = _run(NGVI(model, MeanFieldGaussian(model)), *args, steps=500, **kwargs)
    assert plain.converged and plain.checks[-1].passed
    assert abs(plain.checks[-1].probe_gain) < 0.01, plain.checks[-1]
    real, calls = probe.refutes, []

    def refute_once(gains, tol):
        calls.append(1)
        refuted, mean, se = real(gains, tol)
        return refuted or len(calls) == 1, mean, se

    monkeypatch.setattr(probe, "refutes", refute_once)
    refused, _ = _run(NGVI(model, MeanFieldGaussian(model)), *args, steps=500, **kwargs)
    assert refused.converged and len(calls) == 2 and refused.num_steps > plain.num_steps
    first = [c for c in refused.checks if math.isfinite(c.probe_gain)][0]
    assert not first.passed and first.step == plain.num_steps
    assert refused.checks[-1].passed and math.isfinite(refused.checks[-1].probe_gain)
    calls.clear()  # a run that ends at the refused check says so, and what the probe gained
    ended, caught = _run(NGVI(model, MeanFieldGaussian(model)), *args, steps=first.step, **kwargs)
    assert not ended.converged and len(calls) == 1
    (w,) = caught
    assert w.category is ConvergenceWarning
    assert f"passed the check at step {first.step}, but Newton steps" in str(w.message)


@pytest.mark.slow  # ~15 s each
@pytest.mark.parametrize("name", ["beta_bernoulli", "gamma_poisson"])
def test_converged_conjugate_family_fit_is_within_tol_of_the_evidence(name):
    """ExpFamilyGuide holds the exact posterior, so its optimum ELBO is log p(y); the fit's ELBO
    from 20,000 draws (Monte Carlo error ~0.005 nat here)."""
    model, args, kwargs = models.load(name)
    guide = ExpFamilyGuide(model)
    engine = NGVI(model, guide)
    result, caught = _run(engine, *args, steps=1000, **kwargs)
    assert result.converged and not caught
    eps = guide.base_noise(jax.random.PRNGKey(5), 20_000)
    elbo = -float(engine._neg_elbo(result.params, eps, (args, kwargs), None))
    assert abs(_conjugate_evidence(name, kwargs["y"]) - elbo) < 0.1


# -- a NaN band: a sampling problem, not a step-length one ---------------------------------------
Y_BAND = jnp.asarray(np.random.RandomState(3).normal(1.0, 1.0, 25))
POST_PREC = 25.0 + 0.01
POST_MEAN = float(Y_BAND.sum()) / POST_PREC
POST_SD = POST_PREC**-0.5


def banded(y):
    """Normal-normal whose log density is NaN on a band a quarter of a posterior sd wide, half
    an sd above the posterior mean."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    band = jnp.abs(mu - (POST_MEAN + 0.5 * POST_SD)) < 0.125 * POST_SD
    numpyro.factor("band", jnp.where(band, jnp.nan, 0.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_nan_band_draws_are_dropped_and_the_fit_lands_on_the_exact_posterior():
    """Before: 48 of 52 rejections were a NaN at the current point, each growing the damping 4x,
    and the fit stopped 3.6 sd from the exact mean. Now the draws in the band are dropped with
    their antithetic partners (the band mirrored about the mean), which keeps the mean exact for
    a quadratic log density; the scale comes out low, since the dropped draws sit at
    |eps| ~ 0.5 and their loss raises the second moment of those kept, so the precision
    estimate, by E[eps^2 | kept] ~ 1.16-1.27 (7-11% on the scale) at the fixed point."""
    guide = MeanFieldGaussian(banded, init_strategy=init_to_value(values={"mu": 0.0}))
    result, caught = _run(NGVI(banded, guide), Y_BAND, steps=400)
    info = result.info
    dropped = int(np.sum(np.asarray(info.num_bad)))
    assert dropped > 0, "the band is hit"
    assert not np.any(np.asarray(info.reason) == NOT_FINITE_HERE), "dropped, not rejected"
    assert result.num_rejected <= 0.1 * result.num_steps
    loc, scale = float(result.params["loc"][0]), float(result.params["scale"][0])
    assert abs(loc - POST_MEAN) < 0.2 * POST_SD, (loc - POST_MEAN) / POST_SD
    assert 0.85 < scale / POST_SD < 1.0
    assert float(np.max(np.asarray(info.damping)[-50:])) < 1.0, "the damping stayed small"
    notes = [w for w in caught if w.category is NGVIWarning]
    assert len(notes) == 1 and "had a non-finite log density" in str(notes[0].message)
    assert "guard log / sqrt / division with jnp.where" in str(notes[0].message)


# -- a fit that is not converged says why ----------------------------------------------------------
def test_unconverged_fit_warns_with_cause_and_fix():
    model, args, kwargs = models.load("normal_normal")
    # without the warm start, which lands on this conjugate optimum before the first check
    engine = NGVI(model, MeanFieldGaussian(model, warm_start=False))
    short, caught = _run(engine, *args, steps=8, **kwargs)
    assert not short.converged and short.checks == ()
    (w,) = caught
    assert w.category is ConvergenceWarning and "run more steps" in str(w.message)
    assert "only 8 unit natural steps were taken" in str(w.message)
    mid, caught = _run(engine, *args, steps=15, **kwargs)
    assert not mid.converged and len(mid.checks) == 1 and mid.checks[0].change > 0.1
    (w,) = caught
    assert "the ELBO was still changing at the last check" in str(w.message)
    assert "init_state=result.state" in str(w.message)
    _, caught = _run(engine, *args, steps=15, tol=None, **kwargs)
    assert caught == [], "no check asked for, none reported"


def test_a_refused_pass_is_named_in_the_warning():
    """A run whose last check passed on its trend but did not stand says which refusal it was
    (noise: the particles doubled; the guide's own verification; the Newton probe), not that too
    few steps were taken."""
    from ngvi.engine.convergence import CheckInfo
    from ngvi.engine.diagnose import not_converged_cause

    engine = type("E", (), {"particles": 16})()
    state = type("S", (), {"damping": 0.0, "progress": 500.0, "change": 0.01, "change_se": 0.01})
    info = NGVIInfo(jnp.zeros(500), jnp.ones(500, bool), *(jnp.zeros(500),) * 5)
    base = CheckInfo(480, 480.0, 0.01, 0.01, 0.0, 0.05, False, 8, 0.01, 8)
    noisy = not_converged_cause(engine, state, info, 0.1, (base._replace(excess=0.9),))
    assert "jitter 0.9 nats below their average" in noisy and "now 16" in noisy
    unverified = not_converged_cause(engine, state, info, 0.1, (base,))
    assert "the guide could not verify the fit there" in unverified
    probed = base._replace(probe_gain=0.2, probe_se=0.01)
    assert "Newton steps" in not_converged_cause(engine, state, info, 0.1, (probed,))
    assert "only" not in noisy + unverified


def test_a_damped_fit_that_moves_is_not_called_frozen():
    """A damping held at a few units (an ill-conditioned log density: the mean's Jacobi step
    needs it) cuts each step to a third while the fit keeps moving: the warning names what the
    last check found (here: a change within its own noise), not "the fit barely moved". A
    damping in the thousands, or a quarter of the steps rejected, is a frozen fit."""
    from ngvi.engine.convergence import CheckInfo
    from ngvi.engine.diagnose import FROZEN, not_converged_cause, recent_progress

    engine = type("E", (), {"particles": 8})()
    n = 3000
    accepted = jnp.asarray(np.arange(n) % 10 != 0)  # 10% rejected
    flat = CheckInfo(2962, 792.0, 0.022, 0.014, 0.0007, 0.1009, False, 240, 0.044, 8)

    def cause(damping):
        state = type("S", (), {"damping": damping, "progress": 792.0})
        state.change, state.change_se = flat.change, flat.se
        info = NGVIInfo(jnp.zeros(n), accepted, jnp.full(n, damping), *(jnp.zeros(n),) * 4)
        return recent_progress(info), not_converged_cause(engine, state, info, 0.1, (flat,))

    moving, msg = cause(2.5)
    assert moving == pytest.approx(0.9 / 3.5) and moving > FROZEN
    assert "could not resolve tol=0.1" in msg and "raise num_particles" in msg
    assert "barely moved" not in msg
    frozen, msg = cause(3.5e3)
    assert frozen < FROZEN and "the damping grew to 3.5e+03" in msg and "barely moved" in msg


def test_converged_state_continues_when_asked_for_more_steps():
    model, args, kwargs = models.load("normal_normal")
    engine = NGVI(model, MeanFieldGaussian(model))
    first, _ = _run(engine, *args, steps=500, **kwargs)
    assert first.converged and first.num_steps < 500
    more = engine.run(None, 30, *args, init_state=first.state, progress_bar=False, **kwargs)
    assert more.num_steps >= 10 and int(more.state.step) == first.num_steps + more.num_steps


def _two_bumps(y, mask=True):
    """A two-component Gaussian mixture, its likelihood wrapped in a mask and an expand."""
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
    loc = numpyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    mix = dist.MixtureSameFamily(dist.Categorical(probs=w), dist.Normal(loc, 1.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", mix.expand([y.shape[0]]).mask(mask), obs=y)


def test_mixture_sites_are_found_under_wrappers_and_only_there():
    from ngvi.model.target import make_target

    y = jnp.array([-3.0, -2.5, 2.5, 3.0])
    assert make_target(_two_bumps, (y,)).mixtures == ("y",)
    model, args, kwargs = models.load("normal_normal")
    assert make_target(model, args, kwargs).mixtures == ()


def test_a_passed_check_on_a_mixture_is_not_called_converged():
    """A mixture's ELBO has local optima (components merged or emptied) that a passed check
    cannot tell from the best fit: the run stops there but says converged=False, with a
    warning that names the site and the fix (several starts)."""
    keys = jax.random.split(jax.random.PRNGKey(3))
    y = jnp.concatenate(
        [jax.random.normal(keys[0], (50,)) - 3, jax.random.normal(keys[1], (50,)) + 3]
    )
    result, caught = _run(NGVI(_two_bumps, MeanFieldGaussian(_two_bumps)), y, steps=2000)
    assert bool(result.state.converged) and result.checks[-1].passed
    assert not result.converged and result.num_steps < 2000
    (w,) = caught
    assert w.category is ConvergenceWarning
    assert "['y'] are mixtures" in str(w.message) and "several starts" in str(w.message)


class _Doubting(MeanFieldGaussian):
    """A family whose first ``doubts`` verifications fail (``Guide.verify_fit``)."""

    def __init__(self, model, doubts):
        super().__init__(model)
        self.doubts, self.calls = doubts, 0

    def verify_fit(self, params, data, rng_key):
        self.calls += 1
        return "not yet" if self.calls <= self.doubts else None


def test_a_passed_check_stands_only_once_the_guide_verifies_the_fit():
    """A check that passes but whose fit the guide refuses (``verify_fit``) is not convergence:
    the run goes on (recompiled: the guide may step differently now) and converges at a later
    check the guide accepts."""
    model, args, kwargs = models.load("normal_normal")
    trusting, _ = _run(NGVI(model, MeanFieldGaussian(model)), *args, steps=500, **kwargs)
    guide = _Doubting(model, doubts=1)
    doubted, _ = _run(NGVI(model, guide), *args, steps=500, **kwargs)
    assert trusting.converged and doubted.converged and guide.calls == 2
    assert doubted.num_steps > trusting.num_steps
    assert [c.passed for c in doubted.checks].count(True) == 1  # the refused one reads failed
    assert doubted.checks[-1].passed


def test_a_noisy_pass_doubles_the_particles_and_the_state_keeps_them(monkeypatch, tmp_path):
    """A check that passes while the iterates' excess over their average is above
    ``EXCESS_MAX * tol`` (``ngvi.engine.convergence``, noise bias) is refused and the particles
    double, up to ``MAX_BOOST`` times: the checks record the excess and the particles of their
    window, the state carries the factor (a continued or checkpointed fit keeps it), and a
    fresh run starts from ``num_particles`` again."""
    from ngvi.engine import convergence

    model, args, kwargs = models.load("normal_normal")
    quiet, _ = _run(NGVI(model, MeanFieldGaussian(model)), *args, steps=500, **kwargs)
    assert quiet.converged and all(c.particles == 8 for c in quiet.checks)
    assert all(math.isfinite(c.excess) for c in quiet.checks)
    assert int(quiet.state.boost) == 1

    monkeypatch.setattr(convergence, "EXCESS_MAX", -math.inf)  # every pass counts as noisy
    engine = NGVI(model, MeanFieldGaussian(model))
    path = str(tmp_path / "fit.npz")
    noisy, _ = _run(engine, *args, steps=2000, checkpoint=path, **kwargs)
    passes = [c.particles for c in noisy.checks if c.bound <= 0.1 and c.progress >= 20]
    assert passes[:3] == [8, 16, 32], "refused at 8 and 16 particles, accepted at 32"
    assert noisy.converged and noisy.checks[-1].passed and noisy.checks[-1].particles == 32
    assert int(noisy.state.boost) == convergence.MAX_BOOST
    assert noisy.num_steps > quiet.num_steps
    resumed, _ = _run(engine, *args, steps=2000, checkpoint=path, **kwargs)
    assert int(resumed.state.boost) == convergence.MAX_BOOST
    more = engine.run(None, 30, *args, init_state=noisy.state, progress_bar=False, **kwargs)
    assert all(c.particles == 32 for c in more.checks)
    fresh, _ = _run(engine, *args, steps=500, **kwargs)
    assert fresh.checks[0].particles == 8


# -- the default start -----------------------------------------------------------------------------
def stochastic_volatility(returns):
    """NumPyro's stochastic-volatility example: a Gaussian random-walk log volatility with an
    Exponential step size, Student-t returns."""
    step = numpyro.sample("sigma", dist.Exponential(50.0))
    s = numpyro.sample("s", dist.GaussianRandomWalk(scale=step, num_steps=returns.shape[0]))
    nu = numpyro.sample("nu", dist.Exponential(0.1))
    numpyro.sample("r", dist.StudentT(df=nu, loc=0.0, scale=jnp.exp(s)), obs=returns)


def _returns(t: int = 100) -> jax.Array:
    rng = np.random.default_rng(0)
    s = -4.0 + np.cumsum(0.15 * rng.standard_normal(t))
    return jnp.asarray(np.exp(s) * rng.standard_t(5, t))


def test_default_start_is_the_best_scored_candidate_and_user_strategy_wins():
    y = _returns()
    guide = MeanFieldGaussian(stochastic_volatility)
    NGVI(stochastic_volatility, guide).init(KEY, y)
    scores = guide.start_scores
    assert set(scores) == {"median", "feasible", "uniform"}
    best = max(scores, key=scores.get)
    # on this model the median of prior draws is a poor start (a flat path, a tiny step size)
    assert best != "median" and scores[best] > scores["median"] + 100
    score = make_elbo_scorer(guide.target, (y,), {}, eps=guide.base_noise(KEY, 8))
    z0 = guide.target.init_z
    assert float(score(z0, jnp.full_like(z0, 0.1))) > scores["median"]

    mine = MeanFieldGaussian(stochastic_volatility, init_strategy=init_to_median(num_samples=15))
    NGVI(stochastic_volatility, mine).init(KEY, y)
    assert mine.start_scores == {}, "a user's init_strategy is used as given"


@pytest.mark.slow  # ~2 fits of 300 steps on a 102-dimensional model
def test_default_start_fits_random_walk_volatility_better_than_the_median_start():
    """Issue 17's case: from init_to_median the path barely moves; the chosen start ends far
    better on the same fixed-noise ELBO after the same number of steps."""
    y = _returns()
    elbos = {}
    for name, strategy in (("default", None), ("median", init_to_median(num_samples=15))):
        guide = MeanFieldGaussian(stochastic_volatility, init_strategy=strategy)
        result, _ = _run(NGVI(stochastic_volatility, guide), y, steps=300, tol=None)
        score = make_elbo_scorer(guide.target, (y,), {})
        elbos[name] = float(score(result.params["loc"], result.params["scale"]))
    assert elbos["default"] > elbos["median"] + 50, elbos


def test_unfused_draws_are_the_same_values_in_a_kernel_of_their_own():
    """``step.unfused`` changes where XLA computes the draws, never their values: on CPU the
    accept test's draws sit inside a conditional (so XLA cannot copy them into each gather that
    reads them), and the log density of gathered draws equals the plain computation bitwise."""
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 50, 2000))
    loc, scale = jnp.linspace(-1.0, 1.0, 50), jnp.linspace(0.1, 2.0, 50)
    eps = jax.random.normal(jax.random.PRNGKey(0), (8, 50))

    def logp(z):
        return jnp.sum(jax.nn.log_sigmoid(z[:, idx]), axis=1)

    plain = jax.jit(lambda m, s, e: logp(m + s * e))
    kept = jax.jit(lambda m, s, e: logp(unfused(lambda: m + s * e, e)))
    np.testing.assert_array_equal(
        np.asarray(plain(loc, scale, eps)), np.asarray(kept(loc, scale, eps))
    )
    hlo = kept.lower(loc, scale, eps).compile().as_text()
    assert ("conditional(" in hlo) == (jax.default_backend() == "cpu")
