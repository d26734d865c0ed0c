"""Tests of ngvi.families: closed forms checked against autodiff and Monte Carlo oracles."""

import functools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from jax.scipy.special import digamma  # noqa: E402

from ngvi.families import (  # noqa: E402
    Bernoulli,
    Beta,
    Categorical,
    DiagGaussian,
    Dirichlet,
    Exponential,
    FullRankGaussian,
    Gamma,
    NormalGamma,
    Poisson,
    dirichlet_from_mean_log,
    fisher_autodiff,
    fisher_monte_carlo,
    gamma_shape_from_log_ratio,
    inv_digamma,
    kl_from_samples,
    kl_monte_carlo,
    stats_covariance,
)

pytestmark = pytest.mark.x64  # float64 in this module only (tests/conftest.py)

N_MC = 100_000  # Monte Carlo draws shared by the Fisher, KL and log_prob checks
N_GRAD = 4_000  # draws for the (costly) implicit-reparameterisation gradient check
A = jnp.array


def _cases():
    """name -> (family, eta_p, eta_q); scalar families carry a batch of 3."""
    cov_p = A([[[2.0, 0.5], [0.5, 1.0]], [[1.0, -0.3], [-0.3, 0.5]]])
    cov_q = A([[[1.5, 0.2], [0.2, 1.2]], [[0.8, 0.0], [0.0, 0.9]]])
    return {
        "diag_gaussian": (
            DiagGaussian(),
            DiagGaussian.from_standard(A([0.5, -1.0, 2.0]), A([0.7, 1.3, 0.4])),
            DiagGaussian.from_standard(A([0.0, -0.5, 1.5]), A([1.0, 1.0, 0.6])),
        ),
        "full_rank_gaussian": (
            FullRankGaussian(2),
            FullRankGaussian.from_standard(A([[1.0, -0.5], [0.0, 0.3]]), cov_p),
            FullRankGaussian.from_standard(A([[0.5, 0.0], [0.2, 0.1]]), cov_q),
        ),
        "bernoulli": (
            Bernoulli(),
            (A([-1.0, 0.3, 2.0]),),
            (A([0.0, -0.4, 1.0]),),
        ),
        "categorical_minimal": (
            Categorical(4),
            (A([[0.5, -0.3, 1.0], [0.0, 0.2, -1.0]]),),
            (A([[0.0, 0.1, 0.5], [0.4, -0.2, 0.3]]),),
        ),
        "categorical_overcomplete": (
            Categorical(4, minimal=False),
            (A([[0.5, -0.3, 1.0, 0.2], [0.0, 0.2, -1.0, 0.1]]),),
            (A([[0.0, 0.1, 0.5, 0.0], [0.4, -0.2, 0.3, -0.5]]),),
        ),
        "gamma": (
            Gamma(),
            Gamma.from_standard(A([0.8, 2.0, 5.0]), A([1.0, 0.5, 3.0])),
            Gamma.from_standard(A([1.0, 2.5, 4.0]), A([0.7, 0.8, 2.0])),
        ),
        "beta": (
            Beta(),
            Beta.from_standard(A([0.9, 2.0, 5.0]), A([1.5, 3.0, 1.2])),
            Beta.from_standard(A([1.2, 1.5, 4.0]), A([1.0, 2.0, 2.0])),
        ),
        "dirichlet": (
            Dirichlet(3),
            Dirichlet.from_standard(A([[1.0, 2.0, 3.0], [0.7, 4.0, 1.5]])),
            Dirichlet.from_standard(A([[1.5, 1.5, 2.0], [1.0, 3.0, 2.0]])),
        ),
        "poisson": (
            Poisson(),
            Poisson.from_standard(A([0.5, 3.0, 10.0])),
            Poisson.from_standard(A([1.0, 2.0, 8.0])),
        ),
        "exponential": (
            Exponential(),
            Exponential.from_standard(A([0.5, 1.0, 4.0])),
            Exponential.from_standard(A([1.0, 0.8, 3.0])),
        ),
        "normal_gamma": (  # (loc, lam, concentration, rate)
            NormalGamma(),
            NormalGamma.from_standard(
                A([0.5, -1.0, 2.0]), A([1.0, 0.3, 4.0]), A([1.5, 3.0, 6.0]), A([1.0, 2.0, 0.5])
            ),  # fmt: skip
            NormalGamma.from_standard(
                A([0.0, -0.5, 1.5]), A([2.0, 0.5, 3.0]), A([2.0, 2.5, 5.0]), A([1.5, 1.0, 0.7])
            ),  # fmt: skip
        ),
    }


