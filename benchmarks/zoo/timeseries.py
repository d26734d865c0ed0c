"""Time series and latent fields: a local-level random walk, AR(1), AR(2), stochastic volatility
(NumPyro's example model), a marginalised change point and a 1-D log-Gaussian Cox process."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp

from benchmarks.zoo._data import rng, to_jax
from benchmarks.zoo.registry import register


# -- local level: a Gaussian random walk seen with noise
@functools.lru_cache(maxsize=1)
def _local_level_np(T=100):
    r = rng(31)
    x = np.cumsum(0.3 * r.standard_normal(T))
    return x + 0.5 * r.standard_normal(T)


def local_level(T, y=None):
    """x ~ GaussianRandomWalk(sigma_w, T), y_t ~ N(x_t, sigma_v); HalfNormal(1) scales."""
    sigma_w = numpyro.sample("sigma_w", dist.HalfNormal(1.0))
    sigma_v = numpyro.sample("sigma_v", dist.HalfNormal(1.0))
    x = numpyro.sample("x", dist.GaussianRandomWalk(scale=sigma_w, num_steps=T))
    numpyro.sample("y", dist.Normal(x, sigma_v).to_event(1), obs=y)


def _local_level_data():
    y = _local_level_np()
    return to_jax((y.shape[0],), {"y": y})


# -- autoregressions
@functools.lru_cache(maxsize=2)
def _ar_np(phis, T=200, seed=32):
    r = rng(seed)
    p = len(phis)
    y = np.zeros(T + 50)
    for t in range(p, T + 50):
        y[t] = sum(phis[k] * y[t - 1 - k] for k in range(p)) + 0.8 * r.standard_normal()
    return 1.0 + y[50:]


def ar1(y):
    """y_0 ~ N(mu, sigma / sqrt(1 - phi^2)) (stationary), y_t ~ N(mu + phi (y_{t-1} - mu), sigma);
    phi ~ Uniform(-1, 1), mu ~ N(0, 5), sigma ~ HalfNormal(2)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    numpyro.sample("y0", dist.Normal(mu, sigma / jnp.sqrt(1 - phi**2)), obs=y[0])
    with numpyro.plate("t", y.shape[0] - 1):
        numpyro.sample("y", dist.Normal(mu + phi * (y[:-1] - mu), sigma), obs=y[1:])


def ar2(y):
    """y_t ~ N(mu + phi_1 (y_{t-1} - mu) + phi_2 (y_{t-2} - mu), sigma) given y_0, y_1;
    phi ~ N(0, 0.5) (2), mu ~ N(0, 5), sigma ~ HalfNormal(2)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    phi = numpyro.sample("phi", dist.Normal(jnp.zeros(2), 0.5).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    pred = mu + phi[0] * (y[1:-1] - mu) + phi[1] * (y[:-2] - mu)
    with numpyro.plate("t", y.shape[0] - 2):
        numpyro.sample("y", dist.Normal(pred, sigma), obs=y[2:])


def _ar1_data():
    return to_jax((_ar_np((0.7,)),), {})


def _ar2_data():
    return to_jax((_ar_np((0.5, -0.3), seed=33),), {})


# -- stochastic volatility (NumPyro's examples/stochastic_volatility.py)
@functools.lru_cache(maxsize=1)
def _sv_np(T=200):
    r = rng(34)
    s = np.cumsum(0.05 * r.standard_normal(T))
    return np.exp(s) * r.standard_t(6.0, T)


def stochastic_volatility(returns):
    """sigma ~ Exponential(50), s ~ GaussianRandomWalk(sigma, T), nu ~ Exponential(0.1),
    r_t ~ StudentT(nu, 0, exp(s_t)) -- NumPyro's example, on simulated daily returns."""
    step_size = numpyro.sample("sigma", dist.Exponential(50.0))
    s = numpyro.sample("s", dist.GaussianRandomWalk(scale=step_size, num_steps=returns.shape[0]))
    nu = numpyro.sample("nu", dist.Exponential(0.1))
    numpyro.sample("r", dist.StudentT(df=nu, loc=0.0, scale=jnp.exp(s)), obs=returns)


def stochastic_volatility_noncentered(returns):
    """The same model with s = cumsum(sigma z), z ~ N(0, I) (the random walk non-centered)."""
    step_size = numpyro.sample("sigma", dist.Exponential(50.0))
    z = numpyro.sample("z", dist.Normal(jnp.zeros(returns.shape[0]), 1.0).to_event(1))
    s = numpyro.deterministic("s", jnp.cumsum(step_size * z))
    nu = numpyro.sample("nu", dist.Exponential(0.1))
    numpyro.sample("r", dist.StudentT(df=nu, loc=0.0, scale=jnp.exp(s)), obs=returns)


