"""Tests of ngvi.em: natural steps as M-steps, EM / CAVI / SVI against textbook updates."""

import jax

jax.config.update("jax_enable_x64", True)

import functools  # noqa: E402
import math  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.special import digamma as np_digamma  # noqa: E402
from scipy.special import logsumexp as np_logsumexp  # noqa: E402

import ngvi  # noqa: E402
from ngvi import em  # noqa: E402
from ngvi.families import (  # noqa: E402
    Bernoulli,
    Beta,
    Categorical,
    DiagGaussian,
    Dirichlet,
    Exponential,
    FullRankGaussian,
    Gamma,
    Poisson,
)
from ngvi.models import bayes_gmm, bernoulli_mixture, gaussian_mixture  # noqa: E402

pytestmark = pytest.mark.x64  # float64 in this module only (tests/conftest.py)

A = jnp.array
CLOSED_FORM_TOL = 1e-10
# Newton families: natural_to_mean(m_step(t)) reproduces t to this relative accuracy
# (Gamma / NormalGamma: 12 Newton steps on the shape; Beta / Dirichlet: 45 safeguarded
# Newton steps on log alpha_0 plus 6-step inverse digamma). Observed: <= 5e-15.
NEWTON_TOL = 1e-12


def _cases():
    """``(name, family, eta0, eta_star, newton_solved)``: a start and the target's parameters."""
    fr = FullRankGaussian(2)
    cov0, cov1 = A([[1.0, 0.3], [0.3, 0.5]]), A([[1.1, 0.25], [0.25, 0.55]])
    return [
        (
            "diag_gaussian",
            DiagGaussian(),
            DiagGaussian.from_standard(A([0.0, 1.0]), A([1.0, 2.0])),
            DiagGaussian.from_standard(A([0.3, 1.2]), A([1.2, 1.8])),
            False,
        ),
        (
            "fullrank_gaussian",
            fr,
            fr.from_standard(A([0.0, 1.0]), cov0),
            fr.from_standard(A([0.1, 0.9]), cov1),
            False,
        ),
        (
            "fixed_var_gaussian",
            em.FixedVarianceGaussian(2.0),
            (A([0.0, 1.0]),),
            (A([1.5, -2.0]),),
            False,
        ),
        ("bernoulli", Bernoulli(), (A([0.0, 1.0]),), (A([0.8, 0.3]),), False),
        ("categorical", Categorical(4), (A([0.1, -0.2, 0.3]),), (A([0.4, 0.1, -0.1]),), False),
        ("poisson", Poisson(), (A([0.0, 1.0]),), (A([0.3, 0.7]),), False),
        ("exponential", Exponential(), (A([-1.0, -2.0]),), (A([-1.3, -1.6]),), False),
        (
            "gamma",
            Gamma(),
            Gamma.from_standard(A([2.0, 5.0]), A([1.0, 2.0])),
            Gamma.from_standard(A([2.6, 4.0]), A([1.3, 1.7])),
            True,
        ),
        (
            "beta",
            Beta(),
            Beta.from_standard(A([2.0, 3.0]), A([3.0, 1.5])),
            Beta.from_standard(A([2.5, 2.5]), A([2.6, 1.8])),
            True,
        ),
        ("dirichlet", Dirichlet(3), (A([1.0, 2.0, 0.5]),), (A([1.4, 1.6, 0.8]),), True),
        (
            "normal_gamma",
            em.NormalGamma(),
            em.NormalGamma.from_standard(0.0, 2.0, 3.0, 2.0),
            em.NormalGamma.from_standard(0.4, 2.5, 3.5, 2.6),
            True,
        ),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


def _explicit_newton(fam, eta, t):
    """``eta - H^+ (grad A - t)`` with ``H = jax.hessian`` of ``sum A`` in flat coordinates."""
    flat = fam.flatten(eta)
    shape = flat.shape
    a_of = lambda v: jnp.sum(fam.log_partition(fam.unflatten(v.reshape(shape))))
    vec = flat.ravel()
    grad = jax.grad(a_of)(vec) - fam.flatten(t).ravel()
    hess = jax.hessian(a_of)(vec)
    # pinv: FullRankGaussian's A sees only sym(eta2), so H is singular on antisymmetric parts
    return fam.unflatten((vec - jnp.linalg.pinv(hess, hermitian=True) @ grad).reshape(shape))


@functools.lru_cache(maxsize=None)
def _results(name: str) -> dict:
    """Everything the per-family tests check, computed in one compiled call per family."""
    _, fam, eta0, eta_star, _ = CASES[IDS.index(name)]
    flat = fam.flatten

    @jax.jit
    def compute(eta0, eta_star):
        t = fam.natural_to_mean(eta_star)
        step_mean = em.natural_step(fam, eta0, t, lr=1.0, coords="mean")
        diff = tuple(a - b for a, b in zip(fam.natural_to_mean(eta0), t))
        g_m = em.mean_coords_gradient(fam, eta0, t)
        step = lambda lr: em.natural_step(fam, eta0, t, lr, "mean")
        tangent = jax.jvp(step, (0.0,), (1.0,))[1]
        iterates, eta = [], eta0
        for _ in range(6):
            eta = em.natural_step(fam, eta, t, lr=1.0, coords="natural")
            iterates.append(flat(eta))
        return {
            "t": flat(t),
            "eta_star": flat(eta_star),
            "step_mean": flat(step_mean),
            "m_step": flat(em.m_step(fam, t)),
            "moments": flat(fam.natural_to_mean(step_mean)),
            "f_times_grad_m": flat(fam.fisher_vp(eta0, g_m)),
            "m_minus_t": flat(diff),
            "tangent": flat(tangent),
            "natural_dir": -flat(em.natural_gradient(fam, eta0, t, coords="natural")),
            "newton": flat(_explicit_newton(fam, eta0, t)),
            "iterates": iterates,
        }

    return {k: np.asarray(v) for k, v in compute(eta0, eta_star).items()}


def _err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / (1.0 + np.max(np.abs(b))))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unit_mean_step_is_m_step(case):
    name, _, _, _, newton = case
    res = _results(name)
    assert _err(res["step_mean"], res["m_step"]) <= CLOSED_FORM_TOL
    # the M-step matches the moments: exactly for closed forms, to solver tolerance otherwise
    tol = NEWTON_TOL if newton else CLOSED_FORM_TOL
    assert _err(res["moments"], res["t"]) <= tol
    assert _err(res["step_mean"], res["eta_star"]) <= tol
    # mean-coordinate geometry: F_m = F^{-1}, so F_m^{-1} grad_m KL = F F^{-1} (m - t) = m - t
    assert _err(res["f_times_grad_m"], res["m_minus_t"]) <= 1e-10


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_direction_is_coordinate_invariant(case):
    """d/dlr of the mean-coordinate step at lr = 0, seen in eta, is -F^{-1}(m - t)."""
    res = _results(case[0])
    assert _err(res["tangent"], res["natural_dir"]) <= 1e-8


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unit_natural_step_is_newton_step_and_converges(case):
    name, _, _, _, newton = case
    res = _results(name)
    assert _err(res["iterates"][0], res["newton"]) <= 1e-8
    errs = [_err(it, res["m_step"]) for it in res["iterates"]]
    assert errs[-1] <= (NEWTON_TOL if newton else CLOSED_FORM_TOL)
    if name == "fixed_var_gaussian":  # A quadratic: the first Newton step is exact
        assert errs[0] <= CLOSED_FORM_TOL
    else:  # A not quadratic: not exact after one step, then quadratic convergence
        assert errs[0] > 1e-4
        assert errs[2] <= 10.0 * errs[1] ** 2 / errs[0] + 1e-12


