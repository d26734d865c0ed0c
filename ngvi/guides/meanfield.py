"""The mean-field Gaussian guide: a diagonal Gaussian on the flat unconstrained latent vector,
with its closed-form Fisher, natural step (variational online Newton) and KL."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from ngvi.errors import ConfigError
from ngvi.guides.base import Guide, check_callable, check_positive, default_precision_schedule
from ngvi.model.target import Target

__all__ = ["MeanFieldGaussian"]


class MeanFieldGaussian(Guide):
    """q(z) = N(z | loc, diag(scale^2)) on the flat unconstrained latent vector.

    Params ``{"loc": (d,), "scale": (d,)}``. Two coordinate systems for the natural step:

    * ``coords="natural"`` (default; variational online Newton / Bayesian learning rule, Khan &
      Rue 2023). In natural parameters ``(s*mu, -s/2)`` with precision ``s = scale^-2`` the natural
      gradient equals the plain gradient in mean parameters, which gives, with the reparameterized
      ELBO gradients ``g = E[grad log p]`` and Stein/Price Hessian ``h = E[-diag hess log p]``
      (``h = s + dL/dscale / scale`` for the loss L = -ELBO):
      ``s' = s + b G + b^2 G^2 / (2 s)``, ``G = h - s`` (the improved rule of Lin et al. 2020,
      always positive), and ``mu' = mu + lr g / s'``. Damping is Marquardt-scaled,
      ``(F + delta diag F)^-1``, i.e. every coordinate's step shrinks by ``1/(1+delta)``, so one
      dimensionless delta serves every model.
    * ``coords="meanscale"``: the textbook step in ``(mu, sigma)`` with
      ``F = diag(1/sigma^2, 2/sigma^2)`` and Tikhonov damping ``(F + delta I)^-1``.

    A unit step is exact for a Gaussian target in natural coordinates only when ``h`` is exact
    (antithetic noise makes it so for a quadratic log density).
    """

    elementwise_draws = True  # loc + scale * eps (Guide.elementwise_draws)

    def __init__(
        self,
        model: Callable,
        *,
        init_scale: float = 0.1,
        coords: str = "natural",
        precision_schedule: Callable | None = None,
        init_strategy: Callable | None = None,
        warm_start: bool = True,
    ):
        super().__init__(model, init_strategy=init_strategy, warm_start=warm_start)
        check_positive("init_scale", init_scale)
        if coords not in ("natural", "meanscale"):
            raise ConfigError(f"coords must be 'natural' or 'meanscale', got {coords!r}.")
        check_callable("precision_schedule", precision_schedule, "step -> step size")
        self.init_scale = float(init_scale)
        self.coords = coords
        self.precision_schedule = precision_schedule or default_precision_schedule

    def init_params(self, target: Target) -> dict:
        z0 = jnp.asarray(target.init_z)
        if target.init_scale is not None:  # the warm start's (Guide.choose_start)
            return {"loc": z0, "scale": jnp.asarray(target.init_scale, z0.dtype)}
        return {"loc": z0, "scale": jnp.full_like(z0, self.init_scale)}

    def _param_specs(self, target, init):
        return {
            "loc": (init["loc"], dist.constraints.real),
            "scale": (init["scale"], dist.constraints.positive),
        }

    def flat_distribution(self, params: dict) -> dist.Distribution:
        return dist.Normal(params["loc"], params["scale"]).to_event(1)

    def _marginals(self, params: dict) -> tuple[jax.Array, jax.Array]:
        return params["loc"], params["scale"]

    def reparam(self, params: dict, eps: jax.Array) -> jax.Array:
        return params["loc"] + params["scale"] * eps

    def entropy(self, params: dict) -> jax.Array:
        """H[q] = sum log scale + d/2 log(2 pi e)."""
        d = params["loc"].shape[-1]
        return jnp.sum(jnp.log(params["scale"])) + 0.5 * d * math.log(2 * math.pi * math.e)

    # closed-form Fisher in (loc, scale) coordinates and its inverse -------------------------
    @staticmethod
    def fisher(params: dict) -> dict:
        """Diagonal of F(mu, sigma) = diag(1/sigma^2, 2/sigma^2)."""
        s2 = params["scale"] ** 2
        return {"loc": 1.0 / s2, "scale": 2.0 / s2}

    def probe_metric(self, params: dict) -> dict:
        """The Fisher diagonal ``fisher(params)``: at a mean-field optimum it is also the
        diagonal of the ELBO's Hessian (``E[-diag hess log p] = scale^-2``)."""
        return self.fisher(params)

    @staticmethod
    def fisher_inverse(params: dict, v: dict, damping=0.0) -> dict:
        """(F + damping I)^-1 v in (loc, scale) coordinates, elementwise."""
        f = MeanFieldGaussian.fisher(params)
        return {k: v[k] / (f[k] + damping) for k in ("loc", "scale")}

    def natural_step(
        self, params: dict, grad: dict, lr, damping, step, ctx=None, precision_lr=None
    ) -> dict:
        """One damped natural step on the loss -ELBO, given its gradient ``grad``.
        ``precision_lr`` (default ``lr``) scales the precision's step apart from the mean's: a
        guide that steps its means by a small ``lr`` (``KFACGuide``'s 0.1) keeps the precision a
        running average of the Hessian estimates (``precision_schedule``'s unit first step)."""
        if self.coords == "meanscale":
            d = self.fisher_inverse(params, grad, damping)
            return {k: params[k] - lr * d[k] for k in params}
        loc, scale = params["loc"], params["scale"]
        s = scale**-2
        shrink = 1.0 / (1.0 + damping)
        G = grad["scale"] / scale  # = h - s, the natural direction of the precision
        b = (lr if precision_lr is None else precision_lr) * shrink * self.precision_schedule(step)
        s_new = s + b * G + 0.5 * (b * G) ** 2 / s
        loc_new = loc - lr * shrink * grad["loc"] / s_new
        return {"loc": loc_new, "scale": s_new**-0.5}

    def kl(self, p: dict, q: dict) -> jax.Array:
        """KL(N(p) || N(q)) for diagonal Gaussians, closed form."""
        r2 = (p["scale"] / q["scale"]) ** 2
        dm2 = ((p["loc"] - q["loc"]) / q["scale"]) ** 2
        return 0.5 * jnp.sum(r2 + dm2 - 1.0 - jnp.log(r2))
