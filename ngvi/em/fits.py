r"""EM fits for ``ngvi.em`` (re-exported there) as natural steps, and the loop pieces shared
with the variational fits (``ngvi.em.vb``).

* ``fit_gmm``: full-covariance Gaussian mixture by EM = E-step + unit natural step in mean
  coordinates on each component (``FullRankGaussian``) and on the weights (``Categorical``).
* ``fit_bernoulli_mixture``: mixture of Bernoullis (Bishop 2006, Sec. 9.3.3), MAP-EM under a
  ``Beta(a, b)`` prior on the pixel probabilities (``a = b = 1`` is maximum likelihood).

Every fit checks its input first (``ngvi.em.checks``), runs as one ``jax.lax.scan`` (one
compilation per shape) that skips the iterations after ``tol`` is met, and keeps the best of
``num_restarts`` initialisations by the final objective. Results are ``NamedTuple``\ s with the
parameters of every iteration run stacked on a leading axis.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ngvi.em.checks import (
    check_data,
    check_init_shapes,
    check_int,
    check_k,
    check_restarts,
    check_tol,
)
from ngvi.em.core import mixture_e_step, natural_step
from ngvi.errors import ConfigError, FitError
from ngvi.families import Bernoulli, Categorical, FullRankGaussian, Params

__all__ = [
    "BernoulliMixtureParams",
    "EMResult",
    "GMMParams",
    "fit_bernoulli_mixture",
    "fit_gmm",
    "init_gmm",
]

Array = jax.Array


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
    """EM trace over the ``num_iters`` iterations run. ``params[t]`` (leading axis
    ``num_iters + 1``; ``params[0]`` is the init), ``responsibilities[t]`` (``(num_iters, N,
    K)``, computed from ``params[t]``), ``log_likelihood[t] = log p(X | params[t])`` and
    ``objective[t]`` = log-likelihood plus log prior (unnormalised; equals the log-likelihood
    for maximum likelihood). EM never decreases ``objective``. ``converged``: its last change
    was below ``tol``; ``restart_objectives``: the final objective of every restart (this is
    the best), or None for one start."""

    params: GMMParams | BernoulliMixtureParams
    responsibilities: Array
    log_likelihood: Array
    objective: Array
    num_iters: int = 0
    converged: bool = False
    restart_objectives: Array | None = None


# --------------------------------------------------------------- shared loop pieces


def _as_f(x) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(float))


def scan_until(step: Callable, init: Any, n: int) -> tuple[Any, Any, Array, Array]:
    """``n`` iterations of ``step(carry) -> (carry, out, stop)`` in one ``lax.scan``; every
    iteration after the first ``stop`` is skipped (``lax.cond``: no work, zero outputs).

    Returns ``(carry, outs, runs, stopped)``: ``runs`` iterations ran; ``outs[:runs]`` hold.
    """
    out_shape = jax.eval_shape(lambda c: step(c)[1], init)
    blank = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

    def body(carry, _):
        inner, stopped, runs = carry

        def run(_):
            new, out, stop = step(inner)
            return (new, stop, runs + 1), out

        return jax.lax.cond(stopped, lambda _: ((inner, stopped, runs), blank()), run, None)

    start = (init, jnp.zeros((), bool), jnp.zeros((), jnp.int32))
    (carry, stopped, runs), outs = jax.lax.scan(body, start, None, length=n)
    return carry, outs, runs, stopped


def trim(history: Any, last: Any, steps: int) -> Any:
    """``history[:steps]`` with ``last`` appended, leaf by leaf (the iterates of a run)."""
    return jax.tree.map(lambda h, x: jnp.concatenate([h[:steps], x[None]]), history, last)


def restart_keys(key: Array | None, num_restarts: int) -> list[Array]:
    """``key`` (default ``PRNGKey(0)``) for the first start, so one start is the plain fit,
    then ``fold_in(key, r)``."""
    key = jax.random.PRNGKey(0) if key is None else key
    return [key] + [jax.random.fold_in(key, r) for r in range(1, num_restarts)]


def best_of(fits: list, final: Callable[[Any], float]) -> Any:
    """The fit with the largest finite ``final(fit)``, with ``restart_objectives`` set."""
    if len(fits) == 1:
        return fits[0]
    scores = np.array([final(f) for f in fits], dtype=float)
    if not np.isfinite(scores).any():
        raise FitError(
            f"all {len(fits)} restarts ended with a non-finite objective ({scores.tolist()}): "
            "check the data's scale or use float64.",
            fits[0],
        )
    best = int(np.nanargmax(np.where(np.isfinite(scores), scores, np.nan)))
    return fits[best]._replace(restart_objectives=jnp.asarray(scores))


def tol_array(tol: float | None) -> Array:
    """``tol`` as a traced scalar (``-1``: never met), so changing it does not recompile."""
    return jnp.asarray(-1.0 if tol is None else tol, dtype=jnp.result_type(float))


# ------------------------------------------------------------------------------ EM


def _em_loop(comp, comp_loglik, targets, log_prior, X, eta, n, tol):
    """``n`` EM iterations as E-step + unit natural steps (mean coordinates), stopping once
    the objective (log-likelihood + ``log_prior(eta)``) changes by less than ``tol``.

    ``eta = (eta_weights, eta_components)``; ``targets(r, counts)`` are the components'
    expected sufficient statistics, the weights' target ``N_k / N``. Returns the full-length
    history, the last iterate, its log-likelihood and objective, the steps taken and whether
    ``tol`` was met.
    """
    k = eta[0][0].shape[-1]
    cat = Categorical(k, minimal=False)  # minimal: pi_K = 1 - sum(m) cancels when pi_K < eps

    def e_step(eta):
        log_w = jax.nn.log_softmax(cat.full_logits(eta[0]), -1)
        r, ll = mixture_e_step(log_w + comp_loglik(X, eta[1]))
        return r, ll, ll + log_prior(eta)

    def step(carry):
        eta, prev, i = carry
        r, ll, obj = e_step(eta)
        stop = (i > 0) & (jnp.abs(obj - prev) < tol)
        counts = jnp.sum(r, 0)
        eta_w = natural_step(cat, eta[0], (counts / X.shape[0],), 1.0, "mean")
        eta_c = natural_step(comp, eta[1], targets(r, counts), 1.0, "mean")
        new = jax.tree.map(lambda a, b: jnp.where(stop, a, b), eta, (eta_w, eta_c))
        return (new, obj, i + 1), (eta, r, ll, obj), stop

    start = (eta, jnp.zeros((), X.dtype), jnp.zeros((), jnp.int32))
    (last, _, _), outs, runs, stopped = scan_until(step, start, n)
    _, ll, obj = e_step(last)
    steps = jnp.where(stopped, runs - 1, n)  # the stopping iteration took no step
    converged = stopped | (jnp.abs(obj - outs[3][n - 1]) < tol)
    return outs, last, ll, obj, steps, converged


def _em_result(raw, to_standard: Callable) -> EMResult:
    """Trim ``_em_loop``'s full-length history to the steps taken."""
    (etas, rs, lls, objs), last, ll, obj, steps, converged = raw
    n = int(steps)
    params = to_standard(trim(etas, last, n))
    return EMResult(params, rs[:n], trim(lls, ll, n), trim(objs, obj, n), n, bool(converged), None)