CASES = _cases()
NAMES = list(CASES)
NEWTON = {"gamma", "beta", "dirichlet", "normal_gamma"}
# Beta/Dirichlet pathwise gradients reuse jax.random.gamma's implicit gradient (checked
# by "gamma" in the default run); their extra ~10 s of XLA compilation is opt-in (-m slow).
# the checks on 100k draws compile each sampler (~10 s for NormalGamma's): in the slow job
DRAWN = [pytest.param(n, marks=pytest.mark.slow) if n == "normal_gamma" else n for n in NAMES]
REPARAM = [
    pytest.param(n, marks=pytest.mark.slow) if n in ("beta", "dirichlet", "normal_gamma") else n
    for n in NAMES
    if CASES[n][0].reparameterized
]
KEY = jax.random.PRNGKey(0)


@functools.lru_cache(maxsize=None)
def _draws(name):
    """N_MC draws from q(eta_p), generated once per family and shared by tests."""
    fam, eta, _ = CASES[name]
    return jax.jit(lambda e: fam.sample(KEY, e, (N_MC,)))(eta)


def _random_tangent(fam, eta, seed=1):
    """A random pytree shaped like eta (eta2 symmetric for the full-rank Gaussian)."""
    flat = fam.flatten(eta)
    v = fam.unflatten(jax.random.normal(jax.random.PRNGKey(seed), flat.shape, flat.dtype))
    if isinstance(fam, FullRankGaussian):
        v = (v[0], 0.5 * (v[1] + jnp.swapaxes(v[1], -1, -2)))
    return v


def _close(a, b, rtol, atol=0.0):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@functools.lru_cache(maxsize=None)
def _exact(name):
    """Closed forms and their autodiff oracles for one family, compiled as one jit."""
    fam, eta, _ = CASES[name]
    v, g = _random_tangent(fam, eta, seed=1), _random_tangent(fam, eta, seed=2)
    eye = jnp.eye(fam.num_params)

    def compute(e, v, g):
        f = fam.fisher(e)
        fv = fam.unflatten(jnp.einsum("...ij,...j->...i", f, fam.flatten(v)))
        m = fam.natural_to_mean(e)
        out = {
            "v": v,
            "fisher": f,
            "fisher_autodiff": fisher_autodiff(fam, e),
            "fisher_vp": fam.fisher_vp(e, v),
            "fisher_vp_dense": fv,
            "damped": fam.flatten(fam.fisher_inverse(e, g, 0.3)),
            "damped_dense": jnp.linalg.solve(f + 0.3 * eye, fam.flatten(g)[..., None])[..., 0],
            "mean": m,
            "grad_log_partition": jax.grad(lambda e_: jnp.sum(fam.log_partition(e_)))(e),
            "round_trip": fam.mean_to_natural(m),
        }
        if name != "categorical_overcomplete":
            out["inverse_of_fv"] = fam.fisher_inverse(e, fv)
            out["jvp_mean_to_natural"] = jax.jvp(fam.mean_to_natural, (m,), (v,))[1]
            out["fisher_inverse_v"] = fam.fisher_inverse(e, v)
        return out

    return jax.jit(compute)(eta, v, g)


# ---------------------------------------------------------------- Fisher