def test_overcomplete_categorical_mean_step():
    """Overcomplete Categorical: mean step lands on log(t) (F singular: no natural-coord step)."""
    fam = Categorical(3, minimal=False)
    t = (A([0.2, 0.5, 0.3]),)
    step = em.natural_step(fam, fam.init(), t, 1.0, "mean")
    np.testing.assert_allclose(step[0], jnp.log(t[0]), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="damping"):
        em.natural_step(fam, fam.init(), t, 1.0, "natural")


# ---------------------------------------------------------------- practice problem 1


def test_practice_problem_bernoulli_by_the_numbers():
    fam, eta0, t = Bernoulli(), (A(0.0),), (A(0.8),)
    nat = em.natural_step(fam, eta0, t, 1.0, "natural")[0]
    assert float(nat) == pytest.approx(1.2, abs=1e-15)  # 0 + (0.8 - 0.5) / 0.25
    mean = em.natural_step(fam, eta0, t, 1.0, "mean")[0]
    assert float(mean) == pytest.approx(math.log(4.0), abs=1e-15)  # logit(0.8) = 1.3863
    assert float(jax.nn.sigmoid(mean)) == pytest.approx(0.8, abs=1e-15)
    assert float(jax.nn.sigmoid(nat)) == pytest.approx(0.76852478, abs=1e-8)  # undershoots
    half = em.natural_step(fam, eta0, t, 0.5, "mean")[0]  # m = 0.65
    assert float(jax.nn.sigmoid(half)) == pytest.approx(0.65, abs=1e-15)


