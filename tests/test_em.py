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
    # minibatches from the model's numpyro.plate("data", N, subsample_size=B), scale N / B
    res = em.fit_svi_gmm(X, 3, 300, B_SVI, init=init, prior=bayes_gmm.PRIOR)
    assert res.plate_scale == pytest.approx(N_SVI / B_SVI)
    np.testing.assert_allclose(res.step_sizes[:3], (np.arange(3) + 1.0) ** -0.7)
    last = jax.tree_util.tree_map(lambda v: v[-1], res.params)
    start = jax.tree_util.tree_map(lambda v: v[0], res.params)
    assert em.vb_distance(vb, start) > 4 * SVI_TOL
    assert em.vb_distance(vb, last) < SVI_TOL