def init_gmm(X, K: int, key: Array | None = None) -> GMMParams:
    """Means at ``K`` distinct random data points, every covariance the data covariance,
    uniform weights."""
    X = check_data(X)
    check_k(K, X.shape[0])
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


def _gmm_standard(eta: tuple[Params, Params]) -> GMMParams:
    eta_w, eta_c = eta
    means, covs = FullRankGaussian(eta_c[0].shape[-1]).standard(eta_c)
    weights = Categorical(eta_w[0].shape[-1], False).standard(eta_w)[0]
    return GMMParams(weights, means, covs)


def _check_weights(weights) -> None:
    w = np.asarray(weights)
    if (w <= 0).any() or not np.isclose(w.sum(), 1.0, atol=1e-6):
        raise ConfigError(
            f"init.weights must be positive and sum to 1, got {w!r} (sum {w.sum():.6g})."
        )


def fit_gmm(
    X,
    K: int,
    num_iters: int,
    init: GMMParams | None = None,
    reg_covar: float = 0.0,
    key=None,
    tol: float | None = None,
    num_restarts: int = 1,
) -> EMResult:
    """Maximum-likelihood EM for a full-covariance GMM (Bishop 2006, eq. 9.23-9.28).

    M-step as unit natural steps: ``natural_step(FullRankGaussian(D), eta_k, t_k, 1, "mean")``
    with ``t_k = (sum_n r_nk x_n, sum_n r_nk x_n x_n^T + reg_covar I N_k) / N_k`` and the
    Categorical weights stepped to ``N_k / N``; ``reg_covar`` adds ``reg_covar I`` to every
    covariance (scikit-learn's convention). ``init`` defaults to ``init_gmm(X, K, key)``.
    ``tol``: stop once the log-likelihood changes by less than ``tol`` (nats, total over the
    rows); ``num_restarts``: fits from that many ``init_gmm`` draws, keeping the highest final
    log-likelihood.
    """
    X = check_data(X)
    n, d = X.shape
    check_k(K, n)
    check_int("num_iters", num_iters)
    check_tol(tol)
    check_restarts(num_restarts, init)
    if not (isinstance(reg_covar, numbers.Real) and np.isfinite(reg_covar) and reg_covar >= 0):
        raise ConfigError(f"reg_covar must be a finite number >= 0, got {reg_covar!r}.")
    if init is not None:
        shapes = {"weights": (K,), "means": (K, d), "covariances": (K, d, d)}
        fields = {f"GMMParams.{f}": (getattr(init, f), s) for f, s in shapes.items()}
        check_init_shapes("GMMParams", fields, K, d)
        _check_weights(init.weights)
    X = _as_f(X)

    def one(key):
        start = _init_gmm_jit(X, K, key) if init is None else GMMParams(*map(_as_f, init))
        raw = _fit_gmm_jit(X, start, num_iters, reg_covar, tol_array(tol))
        return _em_result(raw, _gmm_standard)

    fits = [one(k) for k in restart_keys(key, num_restarts)]
    return best_of(fits, lambda f: float(f.objective[-1]))