def test_practice_problem_gaussian_by_the_numbers():
    # known variance 2: A(eta) = eta^2 (quadratic); target mean 3 -> eta = 3 / 2 in one step
    fam, eta0, t = em.FixedVarianceGaussian(2.0), (A(0.0),), (A(3.0),)
    for coords in ("natural", "mean"):
        assert float(em.natural_step(fam, eta0, t, 1.0, coords)[0]) == pytest.approx(1.5, abs=0)
    # unknown variance: A not quadratic. From N(0, 1) towards N(0.5, 1), i.e. t = (0.5, 1.25):
    diag = DiagGaussian()
    eta0, t = DiagGaussian.from_standard(0.0, 1.0), (A(0.5), A(1.25))
    loc, sd = diag.standard(em.natural_step(diag, eta0, t, 1.0, "natural"))
    assert (float(loc), float(sd**2)) == pytest.approx((2.0 / 3.0, 4.0 / 3.0), abs=1e-14)
    loc, sd = diag.standard(em.natural_step(diag, eta0, t, 1.0, "mean"))
    assert (float(loc), float(sd**2)) == pytest.approx((0.5, 1.0), abs=1e-14)
    # towards N(1, 1) the unit Newton step lands on eta2 = 0: the boundary (infinite variance)
    eta = em.natural_step(diag, eta0, (A(1.0), A(2.0)), 1.0, "natural")
    assert float(eta[1]) == 0.0


# ---------------------------------------------------------------- EM: Gaussian mixture


def classical_gmm_em(X, w, mu, cov, n_iter):
    """Textbook EM for a full-covariance GMM (Bishop 2006, eq. 9.23-9.28), plain NumPy."""
    hist = []
    n, d = X.shape
    for _ in range(n_iter + 1):
        logp = np.empty((n, len(w)))
        for k in range(len(w)):
            diff = X - mu[k]
            sol = np.linalg.solve(cov[k], diff.T).T
            _, logdet = np.linalg.slogdet(cov[k])
            logp[:, k] = np.log(w[k]) - 0.5 * (
                np.sum(diff * sol, 1) + logdet + d * np.log(2 * np.pi)
            )
        ll = np_logsumexp(logp, axis=1)
        r = np.exp(logp - ll[:, None])
        hist.append((w, mu, cov, r, ll.sum()))
        nk = r.sum(0)
        w = nk / n
        mu = (r.T @ X) / nk[:, None]
        cov = np.stack(
            [((r[:, k, None] * (X - mu[k])).T @ (X - mu[k])) / nk[k] for k in range(len(w))]
        )
    return hist


