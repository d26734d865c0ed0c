"""Gaussian families: mean-field (elementwise) and full-rank.

Both are reparameterised (location-scale): ``x = mu + sigma * eps`` resp.
``x = mu + L^{-T} eps`` with ``Lambda = L L^T`` the precision, so pathwise
gradients flow through ``sample``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.lax.linalg import triangular_solve
from numpyro.distributions import constraints

from .base import (
    Array,
    ExpFamily,
    Params,
    cg_solve,
    is_static_zero,
    solve_sym_2x2,
    sym_2x2,
)

_LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class DiagGaussian(ExpFamily):
    """Independent univariate Gaussians, one per element of the site.

    ``T(x) = (x, x^2)``, ``eta = (mu / sigma^2, -1 / (2 sigma^2))``,
    ``A(eta) = -eta1^2 / (4 eta2) - log(-2 eta2) / 2``, ``h(x) = (2 pi)^{-1/2}``,
    ``m = (mu, mu^2 + sigma^2)`` and, per element,
    ``F = [[s, 2 mu s], [2 mu s, 4 mu^2 s + 2 s^2]]`` with ``s = sigma^2``.
    """

    param_shapes = ((), ())
    event_shape = ()
    support = constraints.real
    reparameterized = True

    @classmethod
    def from_standard(cls, loc: Array, scale: Array) -> Params:
        """``eta`` from mean ``loc`` and standard deviation ``scale``."""
        loc, scale = jnp.broadcast_arrays(jnp.asarray(loc), jnp.asarray(scale))
        prec = 1.0 / scale**2
        return (loc * prec, -0.5 * prec)

    def standard(self, eta: Params) -> tuple[Array, Array]:
        """``(loc, scale)`` from ``eta``."""
        e1, e2 = eta
        return -e1 / (2.0 * e2), jnp.sqrt(-0.5 / e2)

    def init(self, batch_shape: tuple[int, ...] = (), loc: float = 0.0, scale: float = 1.0):
        """``N(loc, scale^2)`` for every element of ``batch_shape``."""
        return self.from_standard(jnp.full(batch_shape, loc), jnp.full(batch_shape, scale))

    def log_partition(self, eta: Params) -> Array:
        e1, e2 = eta
        return -(e1**2) / (4.0 * e2) - 0.5 * jnp.log(-2.0 * e2)

    def natural_to_mean(self, eta: Params) -> Params:
        mu, sd = self.standard(eta)
        return (mu, mu**2 + sd**2)

    def mean_to_natural(self, m: Params) -> Params:
        m1, m2 = m
        var = m2 - m1**2
        return (m1 / var, -0.5 / var)

    def sufficient_stats(self, x: Array) -> Params:
        return (x, x**2)

    def log_base_measure(self, x: Array) -> Array:
        return jnp.full(jnp.shape(x), -0.5 * _LOG_2PI)

    def _fisher_entries(self, eta: Params) -> tuple[Array, Array, Array]:
        mu, sd = self.standard(eta)
        s = sd**2
        return s, 2.0 * mu * s, 4.0 * mu**2 * s + 2.0 * s**2

    def fisher(self, eta: Params) -> Array:
        return sym_2x2(*self._fisher_entries(eta))

    def fisher_vp(self, eta: Params, v: Params) -> Params:
        a, b, c = self._fisher_entries(eta)
        return (a * v[0] + b * v[1], b * v[0] + c * v[1])

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """``(F + damping I)^{-1} v``.

        Undamped: ``F^{-1} v = (d eta / d m) v`` with ``s = sigma^2``::

            d eta / d m = [[(s + 2 mu^2) / s^2, -mu / s^2], [-mu / s^2, 1 / (2 s^2)]]

        Damped: analytic 2x2 inverse.
        """
        if is_static_zero(damping):
            mu, sd = self.standard(eta)
            s2 = sd**4
            return (
                ((sd**2 + 2.0 * mu**2) * v[0] - mu * v[1]) / s2,
                (-mu * v[0] + 0.5 * v[1]) / s2,
            )
        return solve_sym_2x2(*self._fisher_entries(eta), v, damping)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        mu, sd = self.standard(eta)
        shape = tuple(sample_shape) + self.batch_shape(eta)
        return mu + sd * jax.random.normal(key, shape, dtype=jnp.result_type(mu))

    def to_numpyro(self, eta: Params) -> dist.Normal:
        return dist.Normal(*self.standard(eta))

    def marginal_icdf(self, eta: Params, q: Array) -> Array:
        return dist.Normal(*self.standard(eta)).icdf(q)


def _sym(a: Array) -> Array:
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _outer(a: Array, b: Array) -> Array:
    return a[..., :, None] * b[..., None, :]


def _tri_solve(lower: Array, b: Array, transpose: bool = False) -> Array:
    """``L^{-1} B`` (or ``L^{-T} B``) for lower-triangular ``L``; ``B`` is ``(..., d, n)``."""
    batch = jnp.broadcast_shapes(lower.shape[:-2], b.shape[:-2])
    lower = jnp.broadcast_to(lower, batch + lower.shape[-2:])
    b = jnp.broadcast_to(b, batch + b.shape[-2:])
    return triangular_solve(lower, b, left_side=True, lower=True, transpose_a=transpose)


def _tri_solve_vec(lower: Array, b: Array, transpose: bool = False) -> Array:
    return _tri_solve(lower, b[..., None], transpose)[..., 0]


@dataclasses.dataclass(frozen=True)
class FullRankGaussian(ExpFamily):
    """Multivariate Gaussian ``N(mu, Lambda^{-1})`` on ``R^dim``.

    ``T(x) = (x, x x^T)``, ``eta = (Lambda mu, -Lambda / 2)``,
    ``A(eta) = mu^T Lambda mu / 2 - log det(Lambda) / 2``, ``h = (2 pi)^{-dim/2}``,
    ``m = (mu, Sigma + mu mu^T)``. ``eta[1]`` is symmetrised before use, so ``A``
    is defined on all of ``R^{d x d}``. Internally ``Lambda = L L^T`` is factored
    once by Cholesky; every solve is triangular (no explicit matrix inverse of
    ``Lambda``; ``Sigma`` is only formed as the mean parameter ``m``).

    Fisher layout: ``flatten`` order ``[eta1 (d); vec(eta2) row-major (d^2)]``,
    i.e. a dense ``(d + d^2) x (d + d^2)`` matrix ``Cov[(x, vec(x x^T))]``. It is
    singular on antisymmetric ``eta2`` directions (``A`` only sees ``sym(eta2)``);
    use ``fisher_vp`` / ``fisher_inverse`` (matrix-free) for large ``d``.
    """

    dim: int

    event_shape = property(lambda self: (self.dim,))
    param_shapes = property(lambda self: ((self.dim,), (self.dim, self.dim)))
    support = constraints.real_vector
    reparameterized = True

    # -------------------------------------------------------------- constructors
    @classmethod
    def from_precision_tril(cls, loc: Array, precision_tril: Array) -> Params:
        """``eta = (L L^T mu, -L L^T / 2)`` from the Cholesky factor ``L`` of the precision."""
        prec = precision_tril @ jnp.swapaxes(precision_tril, -1, -2)
        return (jnp.einsum("...ij,...j->...i", prec, loc), -0.5 * prec)

    @classmethod
    def from_standard(cls, loc: Array, covariance: Array) -> Params:
        """``eta`` from mean and covariance (Cholesky + triangular solves)."""
        c = jnp.linalg.cholesky(covariance)
        eye = jnp.broadcast_to(jnp.eye(c.shape[-1], dtype=c.dtype), c.shape)
        c_inv = _tri_solve(c, eye)  # C^{-1}; Lambda = C^{-T} C^{-1}
        prec = jnp.swapaxes(c_inv, -1, -2) @ c_inv
        return (jnp.einsum("...ij,...j->...i", prec, loc), -0.5 * prec)

    def standard(self, eta: Params) -> tuple[Array, Array]:
        """``(loc, covariance)``."""
        mu, m2 = self.natural_to_mean(eta)
        return mu, m2 - _outer(mu, mu)

    def precision_tril(self, eta: Params) -> Array:
        """Cholesky factor ``L`` of ``Lambda = -2 sym(eta2) = L L^T``."""
        return jnp.linalg.cholesky(-2.0 * _sym(eta[1]))

    def loc(self, eta: Params) -> Array:
        """``mu = Lambda^{-1} eta1`` via two triangular solves."""
        low = self.precision_tril(eta)
        return _tri_solve_vec(low, _tri_solve_vec(low, eta[0]), transpose=True)

    def init(self, batch_shape: tuple[int, ...] = (), scale: float = 1.0) -> Params:
        """``N(0, scale^2 I)`` for every element of ``batch_shape``."""
        eye = jnp.eye(self.dim) / scale
        return self.from_precision_tril(
            jnp.zeros(batch_shape + (self.dim,)), jnp.broadcast_to(eye, batch_shape + eye.shape)
        )

    # -------------------------------------------------------------- core maps
    def log_partition(self, eta: Params) -> Array:
        low = self.precision_tril(eta)
        z = _tri_solve_vec(low, eta[0])
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(low, axis1=-2, axis2=-1)), -1)
        return 0.5 * jnp.sum(z**2, -1) - 0.5 * logdet

    def _mean_cov(self, eta: Params) -> tuple[Array, Array]:
        low = self.precision_tril(eta)
        eye = jnp.broadcast_to(jnp.eye(self.dim, dtype=low.dtype), low.shape)
        l_inv = _tri_solve(low, eye)
        cov = jnp.swapaxes(l_inv, -1, -2) @ l_inv  # Sigma = L^{-T} L^{-1}
        mu = jnp.einsum("...ij,...j->...i", cov, eta[0])
        return mu, cov

    def natural_to_mean(self, eta: Params) -> Params:
        mu, cov = self._mean_cov(eta)
        return (mu, cov + _outer(mu, mu))

    def mean_to_natural(self, m: Params) -> Params:
        m1, m2 = m
        return self.from_standard(m1, _sym(m2) - _outer(m1, m1))

    def sufficient_stats(self, x: Array) -> Params:
        return (x, _outer(x, x))

    def log_base_measure(self, x: Array) -> Array:
        return jnp.full(jnp.shape(x)[:-1], -0.5 * self.dim * _LOG_2PI)

    # -------------------------------------------------------------- geometry
    def fisher(self, eta: Params) -> Array:
        """Dense ``Cov[(x, vec(x x^T))]`` (Isserlis' theorem for the 4th moments):
        ``F11 = S``, ``F12[i,(k,l)] = mu_k S_il + mu_l S_ik``,
        ``F22[(i,j),(k,l)] = S_ik S_jl + S_il S_jk + mu_i mu_k S_jl + mu_i mu_l S_jk +
        mu_j mu_k S_il + mu_j mu_l S_ik``.
        """
        mu, s = self._mean_cov(eta)
        d = self.dim
        batch = mu.shape[:-1]
        f12 = jnp.einsum("...k,...il->...ikl", mu, s) + jnp.einsum("...l,...ik->...ikl", mu, s)
        ss = jnp.einsum("...ik,...jl->...ijkl", s, s)
        mm = jnp.einsum("...i,...k,...jl->...ijkl", mu, mu, s)
        f22 = ss + jnp.swapaxes(ss, -1, -2) + mm + jnp.swapaxes(mm, -1, -2)
        f22 = f22 + jnp.swapaxes(jnp.swapaxes(mm, -3, -4), -1, -2) + jnp.swapaxes(mm, -3, -4)
        f12 = f12.reshape(batch + (d, d * d))
        f22 = f22.reshape(batch + (d * d, d * d))
        top = jnp.concatenate([s, f12], -1)
        bottom = jnp.concatenate([jnp.swapaxes(f12, -1, -2), f22], -1)
        return jnp.concatenate([top, bottom], -2)

    def fisher_vp(self, eta: Params, v: Params) -> Params:
        """``F u = (d m / d eta) u``, matrix-free::

            dm1 = S (u1 + 2 U2 mu),  dm2 = 2 S U2 S + dm1 mu^T + mu dm1^T,

        with ``U2 = sym(u2)``.
        """
        mu, s = self._mean_cov(eta)
        u1, u2 = v[0], _sym(v[1])
        dm1 = jnp.einsum("...ij,...j->...i", s, u1 + 2.0 * jnp.einsum("...ij,...j->...i", u2, mu))
        dm2 = 2.0 * s @ u2 @ s + _outer(dm1, mu) + _outer(mu, dm1)
        return (dm1, dm2)

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """``(F + damping I)^{-1} v``.

        Undamped (closed form): ``F^{-1} v = (d eta / d m) v``. With
        ``Lambda = -2 sym(eta2)`` and ``dS = sym(v2) - v1 mu^T - mu v1^T``::

            d eta1 = Lambda (v1 - dS eta1),   d eta2 = Lambda dS Lambda / 2.

        Only multiplications by ``Lambda`` and one Cholesky solve for ``mu``.
        ``v2`` is symmetrised: ``F^{-1}`` acts on the symmetric (identifiable)
        subspace. Damped: no closed form is known, so a batched matrix-free CG on
        ``fisher_vp`` runs ``d + d^2`` iterations (exact in exact arithmetic).
        """
        if not is_static_zero(damping):

            def matvec(u):
                fu = self.fisher_vp(eta, u)
                return (fu[0] + damping * u[0], fu[1] + damping * u[1])

            return cg_solve(matvec, self.inner, tuple(v), self.num_params)
        prec = -2.0 * _sym(eta[1])
        mu = self.loc(eta)
        v1 = v[0]
        ds = _sym(v[1]) - _outer(v1, mu) - _outer(mu, v1)
        d1 = jnp.einsum("...ij,...j->...i", prec, v1 - jnp.einsum("...ij,...j->...i", ds, eta[0]))
        d2 = 0.5 * prec @ ds @ prec
        return (d1, d2)

    # -------------------------------------------------------------- sampling
    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        """``x = mu + L^{-T} eps`` with ``eps ~ N(0, I)`` (Cov = ``Lambda^{-1}``)."""
        low = self.precision_tril(eta)
        mu = self.loc(eta)
        batch = self.batch_shape(eta)
        n = math.prod(sample_shape)
        eps = jax.random.normal(key, batch + (self.dim, n), dtype=mu.dtype)
        x = _tri_solve(low, eps, transpose=True) + mu[..., None]  # (batch, d, n)
        x = jnp.moveaxis(x, -1, 0).reshape(tuple(sample_shape) + batch + (self.dim,))
        return x

    def to_numpyro(self, eta: Params) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(self.loc(eta), precision_matrix=-2.0 * _sym(eta[1]))