@jax.jit(static_argnums=(2,))
def _fit_gmm_jit(X, init: GMMParams, num_iters: int, reg_covar, tol):
    d = X.shape[1]
    comp = FullRankGaussian(d)

    def loglik(X, eta_c):
        return comp.log_prob(X[:, None, :], eta_c)

    def targets(r, counts):
        m1 = (r.T @ X) / counts[:, None]
        m2 = jnp.einsum("nk,ni,nj->kij", r, X, X) / counts[:, None, None]
        return m1, m2 + reg_covar * jnp.eye(d)

    no_prior = lambda eta: 0.0
    return _em_loop(comp, loglik, targets, no_prior, X, _gmm_natural(init), num_iters, tol)


def fit_bernoulli_mixture(
    X,
    K: int,
    num_iters: int,
    init: BernoulliMixtureParams | None = None,
    beta_prior: tuple[float, float] = (2.0, 2.0),
    key=None,
    tol: float | None = None,
    num_restarts: int = 1,
) -> EMResult:
    """MAP-EM for a mixture of Bernoullis (Bishop 2006, eq. 9.55-9.60) on binary ``X``.

    M-step as unit natural steps in mean coordinates: each ``Bernoulli`` component to
    ``(sum_n r_nk x_n + a - 1) / (N_k + a + b - 2)`` (``beta_prior = (a, b)``, both ``>= 1``;
    the default ``(2, 2)`` is Laplace smoothing, which keeps every logit finite when a pixel is
    constant; ``(1, 1)`` is plain maximum likelihood), weights to ``N_k / N``. ``init``
    defaults to uniform weights and probabilities ``U(0.25, 0.75)`` (Bishop's recipe) drawn
    with ``key``. ``tol`` and ``num_restarts`` as in ``fit_gmm``, on the log posterior.
    """
    X = check_data(X, binary=True)
    n, d = X.shape
    check_k(K, n)
    check_int("num_iters", num_iters)
    check_tol(tol)
    check_restarts(num_restarts, init)
    a, b = _check_beta_prior(beta_prior)
    if init is not None:
        fields = {
            "BernoulliMixtureParams.weights": (init.weights, (K,)),
            "BernoulliMixtureParams.probs": (init.probs, (K, d)),
        }
        check_init_shapes("BernoulliMixtureParams", fields, K, d)
        _check_weights(init.weights)
        if not ((np.asarray(init.probs) > 0) & (np.asarray(init.probs) < 1)).all():
            raise ConfigError("init.probs must lie strictly between 0 and 1.")
    X = _as_f(X)

    def one(key):
        start = _init_bmm_jit(key, K, d) if init is None else init
        start = BernoulliMixtureParams(*map(_as_f, start))
        return _em_result(_fit_bmm_jit(X, start, num_iters, a, b, tol_array(tol)), _bmm_standard)

    fits = [one(k) for k in restart_keys(key, num_restarts)]
    return best_of(fits, lambda f: float(f.objective[-1]))