def test_gmm_em_natural_steps_equal_classical_em():
    X = np.asarray(gaussian_mixture.load_iris_features(), dtype=np.float64)
    init = em.init_gmm(X, 3, jax.random.PRNGKey(1))
    res = em.fit_gmm(X, 3, 20, init=init)
    ref = classical_gmm_em(X, *map(np.asarray, init), 20)
    for i, (w, mu, cov, r, ll) in enumerate(ref):
        np.testing.assert_allclose(res.params.weights[i], w, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.params.means[i], mu, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.params.covariances[i], cov, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.log_likelihood[i], ll, rtol=1e-13)
        if i < 20:
            np.testing.assert_allclose(res.responsibilities[i], r, rtol=0, atol=1e-12)
    assert np.all(np.diff(np.asarray(res.log_likelihood)) >= -1e-10)


# ---------------------------------------------------------------- EM: Bernoulli mixture


def classical_bmm_em(X, w, p, n_iter, a, b):
    """Textbook (MAP) EM for a Bernoulli mixture (Bishop 2006, eq. 9.55-9.60), NumPy."""
    hist = []
    for _ in range(n_iter + 1):
        logp = np.log(w) + X @ np.log(p).T + (1 - X) @ np.log1p(-p).T
        ll = np_logsumexp(logp, axis=1)
        r = np.exp(logp - ll[:, None])
        hist.append((w, p, r, ll.sum()))
        nk = r.sum(0)
        w = nk / X.shape[0]
        p = (r.T @ X + a - 1) / (nk[:, None] + a + b - 2)
    return hist


def test_bernoulli_mixture_natural_steps_equal_classical_em():
    X, _ = bernoulli_mixture.load_binary_digits(500)
    res = em.fit_bernoulli_mixture(X, 10, 20, key=jax.random.PRNGKey(3))
    w0, p0 = (np.asarray(v[0]) for v in res.params)
    ref = classical_bmm_em(X, w0, p0, 20, *bernoulli_mixture.BETA_PRIOR)
    for i, (w, p, r, ll) in enumerate(ref):
        np.testing.assert_allclose(res.params.weights[i], w, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.params.probs[i], p, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.log_likelihood[i], ll, rtol=1e-13)
        if i < 20:
            np.testing.assert_allclose(res.responsibilities[i], r, rtol=0, atol=1e-11)
    assert np.all(np.diff(np.asarray(res.objective)) >= -1e-9)  # MAP-EM: log posterior


# ---------------------------------------------------------------- VB: CAVI and SVI

N_SVI, B_SVI = 20_000, 200


@pytest.fixture(scope="module")
def synthetic():
    X = bayes_gmm.synthetic(N_SVI, jax.random.PRNGKey(0))
    # k-means++ seeds; key 1 reaches the global optimum (key 2 stalls in a worse local one)
    init = em.init_bayes_gmm(X, 3, bayes_gmm.PRIOR, jax.random.PRNGKey(1))
    cavi = em.fit_cavi_gmm(X, 3, 40, init=init, prior=bayes_gmm.PRIOR)
    return np.asarray(X), init, cavi


def classical_cavi(X, alpha, m, beta, a, b, prior, n_iter):
    """Hand-written VB-EM for the diagonal Bayesian GMM (Bishop 2006, eq. 10.46-10.66)."""
    alpha0, m0, beta0, a0, b0 = prior
    hist = []
    for _ in range(n_iter):
        e_log_pi = np_digamma(alpha) - np_digamma(alpha.sum())
        e_log_tau = np_digamma(a) - np.log(b)  # (K, D)
        quad = 1.0 / beta[None] + (a / b)[None] * (X[:, None, :] - m[None]) ** 2
        log_rho = e_log_pi + 0.5 * np.sum(e_log_tau[None] - np.log(2 * np.pi) - quad, -1)
        r = np.exp(log_rho - np_logsumexp(log_rho, 1, keepdims=True))
        nk = r.sum(0)
        xbar = (r.T @ X) / nk[:, None]
        sk = np.stack([r[:, k] @ (X - xbar[k]) ** 2 for k in range(len(nk))]) / nk[:, None]
        alpha = alpha0 + nk
        beta = beta0 + nk[:, None]
        m = (beta0 * m0 + nk[:, None] * xbar) / beta
        a = a0 + 0.5 * nk[:, None]
        b = b0 + 0.5 * (
            nk[:, None] * sk + beta0 * nk[:, None] / (beta0 + nk[:, None]) * (xbar - m0) ** 2
        )
        hist.append((r, alpha, m, beta, a, b))
    return hist