@pytest.mark.parametrize("name", NAMES)
def test_fisher_matches_autodiff_hessian(name):
    fam, eta, _ = CASES[name]
    res = _exact(name)
    assert res["fisher"].shape == fam.batch_shape(eta) + (fam.num_params, fam.num_params)
    np.testing.assert_allclose(res["fisher"], res["fisher_autodiff"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", DRAWN)
def test_fisher_matches_monte_carlo_covariance(name):
    fam, eta, _ = CASES[name]
    f, f_mc = jax.jit(lambda e, x: (fam.fisher(e), stats_covariance(fam, x)))(eta, _draws(name))
    diag = jnp.diagonal(f, axis1=-2, axis2=-1)
    scale = jnp.sqrt(diag[..., :, None] * diag[..., None, :])
    # sample covariance error is O(n^{-1/2}) relative to sqrt(F_ii F_jj)
    assert float(jnp.max(jnp.abs(f_mc - f) / scale)) < 0.03


@pytest.mark.parametrize("name", NAMES)
def test_fisher_vp_matches_dense(name):
    res = _exact(name)
    _close(res["fisher_vp"], res["fisher_vp_dense"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "categorical_overcomplete"])
def test_fisher_inverse_inverts_fisher(name):
    res = _exact(name)
    _close(res["inverse_of_fv"], res["v"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_damped_fisher_inverse_matches_dense_solve(name):
    res = _exact(name)
    np.testing.assert_allclose(res["damped"], res["damped_dense"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "categorical_overcomplete"])
def test_natural_gradient_is_jvp_of_mean_to_natural(name):
    """F^{-1} v = (d eta / d m) v; also checks the custom JVPs of the Newton solvers."""
    res = _exact(name)
    tol = 1e-6 if name in NEWTON else 1e-8
    _close(res["jvp_mean_to_natural"], res["fisher_inverse_v"], rtol=tol, atol=1e-9)


# ---------------------------------------------------------------- parameter maps


@pytest.mark.parametrize("name", NAMES)
def test_mean_natural_round_trip(name):
    fam, eta, _ = CASES[name]
    res = _exact(name)
    m, back = res["mean"], res["round_trip"]
    if name == "categorical_overcomplete":  # identified up to a constant shift
        _close(fam.natural_to_mean(back), m, rtol=1e-10)
        shift = back[0] - eta[0]
        np.testing.assert_allclose(shift, shift[..., :1] * jnp.ones_like(shift), atol=1e-10)
        return
    tol = 1e-6 if name in NEWTON else 1e-8
    _close(back, eta, rtol=tol, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_natural_to_mean_is_grad_log_partition(name):
    res = _exact(name)
    _close(res["mean"], res["grad_log_partition"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "name",
    [
        "diag_gaussian",
        "full_rank_gaussian",
        "gamma",
        "beta",
        "dirichlet",
        "poisson",
        "exponential",
        "bernoulli",
        "normal_gamma",
    ],
)
def test_standard_round_trip(name):
    fam, eta, _ = CASES[name]
    _close(fam.from_standard(*fam.standard(eta)), eta, rtol=1e-10, atol=1e-12)


def test_categorical_standard_round_trip():
    for fam, eta in [(CASES[n][0], CASES[n][1]) for n in ("categorical_minimal",)]:
        _close(fam.from_standard(*fam.standard(eta)), eta, rtol=1e-10, atol=1e-12)
    fam = Categorical(4, minimal=False)
    probs = A([0.1, 0.2, 0.3, 0.4])
    _close(fam.standard(fam.from_standard(probs))[0], probs, rtol=1e-12)


def test_newton_solvers_across_scales():
    scales = A([0.02, 0.3, 1.0, 10.0, 1e3])[:, None, None]
    alpha = (scales * A([[0.5, 1.0, 2.5, 1.7], [3.0, 0.6, 1.0, 0.9]])).reshape(-1, 4)
    m = digamma(alpha) - digamma(jnp.sum(alpha, -1, keepdims=True))
    a = alpha.ravel()

    def solve(m, a):
        s = jnp.log(a) - digamma(a)
        return dirichlet_from_mean_log(m), gamma_shape_from_log_ratio(s), inv_digamma(digamma(a))

    dir_alpha, gamma_a, inv = jax.jit(solve)(m, a)
    np.testing.assert_allclose(dir_alpha, alpha, rtol=1e-7)
    np.testing.assert_allclose(gamma_a, a, rtol=1e-7)
    np.testing.assert_allclose(inv, a, rtol=1e-10)


_dirichlet_round_trip = jax.jit(
    lambda a: dirichlet_from_mean_log(digamma(a) - digamma(jnp.sum(a, -1, keepdims=True)))
)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-3.0, 5.0), min_size=3, max_size=3))
def test_dirichlet_newton_property(log_alpha):
    alpha = jnp.exp(A(log_alpha))
    np.testing.assert_allclose(_dirichlet_round_trip(alpha), alpha, rtol=1e-7)


# ---------------------------------------------------------------- KL


@pytest.mark.parametrize("name", DRAWN)
def test_kl_closed_form_matches_monte_carlo(name):
    fam, eta_p, eta_q = CASES[name]

    def compute(p, q, x):
        return fam.kl(p, q), fam.kl(p, p), *kl_from_samples(fam, x, p, q)

    kl, kl_pp, est, se = jax.jit(compute)(eta_p, eta_q, _draws(name))
    assert jnp.all(kl > 0)
    # 5 standard errors: ~30 batched comparisons over the families share this bound
    assert jnp.all(jnp.abs(est - kl) < 5.0 * se + 1e-12), (kl, est, se)
    np.testing.assert_allclose(kl_pp, 0.0, atol=1e-12)


# ---------------------------------------------------------------- NumPyro / sampling


@pytest.mark.parametrize("name", DRAWN)
def test_log_prob_matches_numpyro(name):
    fam, eta, _ = CASES[name]
    x = _draws(name)[:7]
    d = fam.to_numpyro(eta)
    assert d.batch_shape == fam.batch_shape(eta)
    assert d.event_shape == fam.event_shape
    assert bool(jnp.all(fam.support(x)))
    ours, theirs = jax.jit(lambda e, x: (fam.log_prob(x, e), fam.to_numpyro(e).log_prob(x)))(eta, x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10)
    shape = jax.eval_shape(lambda e: fam.sample(KEY, e, (2, 5)), eta).shape
    assert shape == (2, 5) + d.batch_shape + d.event_shape


@pytest.mark.parametrize("name", REPARAM)
def test_reparameterized_sample_gradient(name):
    """grad_eta E_q[<w, T(x)>] = F w: the pathwise estimate must match it."""
    fam, eta, _ = CASES[name]
    w = fam.flatten(_random_tangent(fam, eta, seed=4))
    flat = fam.flatten(eta)

    def objective(vec):
        x = fam.sample(jax.random.PRNGKey(5), fam.unflatten(vec), (N_GRAD,))
        t = fam.flatten(fam.sufficient_stats(x))
        return jnp.sum(jnp.mean(t, 0) * w)

    g = jax.jit(jax.grad(objective))(flat)
    assert jnp.all(jnp.isfinite(g))
    exact = jnp.einsum("...ij,...j->...i", fam.fisher(eta), w)
    scale = jnp.linalg.norm(exact, axis=-1, keepdims=True)
    # MC error ~ 1/sqrt(N_GRAD) = 1.6% (times a variance factor); a missing or wrong
    # pathwise term is O(100%)
    assert float(jnp.max(jnp.abs(g - exact) / scale)) < 0.12


def test_monte_carlo_oracles_direct():
    fam, eta, eta_q = CASES["exponential"]
    np.testing.assert_allclose(fisher_monte_carlo(fam, KEY, eta, N_MC), fam.fisher(eta), rtol=0.05)
    est, se = kl_monte_carlo(fam, KEY, eta, eta_q, N_MC)
    assert jnp.all(jnp.abs(est - fam.kl(eta, eta_q)) < 4.0 * se)


def test_non_reparameterized_families_are_flagged():
    for name in ("bernoulli", "categorical_minimal", "poisson"):
        assert not CASES[name][0].reparameterized


# ---------------------------------------------------------------- Categorical damping


@pytest.mark.parametrize("minimal", [True, False])
def test_categorical_damped_natural_gradient(minimal):
    fam = Categorical(5, minimal=minimal)
    eta = (jax.random.normal(jax.random.PRNGKey(11), (3, fam.num_params)),)
    g = jax.random.normal(jax.random.PRNGKey(12), (3, fam.num_params))
    f = fam.fisher(eta)
    if not minimal:
        assert np.linalg.matrix_rank(np.asarray(f[0])) == 4  # rank K - 1
        with pytest.raises(ValueError):
            fam.fisher_inverse(eta, (g,))
    for lam in (1e-3, 0.1, 10.0):
        dense = jnp.linalg.solve(f + lam * jnp.eye(fam.num_params), g[..., None])[..., 0]
        np.testing.assert_allclose(fam.fisher_inverse(eta, (g,), lam)[0], dense, rtol=1e-7)
    lam = 1e6
    scaled = lam * fam.fisher_inverse(eta, (g,), lam)[0]
    assert float(jnp.max(jnp.linalg.norm(scaled - g, axis=-1) / jnp.linalg.norm(g, axis=-1))) < 1e-4


def test_categorical_parameterizations_agree():
    probs = A([0.1, 0.2, 0.3, 0.4])
    small, big = Categorical(4), Categorical(4, minimal=False)
    e_s, e_b = small.from_standard(probs), big.from_standard(probs)
    x = jnp.arange(4)
    np.testing.assert_allclose(small.log_prob(x, e_s), big.log_prob(x, e_b), rtol=1e-12)
    np.testing.assert_allclose(small.log_prob(x, e_s), jnp.log(probs), rtol=1e-12)


# ---------------------------------------------------------------- worked examples


def test_worked_example_bernoulli():
    fam = Bernoulli()
    eta = (jnp.array(0.0),)
    assert float(fam.fisher(eta)[0, 0]) == pytest.approx(0.25, abs=1e-15)
    grad = jax.grad(lambda t: -jax.nn.log_sigmoid(t))(0.0)
    assert float(grad) == pytest.approx(-0.5, abs=1e-15)
    assert float(fam.fisher_inverse(eta, (grad,))[0]) == pytest.approx(-2.0, abs=1e-12)


def test_worked_example_gaussian_mean():
    cov = A([[2.0, 1.0], [1.0, 2.0]])
    y = A([1.0, 2.0])
    fam = FullRankGaussian(2)
    g = jax.grad(lambda mu: 0.5 * jnp.sum((mu - y) ** 2))(jnp.zeros(2))
    # Fisher of N(mu, Sigma) w.r.t. mu is -E[hess_mu log q] = Sigma^{-1}
    x0 = A([0.3, -0.2])
    f_mu = -jax.jit(jax.hessian(lambda mu: fam.log_prob(x0, fam.from_standard(mu, cov))))(
        jnp.zeros(2)
    )
    np.testing.assert_allclose(f_mu, jnp.linalg.inv(cov), rtol=1e-12)
    np.testing.assert_allclose(jnp.linalg.solve(f_mu, g), A([-4.0, -5.0]), rtol=1e-12)
    # same via the exp-family geometry: nat. grad. in mean coordinates = F_eta grad_m
    eta = fam.from_standard(jnp.zeros(2), cov)
    ng = fam.fisher_vp(eta, (g, jnp.zeros((2, 2))))[0]
    np.testing.assert_allclose(ng, A([-4.0, -5.0]), rtol=1e-12)


def test_full_rank_gaussian_fisher_layout_and_precision_tril():
    fam = FullRankGaussian(3)
    low = A([[2.0, 0.0, 0.0], [0.5, 1.0, 0.0], [-0.3, 0.2, 1.5]])
    mu = A([0.1, -0.2, 0.3])
    eta = fam.from_precision_tril(mu, low)
    np.testing.assert_allclose(fam.precision_tril(eta), low, rtol=1e-12)
    np.testing.assert_allclose(fam.loc(eta), mu, rtol=1e-12)
    f = fam.fisher(eta)
    assert f.shape == (12, 12)
    _, cov = fam.standard(eta)
    np.testing.assert_allclose(f[:3, :3], cov, rtol=1e-10)  # Cov[x] block first


# ---------------------------------------------------------------- Normal-Gamma


@pytest.mark.slow  # shares the 100k-draw compile of DRAWN
def test_normal_gamma_log_prob_is_gamma_times_conditional_normal():
    """log q(mu, tau) = Gamma(a, b).log_prob(tau) + Normal(m, (k tau)^-1/2).log_prob(mu), with
    numpyro's own distributions (an oracle independent of the family's closed forms)."""
    import numpyro.distributions as dist

    fam, eta, _ = CASES["normal_gamma"]
    x = _draws("normal_gamma")[:5]
    m, k, a, b = fam.standard(eta)
    mu, tau = x[..., 0], x[..., 1]
    ref = dist.Gamma(a, b).log_prob(tau) + dist.Normal(m, 1 / jnp.sqrt(k * tau)).log_prob(mu)
    np.testing.assert_allclose(fam.log_prob(x, eta), ref, rtol=1e-10)


def test_normal_gamma_one_unit_step_lands_on_the_exact_posterior():
    """Conjugate-computation VI on the joint (mu, tau) family: log p(data, mu, tau) is linear in
    T = (tau mu, tau mu^2, tau, log tau), so the regression natural gradient on 8 draws of
    q0 = NormalGamma(0, 1, 2, 2) is exact and eta + 1 * nat is the exact Normal-Gamma posterior
    (1e-6 relative, float64); the mean-field CAVI fixed point (models.normal_gamma) is not."""
    from numpyro.infer.util import log_density

    from ngvi import models
    from ngvi.guides.expfam_estimators import regression_natural_params

    model, args, kwargs = models.load("normal_gamma")
    module = models.load_module("normal_gamma")
    post = module.exact_posterior(*args, **kwargs)[("mu", "tau")]
    fam = NormalGamma()
    eta = fam.from_standard(A(0.0), A(1.0), A(2.0), A(2.0))

    rng = np.random.RandomState(0)  # 8 draws from q0 (numpy: no sampler compile)
    tau = rng.gamma(2.0, 1 / 2.0, 8)
    x = jnp.asarray(np.stack([rng.randn(8) / np.sqrt(tau), tau], -1))

    def step(eta, x):
        logp = jax.vmap(lambda xi: log_density(model, args, kwargs, {"mu": xi[0], "tau": xi[1]})[0])
        stats = fam.flatten(fam.sufficient_stats(x))
        beta = fam.unflatten(regression_natural_params(stats, logp(x)))
        return tuple(e + 1.0 * (b - e) for e, b in zip(eta, beta))

    got = fam.standard(jax.jit(step)(eta, x))
    for key, v in zip(("loc", "lam", "concentration", "rate"), got):
        np.testing.assert_allclose(v, post[key], rtol=1e-6, err_msg=key)
    mf = module.mean_field_optimum(*args, **kwargs)
    sd_mu = module.posterior_moments(*args, **kwargs)["mu"]["sd"]
    assert mf["mu"]["scale"] < 0.97 * sd_mu  # mean field: too narrow (a_n vs a_n - 1)
    assert mf["tau"]["concentration"] == post["concentration"] + 0.5
