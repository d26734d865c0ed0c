"""Regressions and GLMs: linear (scikit-learn's diabetes data), logistic (breast cancer data),
Student-t and Cauchy likelihoods, Poisson with exposures (fixed and random effects), binomial with
random effects (the BUGS "seeds" counts), negative binomial with an offset, and two sparse
regressions (horseshoe, Laplace prior)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from benchmarks.zoo._data import rng, to_jax
from benchmarks.zoo.registry import register


def _standardize(X):
    return (X - X.mean(0)) / X.std(0)


# -- linear regression with unknown noise: diabetes (442 x 10, bundled with scikit-learn)
@functools.lru_cache(maxsize=1)
def _diabetes_np():
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    return _standardize(X), (y - y.mean()) / y.std()


def linear_regression(X, y=None):
    """alpha ~ N(0, 1), beta ~ N(0, 1) (p), sigma ~ HalfNormal(1), y ~ N(alpha + X beta, sigma)."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 1.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(X.shape[1]), 1.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + X @ beta, sigma), obs=y)


def _diabetes_data():
    X, y = _diabetes_np()
    return to_jax((X,), {"y": y})


# -- logistic regression: breast cancer (569 x 30, bundled with scikit-learn)
@functools.lru_cache(maxsize=1)
def _cancer_np():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    return _standardize(X), y.astype(np.int32)


def logistic_regression(X, y=None):
    """alpha ~ N(0, 1), beta ~ N(0, 1) (p), y ~ Bernoulli(logit alpha + X beta)."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 1.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(X.shape[1]), 1.0).to_event(1))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def _cancer_data():
    X, y = _cancer_np()
    return to_jax((X,), {"y": y})


# -- heavy-tailed likelihoods
@functools.lru_cache(maxsize=1)
def _student_np():
    r = rng(41)
    X = r.standard_normal((100, 3))
    y = 1.0 + X @ np.array([2.0, -1.0, 0.5]) + 0.5 * r.standard_t(3.0, 100)
    return X, y


def student_t_regression(X, y=None):
    """alpha ~ N(0, 5), beta ~ N(0, 5) (3), sigma ~ HalfNormal(2), nu ~ Gamma(2, 0.1),
    y ~ StudentT(nu, alpha + X beta, sigma)."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(X.shape[1]), 5.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    nu = numpyro.sample("nu", dist.Gamma(2.0, 0.1))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.StudentT(nu, alpha + X @ beta, sigma), obs=y)


def _student_data():
    X, y = _student_np()
    return to_jax((X,), {"y": y})


@functools.lru_cache(maxsize=1)
def _cauchy_np():
    r = rng(42)
    x = r.uniform(-2, 2, 60)
    return x, 0.5 + 1.5 * x + 0.3 * r.standard_cauchy(60)