def test_cavi_unit_natural_steps_equal_handwritten_cavi(synthetic):
    X, init, cavi = synthetic
    p0 = jax.tree_util.tree_map(lambda v: np.asarray(v[0]), cavi.params)
    ref = classical_cavi(X, *p0, bayes_gmm.PRIOR, 40)
    for i, (r, *params) in enumerate(ref):
        np.testing.assert_allclose(cavi.responsibilities[i], r, rtol=0, atol=1e-11)
        for got, want in zip(cavi.params, params):
            want = np.broadcast_to(want, got[i + 1].shape)
            np.testing.assert_allclose(got[i + 1], want, rtol=1e-11)
    elbo = np.asarray(cavi.elbo)
    assert np.all(np.diff(elbo) >= -1e-9 * np.abs(elbo[1:]))
    assert abs(elbo[-1] - elbo[-2]) < 1e-6  # converged: the full-batch VB solution


def test_bayes_gmm_model_uses_subsampled_plate_scale():
    """NumPyro scales the minibatch likelihood by N / B; fit_svi_gmm reads that scale."""
    from numpyro.handlers import seed, substitute, trace
    from numpyro.infer.util import log_density

    X = jnp.asarray(bayes_gmm.synthetic(1000, jax.random.PRNGKey(5)))

    values = {
        "weights": A([0.5, 0.3, 0.2]),
        "tau": jnp.full((3, 2), 2.0),
        "mu": A(bayes_gmm.TRUE_LOCS),
    }

    @jax.jit
    def densities(key):
        model = substitute(seed(bayes_gmm.model, key), values)
        tr = trace(model).get_trace(X=X, subsample_size=50)
        idx = tr["data"]["value"]
        sub = {"X": X, "subsample_size": 50}
        lp_sub, _ = log_density(bayes_gmm.model, (), sub, {**values, "data": idx})
        lp_batch, _ = log_density(bayes_gmm.model, (), {"X": X[idx]}, values)
        ll_batch = tr["X"]["fn"].log_prob(X[idx]).sum()
        return tr["X"]["scale"], idx, lp_sub, lp_batch, ll_batch

    scale, idx, lp_sub, lp_batch, ll_batch = densities(jax.random.PRNGKey(0))
    assert float(scale) == pytest.approx(1000 / 50)
    assert len(set(np.asarray(idx).tolist())) == 50  # without replacement
    # log p(theta) + (N / B) sum_{batch} log p(x_n | theta)
    assert float(lp_sub) == pytest.approx(float(lp_batch + 19.0 * ll_batch), rel=1e-12)


SVI_TOL = 0.05  # max |E[mu] - E_VB[mu]| and |E[pi] - E_VB[pi]| (component sds are 0.5-1.5)


def test_svi_reaches_full_batch_vb_solution(synthetic):
    X, init, cavi = synthetic
    vb = jax.tree_util.tree_map(lambda v: v[-1], cavi.params)
    # i.i.d. uniform minibatches (the default), statistics scaled by the plate's N / B
    res = em.fit_svi_gmm(X, 3, 300, B_SVI, init=init, prior=bayes_gmm.PRIOR)
    assert res.plate_scale == pytest.approx(N_SVI / B_SVI)
    np.testing.assert_allclose(res.step_sizes[:3], (np.arange(3) + 1.0) ** -0.7)
    last = jax.tree_util.tree_map(lambda v: v[-1], res.params)
    start = jax.tree_util.tree_map(lambda v: v[0], res.params)
    assert em.vb_distance(vb, start) > 4 * SVI_TOL
    assert em.vb_distance(vb, last) < SVI_TOL


# ---------------------------------------------------------------- checks, tol, restarts


