r"""EM, variational Bayes (CAVI) and stochastic VI as natural-gradient steps.

Forward KL: natural steps are M-steps
-------------------------------------
For ``q_eta(x) = h(x) exp(<eta, T(x)> - A(eta))`` and any ``p*`` whose expected sufficient
statistics are ``t = E_{p*}[T(x)]``,

    KL(p* || q_eta) = A(eta) - <t, eta> + const,    grad_eta KL = grad A(eta) - t = m - t,

with ``m = grad A(eta)`` the mean parameters. Its unique minimiser is the member with
``m = t`` (moment matching = the M-step; ``m_step``). ``F(eta) = hess A(eta)`` is the Fisher.

*Natural coordinates.* The natural gradient is ``F(eta)^{-1} (m - t)``, so the step

    eta <- eta - lr F(eta)^{-1} (grad A(eta) - t)

is, for ``lr = 1``, **one Newton step** on the convex ``eta -> A(eta) - <t, eta>`` (its Hessian
is ``F``). It lands on the M-step after one step for every target iff ``grad A`` is affine,
i.e. ``A`` is quadratic in ``eta`` (e.g. a Gaussian with known variance,
``FixedVarianceGaussian``); otherwise it converges quadratically and may overshoot the
natural-parameter domain from far away (e.g. a negative Gaussian variance).

*Mean coordinates.* Parameterise ``q`` by ``m`` (a bijection for a minimal family). With
``d eta / d m = F(eta)^{-1}`` (symmetric),

    grad_m KL = (d eta / d m)^T grad_eta KL = F(eta)^{-1} (m - t),
    F_m = (d eta / d m)^T F(eta) (d eta / d m) = F(eta)^{-1}          (Fisher in m),
    F_m^{-1} grad_m KL = F(eta) F(eta)^{-1} (m - t) = m - t,

so ``m <- m - lr (m - t) = (1 - lr) m + lr t``: for ``lr = 1`` it lands **exactly** on the
M-step ``m = t`` for every family (numerically: ``natural_step`` then returns bit-for-bit
``m_step``, which is exact for the closed-form maps and accurate to the Newton solver's
tolerance, ~1e-12, for Gamma, Beta, Dirichlet and ``NormalGamma``). Both steps point in
the same direction to first order (``d eta = F^{-1} d m``: the natural gradient's direction
is invariant), but a finite unit step is not (Amari 1998; Khan & Rue 2023; Martens 2020, Sec. 12).

Reverse KL: unit natural steps are CAVI updates
-----------------------------------------------
For a conjugate-exponential model with global ``q(theta)`` in natural parameters ``lambda``,
``grad_{m} ELBO = lambda_hat - lambda`` with ``lambda_hat = eta_0 + sum_n E_q[t(x_n, z_n)]``
(Hoffman et al. 2013, eq. 23-27), so the natural gradient in *natural* coordinates is
``lambda_hat - lambda`` and ``lambda <- (1 - rho) lambda + rho lambda_hat``
(``reverse_natural_step``); ``rho = 1`` is the CAVI / VB-EM update, ``rho_t = (t + tau)^-kappa``
with minibatch ``lambda_hat`` scaled by ``N / B`` is stochastic VI.

References: Dempster, Laird & Rubin (1977); Bishop (2006) Ch. 9-10; Hoffman, Blei, Wang &
Paisley (2013) "Stochastic variational inference", JMLR 14.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints

from ngvi.em.checks import check_lr
from ngvi.errors import ConfigError
from ngvi.families import Dirichlet, ExpFamily, NormalGamma, Params

Array = jax.Array
Coords = Literal["mean", "natural"]
_LOG_2PI = math.log(2.0 * math.pi)

__all__ = [
    "m_step",
    "natural_step",
    "natural_gradient",
    "mean_coords_gradient",
    "reverse_natural_step",
    "robbins_monro",
    "expected_stats",
    "FixedVarianceGaussian",
    "NormalGamma",
    "BayesGMMPrior",
    "weighted_stats",
    "mixture_e_step",
    "ng_likelihood_stats",
    "ng_expected_loglik",
    "bayes_gmm_log_joint",
    "bayes_gmm_global_update",
    "bayes_gmm_elbo",
]


def m_step(family: ExpFamily, expected_stats: Params) -> Params:
    """The member whose mean parameters equal ``expected_stats`` (moment matching).

    ``argmin_eta KL(p* || q_eta) = (grad A)^{-1}(t)``: closed form for the Gaussians,
    Bernoulli, Categorical, Poisson and Exponential; the family's convergent Newton solve
    (``mean_to_natural``: Minka 2000, 2002) for Gamma, Beta and Dirichlet.
    """
    return family.mean_to_natural(tuple(expected_stats))


def expected_stats(family: ExpFamily, x: Array, weights: Array | None = None) -> Params:
    """``sum_n w_n T(x_n) / sum_n w_n`` over the leading axis of ``x`` (uniform by default)."""
    stats = family.sufficient_stats(x)
    n = jnp.shape(stats[0])[0]
    w = jnp.full((n,), 1.0 / n) if weights is None else weights / jnp.sum(weights)
    return tuple(jnp.tensordot(w, leaf, axes=1) for leaf in stats)


def natural_gradient(
    family: ExpFamily, params: Params, target_stats: Params, coords: Coords = "mean"
) -> Params:
    """Natural gradient of ``KL(p* || q)`` in the given coordinates.

    ``coords="natural"``: ``F(eta)^{-1} (m - t)`` (closed-form ``fisher_inverse``), a
    direction in ``eta``. ``coords="mean"``: ``F_m^{-1} grad_m KL = m - t``, a direction in
    ``m`` (see the module docstring; ``mean_coords_gradient`` gives ``grad_m KL`` itself).
    """
    m = family.natural_to_mean(params)
    diff = tuple(mi - ti for mi, ti in zip(m, target_stats))
    if coords == "natural":
        return family.fisher_inverse(params, diff)
    if coords == "mean":
        return diff
    raise ConfigError(f"coords must be 'mean' or 'natural', got {coords!r}.")


def mean_coords_gradient(family: ExpFamily, params: Params, target_stats: Params) -> Params:
    """Euclidean ``grad_m KL(p* || q) = F(eta)^{-1} (m - t)`` in mean coordinates.

    Preconditioning it with the mean-coordinate Fisher ``F_m = F(eta)^{-1}``, i.e. multiplying
    by ``F(eta)`` (``family.fisher_vp``), gives back ``m - t``; tests check that identity.
    """
    m = family.natural_to_mean(params)
    return family.fisher_inverse(params, tuple(mi - ti for mi, ti in zip(m, target_stats)))


def natural_step(
    family: ExpFamily,
    params: Params,
    target_stats: Params,
    lr: float | Array = 1.0,
    coords: Coords = "mean",
) -> Params:
    """One natural-gradient step on ``KL(p* || q)`` with ``E_{p*}[T] = target_stats``.

    ``coords="mean"``:    ``m' = (1 - lr) m + lr t``, returned as ``eta' = (grad A)^{-1}(m')``;
                          ``lr = 1`` returns exactly ``m_step(family, target_stats)``.
    ``coords="natural"``: ``eta' = eta - lr F(eta)^{-1} (m - t)``; ``lr = 1`` is one Newton
                          step towards the M-step, exact iff ``A`` is quadratic in ``eta``.

    ``params`` are natural parameters in both cases (so is the result). ``lr > 0``.
    """
    check_lr(lr)
    if coords == "mean":
        m = family.natural_to_mean(params)
        new_m = tuple((1.0 - lr) * mi + lr * ti for mi, ti in zip(m, target_stats))
        return family.mean_to_natural(new_m)
    step = natural_gradient(family, params, target_stats, coords)
    return tuple(e - lr * s for e, s in zip(params, step))


def reverse_natural_step(params: Params, params_hat: Params, lr: float | Array = 1.0) -> Params:
    """``lambda <- (1 - lr) lambda + lr lambda_hat``: natural step on the ELBO (reverse KL).

    For conjugate-exponential global parameters the natural gradient of the ELBO in natural
    coordinates is ``lambda_hat - lambda`` (Hoffman et al. 2013, eq. 27); ``lr = 1`` returns
    ``lambda_hat`` exactly (the CAVI update), ``lr = rho_t`` is the SVI update (eq. 33).
    """
    check_lr(lr)
    return jax.tree_util.tree_map(lambda e, h: (1.0 - lr) * e + lr * h, params, params_hat)


def robbins_monro(t: Array | int, tau: float = 1.0, kappa: float = 0.7) -> Array:
    """``rho_t = (t + tau)^{-kappa}``; Robbins-Monro conditions hold for ``kappa in (0.5, 1]``."""
    return (jnp.asarray(t, dtype=jnp.result_type(float)) + tau) ** (-kappa)


# ------------------------------------------------------------------ extra families


@dataclasses.dataclass(frozen=True)
class FixedVarianceGaussian(ExpFamily):
    """``N(mu, variance)`` with known ``variance``: ``T(x) = x``, ``eta = mu / variance``.

    ``A(eta) = variance eta^2 / 2`` (quadratic), ``m = variance eta = mu``, ``F = variance``,
    ``log h(x) = -x^2 / (2 variance) - log(2 pi variance) / 2``.
    """

    variance: float = 1.0

    param_shapes = ((),)
    event_shape = ()
    support = constraints.real
    reparameterized = True

    def from_standard(self, loc: Array) -> Params:
        return (jnp.asarray(loc) / self.variance,)

    def standard(self, eta: Params) -> tuple[Array]:
        """``(loc,)``."""
        return (self.variance * eta[0],)

    def init(self, batch_shape: tuple[int, ...] = (), loc: float = 0.0) -> Params:
        return (jnp.full(batch_shape, loc / self.variance),)

    def log_partition(self, eta: Params) -> Array:
        return 0.5 * self.variance * eta[0] ** 2

    def natural_to_mean(self, eta: Params) -> Params:
        return (self.variance * eta[0],)

    def mean_to_natural(self, m: Params) -> Params:
        return (m[0] / self.variance,)

    def sufficient_stats(self, x: Array) -> Params:
        return (jnp.asarray(x),)

    def log_base_measure(self, x: Array) -> Array:
        return -0.5 * x**2 / self.variance - 0.5 * (_LOG_2PI + math.log(self.variance))

    def fisher(self, eta: Params) -> Array:
        return jnp.full(jnp.shape(eta[0]) + (1, 1), self.variance)

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        return (v[0] / (self.variance + damping),)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        shape = tuple(sample_shape) + self.batch_shape(eta)
        eps = jax.random.normal(key, shape, dtype=jnp.result_type(eta[0]))
        return self.variance * eta[0] + math.sqrt(self.variance) * eps

    def to_numpyro(self, eta: Params) -> dist.Normal:
        return dist.Normal(self.variance * eta[0], math.sqrt(self.variance))


class BayesGMMPrior(NamedTuple):
    """Conjugate prior of the diagonal Bayesian GMM (``models/bayes_gmm.py``).

    ``pi ~ Dirichlet(alpha0 1_K)``; per component and dimension
    ``tau ~ Gamma(a0, b0)``, ``mu | tau ~ N(m0, 1 / (beta0 tau))``.
    """

    alpha0: float = 1.0
    m0: float = 0.0
    beta0: float = 1.0
    a0: float = 1.0
    b0: float = 1.0

    def natural(self, k: int, d: int) -> tuple[Params, Params]:
        """``(eta_pi (K,), eta_ng (4 leaves of (K, D)))`` of the prior."""
        full = lambda v: jnp.full((k, d), v, dtype=jnp.result_type(float))
        eta_pi = Dirichlet(k).from_standard(jnp.full((k,), self.alpha0, jnp.result_type(float)))
        eta_ng = NormalGamma.from_standard(
            full(self.m0), full(self.beta0), full(self.a0), full(self.b0)
        )
        return eta_pi, eta_ng


# ---------------------------------------------------------------------------- E-steps


def weighted_stats(r: Array, stats: Params) -> Params:
    """``sum_n r_nk T(x_n)`` per component: each leaf ``(N, ...)`` -> ``(K, ...)``."""
    return tuple(jnp.tensordot(r.T, leaf, axes=1) for leaf in stats)


def mixture_e_step(log_joint: Array) -> tuple[Array, Array]:
    """Responsibilities ``r_nk = softmax_k(log_joint_nk)`` and ``sum_n logsumexp_k``.

    ``log_joint_nk = log w_k + log p(x_n | theta_k)`` (EM) or its expectation under ``q``
    (variational Bayes, Bishop eq. 10.46-10.49); then the second output is the
    log-likelihood ``log p(X | theta)`` resp. the ``q(Z)`` normaliser.
    """
    lse = logsumexp(log_joint, axis=-1, keepdims=True)
    return jnp.exp(log_joint - lse), jnp.sum(lse)


def ng_likelihood_stats(x: Array) -> Params:
    """``t(x_nd) = (x, -1/2, -x^2/2, 1/2)`` of shape ``(N, D)`` each, so that a Gaussian
    likelihood term is linear in ``ngvi.families.NormalGamma``'s statistics
    ``T(mu, tau) = (tau mu, tau mu^2, tau, log tau)``:
    ``log N(x | mu, 1/tau) = <T(mu, tau), t(x)> - log(2 pi) / 2``."""
    half = jnp.full_like(x, 0.5)
    return (x, -half, -0.5 * x**2, half)


def ng_expected_loglik(x: Array, eta_ng: Params) -> Array:
    """``E_q[log N(x_n | mu_k, diag(1/tau_k))]`` summed over dims, shape ``(N, K)``.

    Equal to ``sum_d <E_q[T(mu_kd, tau_kd)], t(x_nd)> - D log(2 pi) / 2`` (Bishop eq. 10.64
    with diagonal precision): ``E[log tau]/2 - E[tau] x^2/2 + E[tau mu] x - E[tau mu^2]/2``.
    """
    m = NormalGamma().natural_to_mean(eta_ng)
    t = ng_likelihood_stats(x)
    total = sum(jnp.einsum("nd,kd->nk", ti, mi) for ti, mi in zip(t, m))
    return total - 0.5 * x.shape[-1] * _LOG_2PI


def bayes_gmm_log_joint(x: Array, eta_pi: Params, eta_ng: Params) -> Array:
    """``E_q[log pi_k] + E_q[log N(x_n | mu_k, tau_k)]``, shape ``(N, K)``."""
    e_log_pi = Dirichlet(eta_pi[0].shape[-1]).natural_to_mean(eta_pi)[0]
    return e_log_pi[None, :] + ng_expected_loglik(x, eta_ng)


def bayes_gmm_global_update(
    x: Array, r: Array, prior_pi: Params, prior_ng: Params, scale: float | Array = 1.0
) -> tuple[Params, Params]:
    """``eta_hat = eta_0 + scale * sum_n r_nk t(x_n)`` for ``q(pi)`` and every ``q(mu, tau)``.

    ``scale = 1`` is the CAVI update; ``scale = N / B`` on a minibatch is SVI's
    intermediate parameter (Hoffman et al. 2013, eq. 31-32).
    """
    counts = jnp.sum(r, axis=0)
    eta_pi = (prior_pi[0] + scale * counts,)
    stats = weighted_stats(r, ng_likelihood_stats(x))  # leaves (K, D)
    eta_ng = tuple(p + scale * s for p, s in zip(prior_ng, stats))
    return eta_pi, eta_ng


def bayes_gmm_elbo(
    x: Array, r: Array, eta_pi: Params, eta_ng: Params, prior_pi: Params, prior_ng: Params
) -> Array:
    """ELBO ``E_q[log p(X, Z | theta)] + H[q(Z)] - KL(q(pi)||p(pi)) - KL(q(mu,tau)||p(mu,tau))``.

    (Bishop eq. 10.70-10.77 in exponential-family form; KLs are Bregman divergences of
    ``A``.) ``r`` are the ``q(Z)`` responsibilities.
    """
    log_joint = bayes_gmm_log_joint(x, eta_pi, eta_ng)
    entropy = -jnp.sum(jnp.where(r > 0, r * jnp.log(jnp.where(r > 0, r, 1.0)), 0.0))
    kl_pi = Dirichlet(eta_pi[0].shape[-1]).kl(eta_pi, prior_pi)
    kl_ng = jnp.sum(NormalGamma().kl(eta_ng, prior_ng))
    return jnp.sum(r * log_joint) + entropy - kl_pi - kl_ng