def _sv_data():
    return to_jax((_sv_np(),), {})


# -- change point with the switch marginalised
@functools.lru_cache(maxsize=1)
def _change_point_np(T=100, switch=40):
    r = rng(35)
    rates = np.where(np.arange(T) < switch, 3.0, 1.0)
    return r.poisson(rates).astype(np.int32)


def change_point(counts):
    """early, late ~ Exponential(0.5); switch tau uniform on {0..T-1}, summed out:
    p(y | e, l) = 1/T sum_tau prod_{t<tau} Poi(y_t | e) prod_{t>=tau} Poi(y_t | l)."""
    early = numpyro.sample("early", dist.Exponential(0.5))
    late = numpyro.sample("late", dist.Exponential(0.5))
    T = counts.shape[0]
    lp_e = jnp.concatenate([jnp.zeros(1), jnp.cumsum(dist.Poisson(early).log_prob(counts))])
    lp_l = dist.Poisson(late).log_prob(counts)
    tail = jnp.concatenate([jnp.cumsum(lp_l[::-1])[::-1], jnp.zeros(1)])
    numpyro.factor("y", logsumexp(lp_e[:T] + tail[:T]) - jnp.log(T))


def _change_point_data():
    return to_jax((_change_point_np(),), {})


# -- 1-D log-Gaussian Cox process on a grid
LGCP_CELLS = 40


@functools.lru_cache(maxsize=1)
def _lgcp_np(n=LGCP_CELLS, lengthscale=0.2):
    grid = (np.arange(n) + 0.5) / n
    K = np.exp(-np.abs(grid[:, None] - grid[None, :]) / lengthscale)
    L = np.linalg.cholesky(K)
    r = rng(36)
    f = 1.0 + 0.8 * L @ r.standard_normal(n)
    return r.poisson(np.exp(f)).astype(np.int32), L


def lgcp(chol, counts=None):
    """f ~ MVN(mu 1, amp^2 K) with the exponential (Matern-1/2) covariance K = exp(-|s - s'| / 0.2)
    on 40 cells of [0, 1] (its Cholesky ``chol`` is data); counts_i ~ Poisson(exp f_i);
    mu ~ N(0, 2), amp ~ HalfNormal(1)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    amp = numpyro.sample("amp", dist.HalfNormal(1.0))
    n = chol.shape[0]
    f = numpyro.sample("f", dist.MultivariateNormal(mu * jnp.ones(n), scale_tril=amp * chol))
    numpyro.sample("counts", dist.Poisson(jnp.exp(f)).to_event(1), obs=counts)


def lgcp_noncentered(chol, counts=None):
    """The same model with f = mu + amp chol z, z ~ N(0, I)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    amp = numpyro.sample("amp", dist.HalfNormal(1.0))
    z = numpyro.sample("z", dist.Normal(jnp.zeros(chol.shape[0]), 1.0).to_event(1))
    f = numpyro.deterministic("f", mu + amp * chol @ z)
    numpyro.sample("counts", dist.Poisson(jnp.exp(f)).to_event(1), obs=counts)


def _lgcp_data():
    counts, L = _lgcp_np()
    return to_jax((L,), {"counts": counts})


register(
    "local_level",
    local_level,
    _local_level_data,
    102,
    "time series",
    expfam=True,
    target_accept=0.9,
)
register("ar1", ar1, _ar1_data, 3, "time series", expfam=True, quick=True)
register("ar2", ar2, _ar2_data, 4, "time series", expfam=True)
register(
    "stochastic_volatility",
    stochastic_volatility,
    _sv_data,
    202,
    "time series",
    expfam=True,
    twin="stochastic_volatility_noncentered",
    twin_sites={"sigma": "sigma", "s": "s", "nu": "nu"},
    note="NumPyro's example model, 200 simulated returns; reference from the non-centered twin "
    "(NUTS on this one: r_hat 1.11)",
)
register(
    "stochastic_volatility_noncentered",
    stochastic_volatility_noncentered,
    _sv_data,
    202,
    "time series",
    expfam=True,
    target_accept=0.9,
)
register(
    "change_point", change_point, _change_point_data, 2, "time series", expfam=True, quick=True
)
register(
    "lgcp",
    lgcp,
    _lgcp_data,
    42,
    "latent field",
    expfam=True,
    twin="lgcp_noncentered",
    twin_sites={"mu": "mu", "amp": "amp", "f": "f"},
    note="reference from the non-centered twin (NUTS on this one: 2 divergences, r_hat 1.02)",
)
register("lgcp_noncentered", lgcp_noncentered, _lgcp_data, 42, "latent field", expfam=True)