def _small(n=6, seed=0):
    return np.random.RandomState(seed).randn(n, 2)


FITS = {
    "fit_gmm": lambda X, K, **kw: em.fit_gmm(X, K, 5, **kw),
    "fit_bernoulli_mixture": lambda X, K, **kw: em.fit_bernoulli_mixture(
        (np.asarray(X) > 0).astype(float) if np.isfinite(X).all() else X, K, 5, **kw
    ),
    "fit_cavi_gmm": lambda X, K, **kw: em.fit_cavi_gmm(X, K, 5, **kw),
    "fit_svi_gmm": lambda X, K, **kw: em.fit_svi_gmm(X, K, 5, 2, **kw),
}


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_every_fit_checks_its_input_first(fit):
    X = _small()
    X[[2, 5], 1] = [np.nan, np.inf]
    with pytest.raises(ngvi.DataError, match=r"NaN or inf in 2 of its 6 rows, rows \[2, 5\]"):
        fit(X, 2)
    with pytest.raises(ngvi.DataError, match=r"2-D array .* got shape \(6,\)"):
        fit(_small()[:, 0], 2)
    with pytest.raises(ngvi.ConfigError, match=r"K=7 components but X has only 6 rows.*K <= 6"):
        fit(_small(), 7)
    with pytest.raises(ngvi.ConfigError, match="K must be an integer >= 1, got 0"):
        fit(_small(), 0)
    with pytest.raises(ngvi.ConfigError, match=r"tol must be a positive finite number, got -1"):
        fit(_small(), 2, tol=-1.0)
    with pytest.raises(ngvi.ConfigError, match="num_restarts must be an integer >= 1, got 0"):
        fit(_small(), 2, num_restarts=0)


def test_init_that_contradicts_k_is_named():
    X = _small()
    gmm2 = em.init_gmm(X, 2)
    with pytest.raises(ngvi.ConfigError, match=r"init GMMParams.weights has shape \(2,\), but K=3"):
        em.fit_gmm(X, 3, 5, init=gmm2)
    bad = gmm2._replace(weights=jnp.array([0.9, 0.3]))
    with pytest.raises(ngvi.ConfigError, match="weights must be positive and sum to 1"):
        em.fit_gmm(X, 2, 5, init=bad)
    vb2 = em.init_bayes_gmm(X, 2)
    for fit in (em.fit_cavi_gmm, lambda *a, **k: em.fit_svi_gmm(*a, batch_size=3, **k)):
        with pytest.raises(ngvi.ConfigError, match=r"init VBState.eta_pi\[0\] has shape \(2,\)"):
            fit(X, 3, 5, init=vb2)
    bmm = em.BernoulliMixtureParams(jnp.full(2, 0.5), jnp.full((3, 2), 0.5))
    with pytest.raises(ngvi.ConfigError, match=r"probs has shape \(3, 2\).*need \(2, 2\)"):
        em.fit_bernoulli_mixture((X > 0).astype(float), 2, 5, init=bmm)
    with pytest.raises(ngvi.ConfigError, match="num_restarts=3 with an explicit init"):
        em.fit_gmm(X, 2, 5, init=gmm2, num_restarts=3)