def _check_beta_prior(beta_prior) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in beta_prior)
    except (TypeError, ValueError):
        raise ConfigError(f"beta_prior must be a pair (a, b), got {beta_prior!r}.") from None
    if not (np.isfinite([a, b]).all() and a >= 1 and b >= 1):
        raise ConfigError(
            f"beta_prior (a, b) must both be >= 1 for a MAP estimate inside (0, 1), got "
            f"{beta_prior!r}: (1, 1) is maximum likelihood, (2, 2) Laplace smoothing."
        )
    return a, b


@jax.jit(static_argnums=(1, 2))
def _init_bmm_jit(key, K: int, d: int) -> BernoulliMixtureParams:
    probs = jax.random.uniform(key, (K, d), minval=0.25, maxval=0.75)
    return BernoulliMixtureParams(jnp.full((K,), 1.0 / K), _as_f(probs))


def _bmm_standard(eta: tuple[Params, Params]) -> BernoulliMixtureParams:
    k = eta[0][0].shape[-1]
    return BernoulliMixtureParams(
        Categorical(k, False).standard(eta[0])[0], Bernoulli().standard(eta[1])[0]
    )


@jax.jit(static_argnums=(2,))
def _fit_bmm_jit(X, init: BernoulliMixtureParams, num_iters: int, a, b, tol):
    k = init.weights.shape[0]
    comp = Bernoulli()

    def loglik(X, eta_c):
        return jnp.sum(comp.log_prob(X[:, None, :], eta_c), -1)

    def targets(r, counts):
        return ((r.T @ X + a - 1.0) / (counts[:, None] + a + b - 2.0),)

    def log_prior(eta):
        log_p, log_1mp = -jax.nn.softplus(-eta[1][0]), -jax.nn.softplus(eta[1][0])
        return jnp.sum((a - 1.0) * log_p + (b - 1.0) * log_1mp, axis=(-2, -1))

    eta = (Categorical(k, False).from_standard(init.weights), Bernoulli.from_standard(init.probs))
    return _em_loop(comp, loglik, targets, log_prior, X, eta, num_iters, tol)
