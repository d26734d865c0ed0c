r"""Model fits for ``ngvi.em`` (re-exported there): EM, CAVI and stochastic VI as natural steps.

* ``fit_gmm``: full-covariance Gaussian mixture by EM = E-step + unit natural step in mean
  coordinates on each component (``FullRankGaussian``) and on the weights (``Categorical``).
* ``fit_bernoulli_mixture``: mixture of Bernoullis (Bishop 2006, Sec. 9.3.3), MAP-EM under a
  ``Beta(a, b)`` prior on the pixel probabilities (``a = b = 1`` is maximum likelihood).
* ``fit_cavi_gmm``: variational Bayes EM / CAVI for the conjugate diagonal Bayesian GMM
  (``models/bayes_gmm.py``): E-step on ``q(Z)``, then a unit natural step on the ELBO for the
  global ``q(pi) q(mu, tau)``: ``lambda <- eta_0 + sum_n E[t(x_n, z_n)]`` (Bishop Sec. 10.2).
* ``fit_svi_gmm``: stochastic VI (Hoffman et al. 2013, Alg. 1) on the same model: a minibatch
  drawn by the model's subsampled plate ``numpyro.plate("data", N, subsample_size=B)``, whose
  likelihood scale ``N / B`` multiplies the minibatch statistics, and the step
  ``lambda <- (1 - rho_t) lambda + rho_t lambda_hat`` with ``rho_t = (t + tau)^-kappa``.

Every loop is a ``jax.lax.scan`` (one compilation per shape); results are ``NamedTuple``\ s
with the parameters of every iteration stacked on a leading axis.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ngvi.em.core import (
    BayesGMMPrior,
    NormalGamma,
    bayes_gmm_elbo,
    bayes_gmm_global_update,
    bayes_gmm_log_joint,
    mixture_e_step,
    natural_step,
    reverse_natural_step,
    robbins_monro,
)
from ngvi.families import Bernoulli, Categorical, FullRankGaussian, Params

__all__ = [
    "BernoulliMixtureParams",
    "CAVIResult",
    "EMResult",
    "GMMParams",
    "SVIResult",
    "VBParams",
    "VBState",
    "fit_bernoulli_mixture",
    "fit_cavi_gmm",
    "fit_gmm",
    "fit_svi_gmm",
    "init_bayes_gmm",
    "init_gmm",
    "vb_distance",
]

Array = jax.Array
_PRIOR = BayesGMMPrior()


class GMMParams(NamedTuple):
    """GMM parameters: ``weights (K,)``, ``means (K, D)``, ``covariances (K, D, D)``."""

    weights: Array
    means: Array
    covariances: Array


class BernoulliMixtureParams(NamedTuple):
    """Bernoulli-mixture parameters: ``weights (K,)``, ``probs (K, D)``."""

    weights: Array
    probs: Array


class EMResult(NamedTuple):
    """EM trace. ``params[t]`` (leading axis ``num_iters + 1``; ``params[0]`` is the init),
    ``responsibilities[t]`` (``(num_iters, N, K)``, computed from ``params[t]``),
    ``log_likelihood[t] = log p(X | params[t])`` and ``objective[t]`` = log-likelihood plus
    log prior (unnormalised; equals the log-likelihood for maximum likelihood). EM never
    decreases ``objective``."""

    params: GMMParams | BernoulliMixtureParams
    responsibilities: Array
    log_likelihood: Array
    objective: Array


# ------------------------------------------------------------------------------ EM


def _as_f(x) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _stack_last(history: Params, last: Params) -> Params:
    return jax.tree_util.tree_map(lambda h, x: jnp.concatenate([h, x[None]]), history, last)


def _em_loop(comp: object, comp_loglik: Callable, targets: Callable, alpha: float, X, eta, n):
    """``n`` EM iterations as E-step + unit natural steps (mean coordinates).

    ``eta = (eta_weights, eta_components)``; ``targets(r, counts)`` are the components'
    expected sufficient statistics; the weights' target is the MAP-EM
    ``(N_k + alpha - 1) / (N + K (alpha - 1))`` (``alpha = 1``: ``N_k / N``).
    """
    k = eta[0][0].shape[-1]
    cat = Categorical(k, minimal=False)  # minimal: pi_K = 1 - sum(m) cancels when pi_K < eps

    def e_step(eta):
        log_w = jax.nn.log_softmax(cat.full_logits(eta[0]), -1)
        return mixture_e_step(log_w + comp_loglik(X, eta[1]))

    def body(eta, _):
        r, ll = e_step(eta)
        counts = jnp.sum(r, 0)
        w_target = (counts + alpha - 1.0) / (X.shape[0] + k * (alpha - 1.0))
        eta_w = natural_step(cat, eta[0], (w_target,), 1.0, "mean")
        eta_c = natural_step(comp, eta[1], targets(r, counts), 1.0, "mean")
        return (eta_w, eta_c), (eta, r, ll)

    last, (etas, rs, lls) = jax.lax.scan(body, eta, None, length=n)
    return _stack_last(etas, last), rs, jnp.append(lls, e_step(last)[1])


def init_gmm(X, K: int, key: Array | None = None) -> GMMParams:
    """Means at ``K`` distinct random data points, every covariance the data covariance,
    uniform weights."""
    key = jax.random.PRNGKey(0) if key is None else key
    return _init_gmm_jit(_as_f(X), K, key)


@jax.jit(static_argnums=(1,))
def _init_gmm_jit(X, K: int, key) -> GMMParams:
    idx = jax.random.choice(key, X.shape[0], (K,), replace=False)
    cov = jnp.cov(X.T).reshape(X.shape[1], X.shape[1])
    return GMMParams(jnp.full((K,), 1.0 / K), X[idx], jnp.broadcast_to(cov, (K,) + cov.shape))


def _gmm_natural(p: GMMParams) -> tuple[Params, Params]:
    k = p.weights.shape[-1]
    return Categorical(k, False).from_standard(p.weights), FullRankGaussian.from_standard(
        p.means, p.covariances
    )


def _gmm_standard(eta_w: Params, eta_c: Params) -> GMMParams:
    dim = eta_c[0].shape[-1]
    means, covs = FullRankGaussian(dim).standard(eta_c)
    weights = Categorical(eta_w[0].shape[-1], False).standard(eta_w)[0]
    return GMMParams(weights, means, covs)


def fit_gmm(
    X, K: int, num_iters: int, init: GMMParams | None = None, reg_covar: float = 0.0, key=None
) -> EMResult:
    """Maximum-likelihood EM for a full-covariance GMM (Bishop 2006, eq. 9.23-9.28).

    M-step as unit natural steps: ``natural_step(FullRankGaussian(D), eta_k, t_k, 1, "mean")``
    with ``t_k = (sum_n r_nk x_n, sum_n r_nk x_n x_n^T + reg_covar I N_k) / N_k`` and the
    Categorical weights stepped to ``N_k / N``; ``reg_covar`` adds ``reg_covar I`` to every
    covariance (scikit-learn's convention). ``init`` defaults to ``init_gmm(X, K, key)``.
    """
    X = _as_f(X)
    init = init_gmm(X, K, key) if init is None else GMMParams(*map(_as_f, init))
    return _fit_gmm_jit(X, init, num_iters, reg_covar)


@jax.jit(static_argnums=(2,))
def _fit_gmm_jit(X, init: GMMParams, num_iters: int, reg_covar) -> EMResult:
    d = X.shape[1]
    comp = FullRankGaussian(d)

    def loglik(X, eta_c):
        return comp.log_prob(X[:, None, :], eta_c)

    def targets(r, counts):
        m1 = (r.T @ X) / counts[:, None]
        m2 = jnp.einsum("nk,ni,nj->kij", r, X, X) / counts[:, None, None]
        return m1, m2 + reg_covar * jnp.eye(d)

    etas, rs, lls = _em_loop(comp, loglik, targets, 1.0, X, _gmm_natural(init), num_iters)
    return EMResult(_gmm_standard(*etas), rs, lls, lls)


def fit_bernoulli_mixture(
    X,
    K: int,
    num_iters: int,
    init: BernoulliMixtureParams | None = None,
    beta_prior: tuple[float, float] = (2.0, 2.0),
    key=None,
) -> EMResult:
    """MAP-EM for a mixture of Bernoullis (Bishop 2006, eq. 9.55-9.60).

    M-step as unit natural steps in mean coordinates: each ``Bernoulli`` component to
    ``(sum_n r_nk x_n + a - 1) / (N_k + a + b - 2)`` (``beta_prior = (a, b)``; the default
    ``(2, 2)`` is Laplace smoothing, which keeps every logit finite when a pixel is constant;
    ``(1, 1)`` is plain maximum likelihood), weights to ``N_k / N``. ``init`` defaults to
    uniform weights and probabilities ``U(0.25, 0.75)`` (Bishop's recipe) drawn with ``key``.
    """
    X = _as_f(X)
    if init is None:
        key = jax.random.PRNGKey(0) if key is None else key
        init = _init_bmm_jit(key, K, X.shape[1])
    init = BernoulliMixtureParams(*map(_as_f, init))
    return _fit_bmm_jit(X, init, num_iters, *map(float, beta_prior))


@jax.jit(static_argnums=(1, 2))
def _init_bmm_jit(key, K: int, d: int) -> BernoulliMixtureParams:
    probs = jax.random.uniform(key, (K, d), minval=0.25, maxval=0.75)
    return BernoulliMixtureParams(jnp.full((K,), 1.0 / K), _as_f(probs))


@jax.jit(static_argnums=(2,))
def _fit_bmm_jit(X, init: BernoulliMixtureParams, num_iters: int, a, b) -> EMResult:
    k = init.weights.shape[0]
    comp = Bernoulli()

    def loglik(X, eta_c):
        return jnp.sum(comp.log_prob(X[:, None, :], eta_c), -1)

    def targets(r, counts):
        return ((r.T @ X + a - 1.0) / (counts[:, None] + a + b - 2.0),)

    eta = (Categorical(k, False).from_standard(init.weights), Bernoulli.from_standard(init.probs))
    etas, rs, lls = _em_loop(comp, loglik, targets, 1.0, X, eta, num_iters)
    params = BernoulliMixtureParams(
        Categorical(k, False).standard(etas[0])[0], Bernoulli().standard(etas[1])[0]
    )
    log_p, log_1mp = -jax.nn.softplus(-etas[1][0]), -jax.nn.softplus(etas[1][0])
    log_prior = jnp.sum((a - 1.0) * log_p + (b - 1.0) * log_1mp, axis=(-2, -1))
    return EMResult(params, rs, lls, lls + log_prior)


# ------------------------------------------------------------------- variational Bayes


class VBState(NamedTuple):
    """Natural parameters of ``q(pi) = Dirichlet`` (``(K,)``) and ``q(mu, tau) = NormalGamma``
    (4 leaves of ``(K, D)``)."""

    eta_pi: Params
    eta_ng: Params


class VBParams(NamedTuple):
    """Standard parameters: ``q(pi) = Dir(alpha)``; ``q(tau_kd) = Gamma(a, b)``,
    ``q(mu_kd | tau_kd) = N(loc, 1 / (beta tau_kd))``."""

    alpha: Array
    loc: Array
    beta: Array
    a: Array
    b: Array


class CAVIResult(NamedTuple):
    """``params[t]`` (``num_iters + 1``; ``params[0]`` = init), ``responsibilities[t]``
    (``q(Z)`` computed from ``params[t]``) and ``elbo[t]`` at ``(responsibilities[t],
    params[t + 1])``; CAVI never decreases it."""

    params: VBParams
    responsibilities: Array
    elbo: Array


class SVIResult(NamedTuple):
    """``params[t]`` of every iteration, ``step_sizes[t] = rho_t``, and ``plate_scale``: the
    likelihood scale NumPyro's subsampled plate applies (checked equal to ``N / B``)."""

    params: VBParams
    step_sizes: Array
    plate_scale: float


def vb_params(state: VBState) -> VBParams:
    """``VBState`` (natural) -> ``VBParams`` (standard); works on stacked states too."""
    loc, beta, a, b = NormalGamma().standard(state.eta_ng)
    return VBParams(state.eta_pi[0] + 1.0, loc, beta, a, b)


def vb_state(p: VBParams) -> VBState:
    """``VBParams`` -> ``VBState``."""
    return VBState((p.alpha - 1.0,), NormalGamma.from_standard(p.loc, p.beta, p.a, p.b))


def init_bayes_gmm(X, K: int, prior: BayesGMMPrior = _PRIOR, key=None, scale=1.0):
    """``q(theta)`` after hard-assigning ``X`` to ``K`` k-means++ seeds (Arthur & Vassilvitskii
    2007: each next seed is drawn with probability proportional to its squared distance to the
    nearest seed so far), i.e. ``eta_0 + scale * sum_n onehot_nk t(x_n)``.

    ``scale`` multiplies the statistics (pass ``N / len(X)`` to initialise from a subset).
    """
    key = jax.random.PRNGKey(0) if key is None else key
    return _init_bayes_gmm_jit(_as_f(X), K, prior, key, scale)


def _kmeans_pp(X, K: int, key) -> Array:
    keys = jax.random.split(key, K)
    centers = X[jax.random.randint(keys[0], (1,), 0, X.shape[0])]
    for k in range(1, K):
        d2 = jnp.min(jnp.sum((X[:, None, :] - centers[None]) ** 2, -1), -1)
        nxt = jax.random.categorical(keys[k], jnp.log(d2 / jnp.sum(d2)))
        centers = jnp.concatenate([centers, X[nxt][None]])
    return centers


@jax.jit(static_argnums=(1,))
def _init_bayes_gmm_jit(X, K: int, prior: BayesGMMPrior, key, scale) -> VBState:
    centers = _kmeans_pp(X, K, key)
    dist2 = jnp.sum((X[:, None, :] - centers[None]) ** 2, -1)
    r = jax.nn.one_hot(jnp.argmin(dist2, -1), K, dtype=X.dtype)
    prior_pi, prior_ng = prior.natural(K, X.shape[1])
    return VBState(*bayes_gmm_global_update(X, r, prior_pi, prior_ng, scale))


def fit_cavi_gmm(
    X,
    K: int,
    num_iters: int,
    init: VBState | None = None,
    prior: BayesGMMPrior = _PRIOR,
    key=None,
    keep_responsibilities: bool = True,
) -> CAVIResult:
    """CAVI / VB-EM for the diagonal Bayesian GMM as unit natural steps on the reverse KL.

    Per iteration: ``r_nk ∝ exp(E[log pi_k] + E[log N(x_n | mu_k, tau_k)])`` (E-step), then
    ``reverse_natural_step(lambda, eta_0 + sum_n r_nk t(x_n), lr=1)`` for ``q(pi)`` and every
    ``q(mu_kd, tau_kd)``, then the ELBO (``ngvi.em.bayes_gmm_elbo``).
    """
    X = _as_f(X)
    init = init_bayes_gmm(X, K, prior, key) if init is None else init
    return _cavi_jit(X, VBState(*init), prior, num_iters, keep_responsibilities)


@jax.jit(static_argnums=(3, 4))
def _cavi_jit(X, state: VBState, prior: BayesGMMPrior, num_iters: int, keep: bool) -> CAVIResult:
    k = state.eta_pi[0].shape[-1]
    prior_nat = prior.natural(k, X.shape[1])

    def body(carry, _):
        state = carry[0]
        r, _ = mixture_e_step(bayes_gmm_log_joint(X, state.eta_pi, state.eta_ng))
        hat = VBState(*bayes_gmm_global_update(X, r, *prior_nat))
        new = VBState(*reverse_natural_step(state, hat, 1.0))
        elbo = bayes_gmm_elbo(X, r, new.eta_pi, new.eta_ng, *prior_nat)
        return (new, r), (state, r if keep else None, elbo)

    r0 = jnp.zeros((X.shape[0], k), X.dtype)
    (last, r_last), (states, rs, elbos) = jax.lax.scan(body, (state, r0), None, length=num_iters)
    rs = rs if keep else r_last[None]
    return CAVIResult(vb_params(_stack_last(states, last)), rs, elbos)


# ------------------------------------------------------------------- stochastic VI


@jax.jit(static_argnums=(1, 2))
def _numpyro_minibatch(key, n: int, batch_size: int):
    """Indices and likelihood scale drawn by ``numpyro.plate("data", n, subsample_size=B)``,
    the data plate of ``models/bayes_gmm.py`` (the scale is read from a site under it)."""
    from numpyro.handlers import seed, trace

    def plate():
        with numpyro.plate("data", n, subsample_size=batch_size):
            numpyro.sample("x", dist.Normal(), obs=0.0)

    tr = trace(seed(plate, key)).get_trace()
    return tr["data"]["value"], tr["x"]["scale"]


def fit_svi_gmm(
    X,
    K: int,
    num_iters: int,
    batch_size: int,
    init: VBState | None = None,
    prior: BayesGMMPrior = _PRIOR,
    tau: float = 1.0,
    kappa: float = 0.7,
    key=None,
    subsample: str = "numpyro",
) -> SVIResult:
    """Stochastic VI (Hoffman et al. 2013, Alg. 1) for the diagonal Bayesian GMM.

    Step ``t = 0, 1, ...``: draw ``B`` indices, local E-step ``r_nk`` on them, intermediate
    ``lambda_hat = eta_0 + (N / B) sum_{n in batch} r_nk t(x_n)``, then
    ``lambda <- (1 - rho_t) lambda + rho_t lambda_hat``, ``rho_t = (t + tau)^-kappa``.
    ``subsample="numpyro"`` draws the indices with the model's
    ``numpyro.plate("data", N, subsample_size=B)`` (without replacement; NumPyro's CPU sampler
    is a partial Fisher-Yates shuffle of ``arange(N)``, so each draw costs ``O(N)``
    memory traffic); ``"uniform"`` draws them i.i.d. (``O(B)``). ``init`` defaults to
    ``init_bayes_gmm`` on a random subset of ``min(N, 2000)`` points scaled to ``N``.
    """
    X = _as_f(X)
    n = X.shape[0]
    key = jax.random.PRNGKey(0) if key is None else key
    k_init, k_sub, k_run = jax.random.split(key, 3)
    if init is None:
        sub = X[jax.random.choice(k_sub, n, (min(n, 2000),), replace=False)]
        init = init_bayes_gmm(sub, K, prior, k_init, n / sub.shape[0])
    plate_scale = float(_numpyro_minibatch(k_sub, n, batch_size)[1])
    if not np.isclose(plate_scale, n / batch_size, rtol=1e-6):
        raise AssertionError(f"NumPyro plate scale {plate_scale} != N/B = {n / batch_size}")
    if subsample not in ("numpyro", "uniform"):
        raise ValueError(f"subsample must be 'numpyro' or 'uniform', got {subsample!r}")
    static = (prior, subsample, batch_size, num_iters)
    params, rhos = _svi_loop(X, VBState(*init), k_run, n / batch_size, tau, kappa, *static)
    return SVIResult(params, rhos, plate_scale)


@jax.jit(static_argnums=(6, 7, 8, 9))
def _svi_loop(X, state, key, scale, tau, kappa, prior, subsample, batch_size, num_iters):
    """The SVI scan; returns ``(VBParams per iteration, rho_t per iteration)``."""
    k = state.eta_pi[0].shape[-1]
    prior_nat = prior.natural(k, X.shape[1])

    def draw(key):
        if subsample == "numpyro":
            return _numpyro_minibatch(key, X.shape[0], batch_size)[0]
        return jax.random.randint(key, (batch_size,), 0, X.shape[0])

    def body(state, t):
        xb = X[draw(jax.random.fold_in(key, t))]
        r, _ = mixture_e_step(bayes_gmm_log_joint(xb, state.eta_pi, state.eta_ng))
        hat = VBState(*bayes_gmm_global_update(xb, r, *prior_nat, scale=scale))
        rho = robbins_monro(t, tau, kappa)
        return VBState(*reverse_natural_step(state, hat, rho)), (state, rho)

    last, (states, rhos) = jax.lax.scan(body, state, jnp.arange(num_iters))
    return vb_params(_stack_last(states, last)), rhos


def vb_distance(p: VBParams, q: VBParams) -> float:
    """``max(|E_p[mu] - E_q[mu]|, |E_p[pi] - E_q[pi]|)`` over components and dimensions,
    after matching ``q``'s components to ``p``'s (Hungarian on the squared distance of
    ``E[mu]``), so label switching does not count. ``E[mu] = loc``, ``E[pi] = alpha / sum``."""
    from scipy.optimize import linear_sum_assignment

    loc_p, loc_q = np.asarray(p.loc), np.asarray(q.loc)
    cost = ((loc_p[:, None, :] - loc_q[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    w_p = np.asarray(p.alpha) / np.sum(p.alpha)
    w_q = np.asarray(q.alpha) / np.sum(q.alpha)
    d_mu = np.abs(loc_p[rows] - loc_q[cols]).max()
    return float(max(d_mu, np.abs(w_p[rows] - w_q[cols]).max()))
