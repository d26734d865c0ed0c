r"""Full-rank Gaussian guide with the variational online Newton (VON) natural step.

``q(z) = N(z | mu, S^-1)`` on the model's flat unconstrained latent vector, parameterised by the
mean ``loc = mu`` and the lower Cholesky factor of the **precision**, ``prec_tril = L`` with
``S = L L^T`` (positive diagonal). The precision factor is the natural choice for a Newton-type
update: the step is written in ``S``, the sampler is ``z = mu + L^-T eps`` (one triangular
solve) and ``S^-1 g`` is two triangular solves, so no d x d matrix is ever inverted.

The natural step (Khan et al. 2018 "Fast and scalable Bayesian deep learning by weight-perturbation
in Adam"; Khan & Rue 2023, "The Bayesian learning rule"): with natural parameters
``(S mu, -S/2)`` the natural gradient of the ELBO is its gradient in the mean parameters
``(mu, mu mu^T + S^-1)``, which gives

    S'  = (1 - b) S + b H,          H  = E_q[-hess log p(z)]
    mu' = mu + r S'^-1 g,           g  = E_q[grad log p(z)]

with ``r = lr / (1 + damping)`` and ``b = r * precision_schedule(step)`` (a unit first step, then
a running average of the noisy ``H``; see ``ngvi.guides.default_precision_schedule``). The
damping is Marquardt-scaled, ``(F + damping F)^-1``: every step shrinks by ``1 / (1 + damping)``,
so one dimensionless damping serves every model.

**Hessian estimators** (``hessian=``; the default ``"auto"`` is ``"exact"`` for ``d <= 200`` and
``"stein"`` above: measured in ``benchmarks/bench_guides.py``, with 8 particles the Stein estimate
left the fit 0.23 nat short of the optimum after 600 steps at d = 31 and 109 nats short at
d = 105, where the exact one stayed within 0.1 nat from step 40 and 60, at 1.3x / 2.8x the cost
per step):

* ``"stein"`` (Price's theorem / Stein's lemma, Opper & Archambeau 2009; Rezende et al.
  2014): ``E[hess log p] = E[grad log p (z - mu)^T] S = E[g_k eps_k^T] L^T``, symmetrised. It
  costs only the P gradients already needed for ``g`` plus O(P d^2), so d can be large. Its
  variance is O(|grad log p|^2 / P) per entry; it is **exact for a quadratic log density** when
  the noise has sample mean 0 and sample second moment exactly I, which ``base_noise`` enforces
  (antithetic pairs whitened by a Cholesky factor) whenever ``num_particles >= 2 d``.
* ``"exact"``: the mean of ``jax.hessian(log p)`` over the samples (d Hessian-vector products
  per sample, O(P d) gradient cost): zero variance for a quadratic log density, lower variance in
  general; for small d.

**Kinks.** Autodiff differentiates a piecewise-smooth log density piece by piece: at a kink
(``|beta|`` in a Laplace prior or likelihood, a quantile loss) the curvature is a point mass
its Hessian never sees, where Stein's estimate (an integration by parts) does; the two agree in
expectation only for a twice-differentiable log density. On the zoo's Bayesian lasso the exact
Hessian misses a fifth of the curvature of the shrunk coefficients, and the fit converged 0.45 nat
from the full-rank optimum. So when a convergence check passes with the exact estimator,
``verify_fit`` compares it there with Stein's on ``KINK_DRAWS`` draws (``misses_curvature``);
where they disagree, ``"auto"`` switches to Stein's (``KinkWarning``) and the fit goes on, and an
explicit ``"exact"`` is refused convergence with the fix.

**Positivity.** With ``H`` positive definite the plain update is a convex combination and stays
positive definite (and is exact for a Gaussian target at ``b = 1``). When the Cholesky factor of
the plain update fails (``H`` indefinite: a non-log-concave target or a noisy estimate) the step
uses the improved Bayesian learning rule of Lin, Schmidt & Khan (2020),
``S' = S + b G + b^2/2 G S^-1 G`` with ``G = H - S``, which is positive definite for every
``b``; ``G S^-1 G = (L^-1 G)^T (L^-1 G)`` costs one triangular solve. On a near-singular
posterior (collinear predictors: precision eigenvalues ``1e-4`` beside ``1e5``, a condition number
beyond ``1 / eps``) rounding makes both indefinite; the step then adds the smallest jitter
``eps 10^j`` times the precision's scale that gives a Cholesky factor (``jittered_cholesky``) and
warns (``NearSingularWarning``) that q is narrower than the posterior along that direction, with
the fix: float64, or remove the collinearity.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax
from jax.scipy.linalg import solve_triangular

from ngvi.errors import ConfigError
from ngvi.guides.base import Guide, check_callable, check_positive, default_precision_schedule
from ngvi.model.target import Target, join_data, split_data
from ngvi.numerics import random as fast_random
from ngvi.numerics.lapack import calls_lapack

__all__ = [
    "AUTO_EXACT_MAX_DIM",
    "FullRankGaussian",
    "KinkWarning",
    "NearSingularWarning",
    "auto_hessian",
    "condition_estimate",
    "gaussian_kl_prec",
    "jittered_cholesky",
    "misses_curvature",
    "whitened_antithetic_noise",
]

_LOG_2PIE = math.log(2 * math.pi * math.e)
_HESSIANS = ("auto", "stein", "exact")
AUTO_EXACT_MAX_DIM = 200  # hessian="auto": exact Hessians up to this latent dimension
JITTER_TRIES = 5  # jitters eps * 10^j * scale, j = 0..4: rounding, not a saddle (that step fails)
NEAR_SINGULAR = 0.1  # warn once cond(S) * eps exceeds this: H's rounding is 10% of its weakest


def whitened_antithetic_noise(rng_key: jax.Array, num_particles: int, dim: int) -> jax.Array:
    """Noise ``(P, d)`` in antithetic pairs ``(e, -e)`` whose sample second moment is exactly I.

    The half-sample ``E`` (``P/2 x d``, ``P/2 >= d``) is whitened, ``E <- E C^-T`` with
    ``C C^T = E^T E / (P/2)``, so ``mean(eps) = 0`` and ``mean(eps eps^T) = I`` exactly: then the
    reparameterised mean gradient and the Stein Hessian are exact for a quadratic log density."""
    half = fast_random.normal(rng_key, (num_particles // 2, dim))
    chol = jnp.linalg.cholesky(half.T @ half / half.shape[0])
    half = solve_triangular(chol, half.T, lower=True).T
    return jnp.concatenate([half, -half])


def auto_hessian(dim: int) -> str:
    """The estimator ``hessian="auto"`` uses at latent dimension ``dim``."""
    return "exact" if dim <= AUTO_EXACT_MAX_DIM else "stein"


KINK_DRAWS = (64, 2048)  # draws of the exact and the Stein Hessian in verify_fit
KINK_Z, KINK_REL = 5.0, 0.1  # a disagreement: beyond 5 standard errors and 10% of the curvature


def misses_curvature(exact: jax.Array, stein: jax.Array) -> bool:
    """Whether per-draw diagonals of ``E_q[-hess log p]`` from autodiff (``exact``, ``(P, d)``)
    and from Stein's lemma (``stein``, ``(Q, d)``), each in antithetic pairs ``(k, k + n/2)``,
    disagree on some coordinate by more than ``KINK_Z`` standard errors and ``KINK_REL`` of the
    larger. They are equal in expectation for a twice-differentiable log density."""

    def mean_se(a):
        half = a.shape[0] // 2
        pairs = 0.5 * (a[:half] + a[half : 2 * half])
        return jnp.mean(pairs, 0), jnp.var(pairs, 0) / half

    (me, ve), (ms, vs) = mean_se(exact), mean_se(stein)
    gap = jnp.abs(me - ms)
    miss = (gap > KINK_Z * jnp.sqrt(ve + vs)) & (
        gap > KINK_REL * jnp.maximum(jnp.abs(me), jnp.abs(ms))
    )
    return bool(jnp.any(miss))


def gaussian_kl_prec(mu_p, tril_p, mu_q, tril_q) -> jax.Array:
    """KL(N(mu_p, S_p^-1) || N(mu_q, S_q^-1)) from precision Cholesky factors ``S = L L^T``::

    KL = 1/2 [ |L_p^-1 L_q|_F^2 + |L_q^T (mu_q - mu_p)|^2 - d ]
         + sum log diag L_p - sum log diag L_q

    (``tr(S_q S_p^-1) = |L_p^-1 L_q|_F^2``): one triangular solve, no inverse."""
    d = mu_p.shape[-1]
    trace = jnp.sum(solve_triangular(tril_p, tril_q, lower=True) ** 2)
    maha = jnp.sum((tril_q.T @ (mu_q - mu_p)) ** 2)
    logdet = jnp.sum(jnp.log(jnp.diagonal(tril_p))) - jnp.sum(jnp.log(jnp.diagonal(tril_q)))
    return 0.5 * (trace + maha - d) + logdet


def _sym(a: jax.Array) -> jax.Array:
    return 0.5 * (a + a.T)


def _chol_solve(tril: jax.Array, v: jax.Array) -> jax.Array:
    """``(L L^T)^-1 v`` by two triangular solves."""
    return solve_triangular(tril, solve_triangular(tril, v, lower=True), lower=True, trans="T")


def ibr_precision(tril: jax.Array, hess: jax.Array, b) -> tuple[jax.Array, jax.Array]:
    """Cholesky factor of the precision after a step of size ``b`` toward ``hess``, computed in
    the current factor's whitened coordinates, and the jitter it needed (0 almost always).

    With ``S = L L^T`` and ``W = L^-1 H L^-T``, ``G~ = W - I``: the plain VON update is
    ``S + b (H - S) = L (I + b G~) L^T`` and the improved rule of Lin et al. (2020),
    ``S + b G + b^2/2 G S^-1 G = L (I + b G~ + b^2/2 G~^2) L^T``, positive definite for every
    ``b``. The new factor is ``L C`` with ``C`` the Cholesky factor of the middle matrix, which is
    well-conditioned even when ``S`` is not: forming ``S`` itself would lose a precision
    eigenvalue below ``eps`` times its scale (a near-singular posterior) to rounding. If both
    fail (rounding in ``H``), ``jittered_cholesky`` adds the smallest jitter that succeeds."""
    eye = jnp.eye(tril.shape[-1], dtype=tril.dtype)
    w = solve_triangular(tril, solve_triangular(tril, hess, lower=True).T, lower=True)
    g = _sym(w) - eye
    plain = _sym(eye + b * g)
    chol = jnp.linalg.cholesky(plain)
    fixed = jnp.linalg.cholesky(_sym(plain + 0.5 * b**2 * (g @ g)))
    chol, jitter = jittered_cholesky(plain, jnp.where(_finite(chol), chol, fixed))
    return tril @ chol, jitter


def _finite(a: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(a))


def jittered_cholesky(matrix: jax.Array, first: jax.Array, tries: int = JITTER_TRIES) -> tuple:
    """``(first, 0)`` when ``first`` is finite, else ``(cholesky(matrix + tau s I), tau)`` for the
    smallest ``tau`` in ``eps * 10^j``, ``j = 0 .. tries - 1``, that succeeds, with ``s`` the
    largest diagonal entry of ``matrix`` (its own scale: a floor below ``eps * s`` is rounding,
    not information). NaN (and ``tau = NaN``) if every try fails."""
    eps = jnp.finfo(matrix.dtype).eps
    scale = jnp.max(jnp.abs(jnp.diagonal(matrix)))
    eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)

    def again(state):
        j, chol = state
        return (j < tries) & ~_finite(chol)

    def retry(state):
        j, _ = state
        # 10 in the matrix's dtype: a Python 10.0 ** traced int32 is float64 under x64, and a
        # float32 fit would then carry a float64 factor out of the loop (a TypeError)
        ten = jnp.asarray(10.0, matrix.dtype)
        return j + 1, jnp.linalg.cholesky(matrix + eps * ten**j * scale * eye)

    j, chol = jax.lax.while_loop(again, retry, (jnp.zeros((), jnp.int32), first))
    tau = jnp.where(j == 0, 0.0, eps * 10.0 ** (j - 1).astype(matrix.dtype))
    return chol, jnp.where(_finite(chol), tau, jnp.nan)


def condition_estimate(tril: jax.Array) -> jax.Array:
    """``(max diag L / min diag L)^2``, a cheap lower estimate of the condition number of
    ``S = L L^T`` (the ratio of its pivots)."""
    diag = jnp.abs(jnp.diagonal(tril))
    return (jnp.max(diag) / jnp.min(diag)) ** 2


def _warn_near_singular(dtype_name: str) -> None:
    warnings.warn(
        f"FullRankGaussian: near-singular posterior in {dtype_name}: the precision's condition "
        f"number is beyond what {dtype_name} resolves (over 0.1 / eps), so the curvature along "
        "its weakest direction is lost to rounding and q's spread there is unreliable (a jitter "
        "may have been needed to keep the Cholesky factor positive definite). Likely cause: "
        "collinear predictors or a non-identified direction. Fix: use float64 "
        "(jax.config.update('jax_enable_x64', True)), remove or combine the collinear "
        "predictors, or use MeanFieldGaussian.",
        NearSingularWarning,
        stacklevel=2,
    )


class KinkWarning(UserWarning):
    """The exact Hessian misses curvature at a kink of the log density (module docstring)."""


class NearSingularWarning(UserWarning):
    """A ``FullRankGaussian`` precision too ill-conditioned for the float type (condition number
    over ``NEAR_SINGULAR / eps``) or one that needed a jitter to stay positive definite."""


class FullRankGaussian(Guide):
    """q(z) = N(z | loc, (L L^T)^-1) on the flat unconstrained latent vector; see the module
    docstring for the VON natural step, the Hessian estimators and the damping.

    Params ``{"loc": (d,), "prec_tril": (d, d)}`` (lower triangular, positive diagonal: the
    Cholesky factor of the precision). ``covariance(params)`` and ``marginal_sd(params)`` give the
    posterior covariance for reporting (the update itself never forms it)."""

    def __init__(
        self,
        model: Callable,
        *,
        init_scale: float = 0.1,
        hessian: str = "auto",
        precision_schedule: Callable | None = None,
        init_strategy: Callable | None = None,
        warm_start: bool = True,
    ):
        super().__init__(model, init_strategy=init_strategy, warm_start=warm_start)
        check_positive("init_scale", init_scale)
        if hessian not in _HESSIANS:
            raise ConfigError(f"hessian must be one of {_HESSIANS}, got {hessian!r}.")
        check_callable("precision_schedule", precision_schedule, "step -> step size")
        self.init_scale = float(init_scale)
        self.hessian = hessian
        self.kinks = False  # set by verify_fit: the exact Hessian misses curvature
        self._diagonals: dict = {}  # compiled verify_fit probes, by data layout
        self.precision_schedule = precision_schedule or default_precision_schedule

    @property
    def resolved_hessian(self) -> str:
        """``"exact"`` or ``"stein"``: ``"auto"`` is exact for ``d <= AUTO_EXACT_MAX_DIM``
        unless ``verify_fit`` found curvature the exact Hessian misses (``kinks``)."""
        if self.hessian != "auto":
            return self.hessian
        return "stein" if self.kinks else auto_hessian(self.target.dim)

    @property
    def step_variant(self) -> str:
        return self.resolved_hessian

    def verify_fit(self, params: dict, data: tuple, rng_key: jax.Array) -> str | None:
        """The kink check of the module docstring, when the exact Hessian is in use."""
        if self.resolved_hessian != "exact":
            return None
        exact, stein = self._hessian_diagonals(params, data, rng_key)
        if not misses_curvature(exact, stein):
            return None
        fix = "use hessian='stein'"
        if self.hessian == "auto":
            self.kinks, fix = True, "switched to hessian='stein' for the rest of this fit"
        msg = (
            "FullRankGaussian: the exact Hessian of the log density misses curvature that "
            "Stein's estimate sees (a kink, as in a Laplace prior or likelihood, where the "
            "Hessian is zero on both sides), so the fit would converge to a wrong precision; "
            f"{fix}."
        )
        warnings.warn(msg, KinkWarning, stacklevel=4)
        return msg

    def probe_metric(self, params: dict) -> dict:
        """The Fisher diagonal of N(loc, (L L^T)^-1) in ``(loc, L)``: ``diag(L L^T)`` for the
        location and, with ``M = L^-1``, ``|M e_i|^2 + [i = j] / L_ii^2`` for ``L_ij``, i >= j
        (the Fisher ``tr(S dP S dP) / 2`` with ``dP = dL L^T + L dL^T``, ``S = P^-1``). Infinite
        above the diagonal: the probe's Newton steps keep the factor lower triangular."""
        tril = params["prec_tril"]
        d = tril.shape[-1]
        inv = solve_triangular(tril, jnp.eye(d, dtype=tril.dtype), lower=True)
        col = jnp.sum(inv**2, axis=0)  # |M e_i|^2, by the row i of L_ij
        diag = jnp.diagonal(tril)
        lower = col[:, None] + jnp.diag(diag**-2)
        below = jnp.tril(jnp.ones((d, d), dtype=bool))
        return {"loc": jnp.sum(tril**2, axis=1), "prec_tril": jnp.where(below, lower, jnp.inf)}

    def _hessian_diagonals(self, params: dict, data: tuple, rng_key: jax.Array) -> tuple:
        """Per-draw diagonals of ``-hess log p(z)`` (autodiff, ``KINK_DRAWS[0]`` draws) and of
        Stein's ``-g eps^T L^T`` (gradients only, ``KINK_DRAWS[1]`` draws) at ``params``."""
        dynamic, spec = split_data(*data)
        if spec not in self._diagonals:
            target = self.target

            @jax.jit
            def diagonals(params, dynamic, model_key, rng_key):
                args, kwargs = join_data(dynamic, spec)
                logp = lambda zi: target.log_density(zi, args, kwargs, model_key)
                k1, k2 = jax.random.split(rng_key)
                eps = self.base_noise(k1, KINK_DRAWS[0])
                # one draw at a time through a model that calls LAPACK (ngvi.numerics.lapack)
                lapack = calls_lapack(logp, target.init_z)
                each = lax.map if lapack else lambda f, z: jax.vmap(f)(z)
                hess = lambda zi: jnp.diagonal(jax.hessian(logp)(zi))
                exact = -each(hess, self.reparam(params, eps))
                # the Stein branch starts after the exact one (XLA may run independent ops at
                # once): two batched LAPACK calls (a model's own Cholesky / triangular solves,
                # as in an LGCP) each fanning out into jaxlib 0.10.2's intra-op pool, each
                # waiting for the other's share of it, froze the zoo's LGCP fit here twice
                exact, k2 = lax.optimization_barrier((exact, k2))
                eps = self.base_noise(k2, KINK_DRAWS[1])
                z = self.reparam(params, eps)
                g = lax.map(jax.grad(logp), z, batch_size=None if lapack else 256)
                return exact, -g * (eps @ params["prec_tril"].T)

            self._diagonals[spec] = diagonals
        model_key = rng_key if self.target.has_subsample else None
        return self._diagonals[spec](params, dynamic, model_key, rng_key)

    # -- family ---------------------------------------------------------------------------
    def init_params(self, target: Target) -> dict:
        z0 = jnp.asarray(target.init_z)
        if target.init_scale is not None:  # the warm start's (Guide.choose_start)
            return {
                "loc": z0,
                "prec_tril": jnp.diag(1.0 / jnp.asarray(target.init_scale, z0.dtype)),
            }
        return {"loc": z0, "prec_tril": jnp.eye(z0.shape[0], dtype=z0.dtype) / self.init_scale}

    def _param_specs(self, target, init):
        return {
            "loc": (init["loc"], dist.constraints.real_vector),
            "prec_tril": (init["prec_tril"], dist.constraints.lower_cholesky),
        }

    def flat_distribution(self, params: dict) -> dist.Distribution:
        tril = params["prec_tril"]
        return dist.MultivariateNormal(params["loc"], precision_matrix=tril @ tril.T)

    def _marginals(self, params: dict) -> tuple[jax.Array, jax.Array]:
        return params["loc"], self.marginal_sd(params)

    def base_noise(self, rng_key: jax.Array, num_particles: int) -> jax.Array:
        """Whitened antithetic noise when ``num_particles >= 2 d`` (makes the Stein Hessian exact
        for quadratics), else the base class's antithetic, diagonally moment-matched noise."""
        d = self.target.dim
        if num_particles % 2 == 0 and num_particles >= 2 * d:
            return whitened_antithetic_noise(rng_key, num_particles, d)
        return super().base_noise(rng_key, num_particles)

    def reparam(self, params: dict, eps: jax.Array) -> jax.Array:
        """z = mu + L^-T eps for each row of ``eps``."""
        tril = params["prec_tril"]
        return params["loc"] + solve_triangular(tril, eps.T, lower=True, trans="T").T

    def entropy(self, params: dict) -> jax.Array:
        """H[q] = d/2 log(2 pi e) - sum log diag L."""
        d = params["loc"].shape[-1]
        return 0.5 * d * _LOG_2PIE - jnp.sum(jnp.log(jnp.diagonal(params["prec_tril"])))

    def kl(self, p: dict, q: dict) -> jax.Array:
        return gaussian_kl_prec(p["loc"], p["prec_tril"], q["loc"], q["prec_tril"])

    @staticmethod
    def covariance(params: dict) -> jax.Array:
        """Sigma = L^-T L^-1 (for reporting)."""
        tril = params["prec_tril"]
        inv = solve_triangular(tril, jnp.eye(tril.shape[-1], dtype=tril.dtype), lower=True)
        return inv.T @ inv

    @staticmethod
    def marginal_sd(params: dict) -> jax.Array:
        """sqrt(diag Sigma) = column norms of L^-1."""
        return jnp.sqrt(jnp.diagonal(FullRankGaussian.covariance(params)))

    # -- the natural step ---------------------------------------------------------------------
    def _grads_and_hessian(self, params: dict, ctx) -> tuple[jax.Array, jax.Array]:
        """(E[grad log p], E[-hess log p]) on the step's noise, with the chosen estimator."""
        args, kwargs = ctx.data
        target = self.target

        def logp(zi):
            return target.log_density(zi, args, kwargs, ctx.model_key)

        z = self.reparam(params, ctx.eps)
        g = jax.vmap(jax.grad(logp))(z)
        if self.resolved_hessian == "exact":
            h = -jnp.mean(jax.vmap(jax.hessian(logp))(z), axis=0)
        else:  # Stein / Price: E[g (z - mu)^T] S = E[g eps^T] L^T
            h = -(g.T @ ctx.eps / ctx.eps.shape[0]) @ params["prec_tril"].T
        return jnp.mean(g, axis=0), _sym(h)

    def natural_step(self, params: dict, grad: dict, lr, damping, step, ctx=None) -> dict:
        """One damped VON step (module docstring). ``grad`` (of -ELBO) is not needed: the
        per-sample gradients for the Stein Hessian are recomputed on ``ctx.eps``."""
        if ctx is None:
            raise ConfigError("FullRankGaussian.natural_step needs the step context (ctx).")
        g, h = self._grads_and_hessian(params, ctx)
        r = lr / (1.0 + damping)
        b = r * self.precision_schedule(step)
        new_tril, jitter = ibr_precision(params["prec_tril"], h, b)
        eps = jnp.finfo(new_tril.dtype).eps
        near_singular = (jitter > 0) | (condition_estimate(new_tril) * eps > NEAR_SINGULAR)
        name = jnp.dtype(new_tril.dtype).name
        jax.lax.cond(
            near_singular,
            lambda: jax.debug.callback(partial(_warn_near_singular, name)),
            lambda: None,
        )
        loc = params["loc"] + r * _chol_solve(new_tril, g)
        return {"loc": loc, "prec_tril": new_tril}