def cauchy_regression(x, y=None):
    """alpha, beta ~ N(0, 5), scale ~ HalfCauchy(1), y ~ Cauchy(alpha + beta x, scale)."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 5.0))
    scale = numpyro.sample("scale", dist.HalfCauchy(1.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Cauchy(alpha + beta * x, scale), obs=y)


def _cauchy_data():
    x, y = _cauchy_np()
    return to_jax((x,), {"y": y})


# -- count GLMs with exposures
@functools.lru_cache(maxsize=1)
def _counts_np():
    r = rng(43)
    n, groups = 150, 15
    X = r.standard_normal((n, 2))
    exposure = r.uniform(0.5, 5.0, n)
    group = r.integers(0, groups, n).astype(np.int32)
    u = 0.5 * r.standard_normal(groups)
    log_mu = np.log(exposure) + 0.3 + X @ np.array([0.5, -0.4]) + u[group]
    y_pois = r.poisson(np.exp(log_mu)).astype(np.int32)
    mu = np.exp(log_mu - u[group])
    y_nb = r.poisson(r.gamma(3.0, mu / 3.0)).astype(np.int32)  # NB2 with concentration 3
    return X, exposure, group, groups, y_pois, y_nb


def poisson_regression(X, exposure, y=None):
    """a ~ N(0, 5), b ~ N(0, 2) (2), y ~ Poisson(exposure exp(a + X b))."""
    a = numpyro.sample("a", dist.Normal(0.0, 5.0))
    b = numpyro.sample("b", dist.Normal(jnp.zeros(X.shape[1]), 2.0).to_event(1))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Poisson(exposure * jnp.exp(a + X @ b)), obs=y)


def poisson_random_effects(X, exposure, group, num_groups, y=None):
    """Poisson regression with group intercepts u_g = sigma_u z_g (non-centered),
    z_g ~ N(0, 1), sigma_u ~ HalfNormal(1)."""
    a = numpyro.sample("a", dist.Normal(0.0, 5.0))
    b = numpyro.sample("b", dist.Normal(jnp.zeros(X.shape[1]), 2.0).to_event(1))
    sigma_u = numpyro.sample("sigma_u", dist.HalfNormal(1.0))
    with numpyro.plate("group", num_groups):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", X.shape[0]):
        rate = exposure * jnp.exp(a + X @ b + sigma_u * z[group])
        numpyro.sample("y", dist.Poisson(rate), obs=y)


def negbin_regression(X, exposure, y=None):
    """y ~ NegativeBinomial2(exposure exp(a + X b), phi), phi ~ Gamma(2, 0.5)."""
    a = numpyro.sample("a", dist.Normal(0.0, 5.0))
    b = numpyro.sample("b", dist.Normal(jnp.zeros(X.shape[1]), 2.0).to_event(1))
    phi = numpyro.sample("phi", dist.Gamma(2.0, 0.5))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.NegativeBinomial2(exposure * jnp.exp(a + X @ b), phi), obs=y)


def _poisson_data():
    X, e, _, _, y, _ = _counts_np()
    return to_jax((X, e), {"y": y})


def _poisson_re_data():
    X, e, g, G, y, _ = _counts_np()
    return to_jax((X, e, g, G), {"y": y})


def _negbin_data():
    X, e, _, _, _, y = _counts_np()
    return to_jax((X, e), {"y": y})


# -- binomial GLM with random effects: the "seeds" counts (Crowder 1978; BUGS examples)
_SEEDS_R = [10, 23, 23, 26, 17, 5, 53, 55, 32, 46, 10, 8, 10, 8, 23, 0, 3, 22, 15, 32, 3]
_SEEDS_N = [39, 62, 81, 51, 39, 6, 74, 72, 51, 79, 13, 16, 30, 28, 45, 4, 12, 41, 30, 51, 7]
_SEEDS_X1 = [0] * 11 + [1] * 10
_SEEDS_X2 = [0] * 5 + [1] * 6 + [0] * 4 + [1] * 6


def seeds(x1, x2, trials, r=None):
    """logit p_i = a0 + a1 x1 + a2 x2 + a12 x1 x2 + b_i, b_i = sigma z_i, z_i ~ N(0, 1),
    a ~ N(0, 10) (4), sigma ~ HalfNormal(1), r_i ~ Binomial(trials_i, p_i)."""
    a = numpyro.sample("a", dist.Normal(jnp.zeros(4), 10.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("plate", x1.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        logits = a[0] + a[1] * x1 + a[2] * x2 + a[3] * x1 * x2 + sigma * z
        numpyro.sample("r", dist.Binomial(trials, logits=logits), obs=r)


def _seeds_data():
    f = lambda v: np.asarray(v, dtype=float)
    trials = np.asarray(_SEEDS_N, dtype=np.int32)
    return to_jax((f(_SEEDS_X1), f(_SEEDS_X2), trials), {"r": np.asarray(_SEEDS_R, np.int32)})


# -- sparse regressions
@functools.lru_cache(maxsize=1)
def _sparse_np(n=80, p=20):
    r = rng(44)
    X = r.standard_normal((n, p))
    beta = np.zeros(p)
    beta[:3] = [2.0, -1.5, 1.0]
    return X, X @ beta + 0.5 + r.standard_normal(n)


def horseshoe_regression(X, y=None):
    """beta_j = tau lambda_j z_j (non-centered), tau, lambda_j ~ HalfCauchy(1), z_j ~ N(0, 1),
    alpha ~ N(0, 5), sigma ~ HalfNormal(2), y ~ N(alpha + X beta, sigma)."""
    p = X.shape[1]
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(1.0))
    with numpyro.plate("feature", p):
        lam = numpyro.sample("lambda", dist.HalfCauchy(1.0))
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    beta = numpyro.deterministic("beta", tau * lam * z)
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + X @ beta, sigma), obs=y)


def laplace_regression(X, y=None):
    """Bayesian lasso: beta_j ~ Laplace(0, b), b ~ HalfCauchy(1), alpha ~ N(0, 5),
    sigma ~ HalfNormal(2), y ~ N(alpha + X beta, sigma)."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    b = numpyro.sample("b", dist.HalfCauchy(1.0))
    with numpyro.plate("feature", X.shape[1]):
        beta = numpyro.sample("beta", dist.Laplace(0.0, b))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + X @ beta, sigma), obs=y)


def _sparse_data():
    X, y = _sparse_np()
    return to_jax((X,), {"y": y})


register(
    "linear_regression",
    linear_regression,
    _diabetes_data,
    12,
    "regression",
    expfam=True,
    quick=True,
    note="scikit-learn diabetes data, standardized",
)
register(
    "logistic_regression",
    logistic_regression,
    _cancer_data,
    31,
    "regression",
    expfam=False,
    note="scikit-learn breast cancer data, standardized",
)
register("student_t_regression", student_t_regression, _student_data, 6, "heavy tails", expfam=True)
register("cauchy_regression", cauchy_regression, _cauchy_data, 3, "heavy tails", expfam=True)
register(
    "poisson_regression", poisson_regression, _poisson_data, 3, "GLM", expfam=False, quick=True
)
register(
    "poisson_random_effects",
    poisson_random_effects,
    _poisson_re_data,
    19,
    "GLM",
    expfam=True,
    target_accept=0.9,
)
register("negbin_regression", negbin_regression, _negbin_data, 4, "GLM", expfam=True)
register("seeds", seeds, _seeds_data, 26, "GLM", expfam=True, target_accept=0.9)
register(
    "horseshoe_regression",
    horseshoe_regression,
    _sparse_data,
    43,
    "sparse",
    expfam=True,
    target_accept=0.99,
)
register(
    "laplace_regression",
    laplace_regression,
    _sparse_data,
    23,
    "sparse",
    expfam=True,
    target_accept=0.9,
)