def test_step_sizes_and_options_are_checked():
    fam = Bernoulli()
    for lr in (0.0, -0.5, float("nan")):
        with pytest.raises(ngvi.ConfigError, match=r"lr must be a positive finite number"):
            em.natural_step(fam, (A(0.0),), (A(0.8),), lr)
        with pytest.raises(ngvi.ConfigError, match=r"lr must be a positive finite number"):
            em.reverse_natural_step((A(0.0),), (A(1.0),), lr)
    X = _small(20)
    with pytest.raises(ngvi.ConfigError, match=r"batch_size=21 exceeds the 20 rows"):
        em.fit_svi_gmm(X, 2, 5, 21)
    with pytest.raises(ngvi.ConfigError, match=r"kappa must be in \(0.5, 1\].*got 0.3"):
        em.fit_svi_gmm(X, 2, 5, 4, kappa=0.3)
    with pytest.raises(ngvi.ConfigError, match="tau must be a positive finite number, got 0"):
        em.fit_svi_gmm(X, 2, 5, 4, tau=0.0)
    with pytest.raises(ngvi.ConfigError, match=r"subsample must be one of .* got 'plate'"):
        em.fit_svi_gmm(X, 2, 5, 4, subsample="plate")
    with pytest.raises(ngvi.ConfigError, match="prior.beta0 must be a positive"):
        em.fit_cavi_gmm(X, 2, 5, prior=em.BayesGMMPrior(beta0=0.0))
    with pytest.raises(ngvi.ConfigError, match=r"beta_prior .* >= 1 .* got \(0.5, 1.0\)"):
        em.fit_bernoulli_mixture((X > 0).astype(float), 2, 5, beta_prior=(0.5, 1.0))
    Xb = (X > 0).astype(float)
    Xb[3, 1] = 0.5
    with pytest.raises(ngvi.DataError, match=r"X in \{0, 1\}, but rows \[3\].*row 3 has 0.5"):
        em.fit_bernoulli_mixture(Xb, 2, 5)


def test_tol_stops_em_early_and_reports_it():
    X = np.asarray(gaussian_mixture.load_iris_features(), dtype=np.float64)
    init = em.init_gmm(X, 3, jax.random.PRNGKey(1))
    res = em.fit_gmm(X, 3, 300, init=init, tol=1e-6)
    n = res.num_iters
    assert res.converged and 2 <= n < 300
    assert res.params.means.shape[0] == res.log_likelihood.shape[0] == n + 1
    assert res.responsibilities.shape[0] == n
    changes = np.abs(np.diff(np.asarray(res.log_likelihood)))
    assert changes[-1] < 1e-6 and np.all(changes[:-1] >= 1e-6)  # stopped at the first
    # the stopped run is a prefix of the run without tol, which runs every iteration
    full = em.fit_gmm(X, 3, 300, init=init)
    assert full.num_iters == 300 and full.params.means.shape[0] == 301
    np.testing.assert_array_equal(full.params.means[: n + 1], res.params.means)
    np.testing.assert_array_equal(full.log_likelihood[: n + 1], res.log_likelihood)


def test_tol_stops_cavi_and_svi(synthetic):
    X, init, _ = synthetic
    cavi = em.fit_cavi_gmm(X, 3, 40, init=init, prior=bayes_gmm.PRIOR, tol=1e-3)
    assert cavi.converged and cavi.num_iters < 40
    assert cavi.elbo.shape == (cavi.num_iters,) and abs(cavi.elbo[-1] - cavi.elbo[-2]) < 1e-3
    assert cavi.params.loc.shape[0] == cavi.num_iters + 1
    svi = em.fit_svi_gmm(X, 3, 300, B_SVI, init=init, prior=bayes_gmm.PRIOR, tol=1e-2)
    assert svi.converged and svi.num_iters < 300
    assert svi.step_sizes.shape == (svi.num_iters,) and svi.params.loc.shape[0] == svi.num_iters + 1
    moved = np.abs(np.asarray(svi.params.loc[-1] - svi.params.loc[-2])).max()
    assert moved < 1e-2


def test_restarts_keep_the_best_final_objective(synthetic):
    X, _, _ = synthetic
    key = jax.random.PRNGKey(2)  # k-means++ with this key stalls in a worse local optimum
    single = em.fit_cavi_gmm(X, 3, 40, prior=bayes_gmm.PRIOR, key=key)
    best = em.fit_cavi_gmm(X, 3, 40, prior=bayes_gmm.PRIOR, key=key, num_restarts=3)
    scores = np.asarray(best.restart_objectives)
    assert scores.shape == (3,) and single.restart_objectives is None
    assert scores[0] == pytest.approx(float(single.elbo[-1]), rel=1e-12)  # restart 0 = the fit
    assert float(best.elbo[-1]) == scores.max() > float(single.elbo[-1]) + 1.0
    svi = em.fit_svi_gmm(X, 3, 300, B_SVI, prior=bayes_gmm.PRIOR, key=key, num_restarts=2)
    assert svi.elbo == np.max(svi.restart_objectives) and svi.restart_objectives.shape == (2,)
    iris = np.asarray(gaussian_mixture.load_iris_features(), dtype=np.float64)
    gmm = em.fit_gmm(iris, 3, 300, key=key, num_restarts=3)
    assert gmm.restart_objectives.shape == (3,)
    assert float(gmm.objective[-1]) == np.max(gmm.restart_objectives)


def test_svi_minibatch_scale_and_full_batch():
    """With every row equal, any minibatch has the full data's statistics once scaled by N / B,
    so the first SVI step (rho_0 = 1) is the CAVI step for every B and sampler; a wrong scale
    (1, or N) would not be. ``batch_size=len(X)`` is the full batch (NumPyro's plate scale is
    then None, i.e. 1)."""
    same = np.tile([[0.5, -1.0]], (40, 1))
    prior = bayes_gmm.PRIOR
    init = em.init_bayes_gmm([[0.5, -1.0], [1.5, 0.0]], 2, prior, scale=20.0)
    cavi = em.fit_cavi_gmm(same, 2, 1, init=init, prior=prior)
    for batch, sampler in ((40, "uniform"), (1, "uniform"), (8, "numpyro")):
        svi = em.fit_svi_gmm(same, 2, 1, batch, init=init, prior=prior, subsample=sampler)
        assert svi.plate_scale == pytest.approx(40 / batch) and svi.num_iters == 1
        for got, want in zip(svi.params, cavi.params):
            np.testing.assert_allclose(got[1], want[1], rtol=1e-10)


def _shapes_in_loop(jaxpr) -> set:
    """Every intermediate shape inside the scan body of ``jaxpr`` (sub-jaxprs included)."""
    out = set()

    def walk(jx, inside):
        for eqn in jx.eqns:
            if inside:
                out.update(tuple(v.aval.shape) for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub, inside or eqn.primitive.name == "scan")

    walk(jaxpr.jaxpr, False)
    return out


def test_svi_default_minibatch_is_o_batch_not_o_n():
    """No array of the data's length N inside the SVI loop with the default sampler (NumPyro's
    plate shuffles an ``arange(N)`` each step)."""
    from ngvi.em.vb import _svi_loop

    n, b = 9973, 16  # a prime N, so no other shape matches it by chance
    X = jnp.asarray(np.random.RandomState(0).randn(n, 2))
    init = em.init_bayes_gmm(X[:100], 2)
    args = (X, init, jax.random.PRNGKey(0), n / b, 1.0, 0.7, -1.0, False, bayes_gmm.PRIOR)

    def shapes(sampler):
        fn = lambda *a: _svi_loop.__wrapped__(*a, sampler, b, 3)
        return _shapes_in_loop(jax.make_jaxpr(fn)(*args))

    assert not any(n in s for s in shapes("uniform"))
    assert any(n in s for s in shapes("numpyro"))  # the check would see an O(N) draw


def test_discrete_site_error_says_what_to_call():
    import numpyro
    import numpyro.distributions as dist

    X = np.asarray(gaussian_mixture.load_iris_features(), dtype=np.float64)

    def mixture(X):
        locs = numpyro.sample("locs", dist.Normal(0, 3).expand([3, 2]).to_event(2))
        with numpyro.plate("data", X.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(3) / 3))
            numpyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=X)

    guide = ngvi.MeanFieldGaussian(mixture)
    with pytest.raises(ngvi.ModelError, match=r"ngvi.em.fit_gmm\(X, K, num_iters\)") as err:
        ngvi.NGVI(mixture, guide).init(jax.random.PRNGKey(0), X)
    assert "MixtureSameFamily" in str(err.value) and "fit_cavi_gmm(X, K, num_iters)" in str(
        err.value
    )
    res = em.fit_gmm(X, 3, 300)  # the call the message names runs as written
    assert res.log_likelihood[-1] > res.log_likelihood[0]
