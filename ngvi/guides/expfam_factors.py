r"""The per-site factors of ``ExpFamilyGuide``: which family a site gets, its natural-parameter
domain, its start, and its draws and entropy on the site's *unconstrained* scale, all in log space.

**Why log space.** A Gamma, Beta or Dirichlet factor with a concentration below 1 puts much of its
mass where ``x`` is below the smallest float (``Dirichlet(0.01 * ones(50))``: most components
near ``exp(-100)``; float32 stops at ``exp(-87)``, float64 at ``exp(-708)``). Drawing ``x`` and
then ``u = T^-1(x)`` gives ``u = log 0 = -inf``. Here every draw is a log-Gamma draw
``g = log G``, ``G ~ Gamma(a, 1)`` (``jax.random.loggamma``), and ``u`` is formed from ``g``
without forming ``x`` (the model's own log density is scored in log space as well:
``ngvi.numerics.logspace``):

* Gamma(a, b):  ``u = log x = g - log b``; Exponential(r): ``u = g_1 - log r``;
* Beta(a, b):   ``u = logit x = g_a - g_b`` (``x = G_a / (G_a + G_b)``);
* Dirichlet(alpha), ``K`` parts, stick-breaking ``u_i = logit z_i + log(K - 1 - i)`` with
  ``logit z_i = log x_i - log sum_{j>i} x_j = g_i - logsumexp_{j>i} g_j``.

The implicit reparameterisation gradient of ``g`` (Figurnov et al. 2018) is
``dg/da = -(dF/da) / (x q(x))``; where ``x = e^g`` is below the float's ``eps`` it is taken from
the small-``x`` tail ``F(x; a) = x^a / Gamma(a + 1) (1 + O(x))``, which gives
``dg/da = (psi(a + 1) - g) / a`` without forming ``x`` (``log_gamma``).

**Entropy on the unconstrained scale** (``H[q_u] = H[q_x] - E[log |dT/du|]``) has one closed form
for the three families, in ``h(a) = a + log Gamma(a) - a psi(a)`` (the entropy of ``log G``):
Gamma ``h(a)`` (``b`` drops out: a scale is a shift of ``u``), Beta ``h(a) + h(b) - h(a + b)``,
Dirichlet ``sum_k h(alpha_k) - h(alpha_0)``. Written as ``A(eta) - <eta, m> - E log|J|`` it is a
difference of terms of size ``a log a``, which in float32 loses every digit once ``a`` is
~1e6 (a loss off by thousands of nats); ``h`` is evaluated with its Stirling series above
``a = 30`` (``h(a) = (log(2 pi / a) + 1) / 2 + 1/(6a) - 1/(90 a^3) + 1/(210 a^5) + O(a^-7)``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import log_sigmoid
from jax.scipy.special import digamma, gammaln
from numpyro.distributions.transforms import (
    ExpTransform,
    IndependentTransform,
    SigmoidTransform,
    StickBreakingTransform,
    biject_to,
)

from ngvi.errors import ConfigError
from ngvi.families import Beta, DiagGaussian, Dirichlet, ExpFamily, Exponential, Gamma
from ngvi.model.target import Site
from ngvi.numerics.logspace import stick_breaking_log

__all__ = [
    "DOMAIN",
    "SiteFactor",
    "base_transform",
    "default_family",
    "support_family",
    "draw_unconstrained",
    "entropy_unconstrained",
    "family_name",
    "log_gamma",
    "log_gamma_entropy",
    "make_factor",
    "start_natural",
    "stats_and_log_jacobian",
    "stats_jacobian",
    "step_fraction",
]

_ALIASES = {"gaussian": "gaussian", "normal": "gaussian", "diaggaussian": "gaussian"}
_ALIASES.update({k: k for k in ("gamma", "beta", "dirichlet", "exponential")})
# family -> the bijection it needs (None: any; the Gaussian lives on unconstrained coordinates)
_NEEDS = {"gamma": ExpTransform, "exponential": ExpTransform, "beta": SigmoidTransform}
_NEEDS.update({"dirichlet": StickBreakingTransform, "gaussian": None})
_DEFAULT = {ExpTransform: "gamma", SigmoidTransform: "beta", StickBreakingTransform: "dirichlet"}
#: natural-parameter domain per leaf: (lower, upper) bounds, None for unbounded
DOMAIN = {
    "gaussian": ((None, None), (None, 0.0)),
    "gamma": ((-1.0, None), (None, 0.0)),
    "exponential": ((None, 0.0),),
    "beta": ((-1.0, None), (-1.0, None)),
    "dirichlet": ((-1.0, None),),
}
#: the smallest concentration a start gives a Beta / Dirichlet factor: from 1 up the density is
#: bounded at the support's boundary, so its draws and Fisher are tame in any float type
START_FLOOR = 1.0
_EULER = 0.5772156649015329  # -psi(1)


class SiteFactor(NamedTuple):
    """One latent site's factor: the family, where it lives and its batch shape."""

    site: Site
    name: str  # "gaussian", "gamma", "exponential", "beta" or "dirichlet"
    family: ExpFamily
    batch_shape: tuple[int, ...]  # independent factors in the site

    @property
    def on_unconstrained(self) -> bool:
        return self.name == "gaussian"

    def keys(self) -> list[str]:
        return [f"{self.site.name}.eta{i}" for i in range(len(self.family.param_shapes))]


def base_transform(support) -> Any:
    """The support's bijection, without an ``IndependentTransform`` wrapper."""
    t = biject_to(support)
    return t.base_transform if isinstance(t, IndependentTransform) else t


def family_name(spec: Any) -> str:
    """Normalize a per-site family spec (name, ``ngvi.families`` class or instance)."""
    if isinstance(spec, ExpFamily):
        spec = type(spec)
    if isinstance(spec, type):
        spec = spec.__name__
    name = _ALIASES.get(str(spec).lower()) if isinstance(spec, str) else None
    if name is None:
        raise ConfigError(
            f"unknown family {spec!r}: use one of 'gaussian', 'gamma', 'exponential', 'beta', "
            "'dirichlet' (or the ngvi.families class)."
        )
    return name


def default_family(site: Site) -> str:
    """The family a site's support gets by default (positive -> gamma, ...)."""
    return support_family(site.support)


def support_family(support) -> str:
    """The family ``ExpFamilyGuide`` gives a support by default: ``"gamma"`` (positive),
    ``"beta"`` (unit interval), ``"dirichlet"`` (simplex), else ``"gaussian"``."""
    return _DEFAULT.get(type(base_transform(support)), "gaussian")


def make_factor(site: Site, name: str) -> SiteFactor:
    need = _NEEDS[name]
    if need is not None and not isinstance(base_transform(site.support), need):
        raise ConfigError(
            f"site '{site.name}' has support {site.support}, which the {name} family does not "
            "cover: use 'gaussian' (on the unconstrained scale) or the family matching the support."
        )
    if name == "gaussian":
        return SiteFactor(site, name, DiagGaussian(), tuple(site.unconstrained_shape))
    if name == "dirichlet":
        return SiteFactor(site, name, Dirichlet(site.shape[-1]), tuple(site.shape[:-1]))
    family = {"gamma": Gamma(), "exponential": Exponential(), "beta": Beta()}[name]
    return SiteFactor(site, name, family, tuple(site.shape))


# -- log-space draws ----------------------------------------------------------------------------
@jax.custom_jvp
def log_gamma(key: jax.Array, a: jax.Array) -> jax.Array:
    """``log G`` with ``G ~ Gamma(a, 1)`` drawn in log space, shape of ``a``, with the implicit
    reparameterisation gradient taken in log space (module docstring)."""
    return jax.random.loggamma(key, a, dtype=jnp.result_type(a))


@log_gamma.defjvp
def _log_gamma_jvp(primals, tangents):
    key, a = primals
    g = log_gamma(key, a)
    tiny_x = g < math.log(jnp.finfo(g.dtype).eps)
    x = jnp.exp(jnp.where(tiny_x, 0.0, g))
    bulk = lax.random_gamma_grad(a, x) / x  # dG/da / G
    tail = (digamma(a + 1.0) - g) / a  # the same for G -> 0, from F ~ G^a / Gamma(a + 1)
    return g, tangents[1] * jnp.where(tiny_x, tail, bulk)


def draw_unconstrained(f: SiteFactor, key: jax.Array, eta: tuple) -> jax.Array:
    """One draw of the factor on the site's unconstrained scale ``u`` (shape
    ``site.unconstrained_shape``), built from log-Gamma draws (module docstring)."""
    if f.on_unconstrained:
        return f.family.sample(key, eta)
    if f.name == "exponential":
        return log_gamma(key, jnp.ones_like(eta[0])) - jnp.log(-eta[0])
    if f.name == "gamma":
        return log_gamma(key, eta[0] + 1.0) - jnp.log(-eta[1])
    if f.name == "beta":
        ka, kb = jax.random.split(key)
        return log_gamma(ka, eta[0] + 1.0) - log_gamma(kb, eta[1] + 1.0)
    g = log_gamma(key, eta[0] + 1.0)  # dirichlet: (*batch, K)
    k1 = g.shape[-1] - 1
    rest = lax.cumlogsumexp(g, axis=g.ndim - 1, reverse=True)  # logsumexp_{j >= i} g_j
    return g[..., :-1] - rest[..., 1:] + jnp.log(k1 - jnp.arange(k1, dtype=g.dtype))


def stats_and_log_jacobian(f: SiteFactor, u: jax.Array) -> tuple[tuple, jax.Array]:
    """``(T(x), log |dT/du|)`` at ``x = T(u)`` from ``u`` in log space: the sufficient
    statistics (batch-shaped leaves) and the log-Jacobian summed per draw's factor batch.
    ``u`` may carry leading draw axes."""
    if f.on_unconstrained:
        return f.family.sufficient_stats(u), jnp.zeros(u.shape[: u.ndim - len(f.batch_shape)])
    if f.name in ("gamma", "exponential"):
        stats = (u, jnp.exp(u)) if f.name == "gamma" else (jnp.exp(u),)
        return stats, _sum_batch(f, u)
    if f.name == "beta":
        log_x, log_1mx = log_sigmoid(u), log_sigmoid(-u)
        return (log_x, log_1mx), _sum_batch(f, log_x + log_1mx)
    log_x, log_det = stick_breaking_log(u)
    return (log_x,), _sum_batch(f, log_det)


def stats_jacobian(f: SiteFactor, u: jax.Array) -> jax.Array:
    """``dT/du`` of each draw, ``(P, *batch, du, k)`` with ``du`` the unconstrained size of one
    factor (1, or ``K - 1`` for a Dirichlet) and ``k`` its number of statistics (flattened as
    ``family.flatten``). Elementwise families by one ``jvp``; the Dirichlet in closed form:
    ``d log x_i / du_j = 1 - z_j`` (``i = j``), ``-z_j`` (``i > j``), 0 (``i < j``)."""
    if f.name != "dirichlet":
        stats = lambda w: f.family.flatten(stats_and_log_jacobian(f, w)[0])
        return jax.jvp(stats, (u,), (jnp.ones_like(u),))[1][..., None, :]
    k1 = u.shape[-1]
    z = jax.nn.sigmoid(u - jnp.log(k1 - jnp.arange(k1, dtype=u.dtype)))[..., None]  # (.., K-1, 1)
    col, row = jnp.arange(k1 + 1), jnp.arange(k1)[:, None]
    return jnp.where(col == row, 1.0 - z, 0.0) - jnp.where(col > row, z, 0.0)


def _sum_batch(f: SiteFactor, v: jax.Array) -> jax.Array:
    """Sum ``v`` over the factor's batch axes (the trailing ones), keeping leading draw axes."""
    n = len(f.batch_shape)
    return jnp.sum(v, axis=tuple(range(v.ndim - n, v.ndim))) if n else v


# -- entropy --------------------------------------------------------------------------------------
def log_gamma_entropy(a: jax.Array) -> jax.Array:
    """``h(a) = a + log Gamma(a) - a psi(a)``, the entropy of ``log G``, ``G ~ Gamma(a, 1)``;
    the Stirling series above ``a = 30`` (module docstring; error below 1e-16 there)."""
    big = a > 30.0
    ab = jnp.where(big, a, 30.0)
    r = 1.0 / ab
    series = 0.5 * (jnp.log(2 * math.pi * r) + 1.0) + r * (1 / 6 - r**2 * (1 / 90 - r**2 / 210))
    asml = jnp.where(big, 1.0, a)
    direct = asml + gammaln(asml) - asml * digamma(asml)
    return jnp.where(big, series, direct)


def entropy_unconstrained(f: SiteFactor, eta: tuple) -> jax.Array:
    """``H[q_u] = H[q_x] - E[log |dT/du|]`` summed over the site (module docstring)."""
    if f.on_unconstrained:  # 0.5 log(2 pi e sigma^2) with sigma^2 = -1 / (2 eta2)
        return jnp.sum(0.5 * (math.log(2 * math.pi) + 1.0) - 0.5 * jnp.log(-2.0 * eta[1]))
    if f.name == "exponential":
        return jnp.sum(jnp.ones_like(eta[0])) * (1.0 + _EULER)  # h(1) = 1 - psi(1)
    if f.name == "gamma":
        return jnp.sum(log_gamma_entropy(eta[0] + 1.0))
    if f.name == "beta":
        a, b = eta[0] + 1.0, eta[1] + 1.0
        return jnp.sum(log_gamma_entropy(a) + log_gamma_entropy(b) - log_gamma_entropy(a + b))
    alpha = eta[0] + 1.0
    h0 = log_gamma_entropy(jnp.sum(alpha, axis=-1))
    return jnp.sum(log_gamma_entropy(alpha)) - jnp.sum(h0)


# -- start and step -------------------------------------------------------------------------------
def start_natural(f: SiteFactor, u0: jax.Array, init_scale: float) -> tuple:
    """Natural parameters of the starting factor: centred at the model's initial point ``u0``
    (unconstrained) with a coefficient of variation of about ``init_scale``.

    Formed in log space from ``u0``, never from ``x0 = T(u0)`` (which underflows for a sparse
    site): Gamma ``(kappa, kappa e^{-u0})``, Exponential ``e^{-u0}``, Beta
    ``kappa (e^{log sigmoid u0}, e^{log sigmoid -u0})``, Dirichlet ``kappa e^{log x0}`` with
    ``kappa = init_scale^-2``. ``u0`` of a positive site is clipped to ``|u0| <= 0.4 log(max
    float)`` so the rate, its square (in the Fisher) and the draws stay finite, and Beta /
    Dirichlet concentrations are floored at ``START_FLOOR`` (1)."""
    kappa = init_scale**-2
    if f.on_unconstrained:
        return f.family.from_standard(u0, jnp.full_like(u0, init_scale))
    if f.name in ("gamma", "exponential"):
        bound = 0.4 * math.log(jnp.finfo(u0.dtype).max)
        rate = jnp.exp(-jnp.clip(u0, -bound, bound))
        if f.name == "exponential":
            return f.family.from_standard(rate)
        return f.family.from_standard(jnp.full_like(u0, kappa), kappa * rate)
    if f.name == "beta":
        a, b = kappa * jnp.exp(log_sigmoid(u0)), kappa * jnp.exp(log_sigmoid(-u0))
        return f.family.from_standard(jnp.maximum(a, START_FLOOR), jnp.maximum(b, START_FLOOR))
    log_x0, _ = stick_breaking_log(u0)
    return f.family.from_standard(jnp.maximum(kappa * jnp.exp(log_x0), START_FLOOR))


def step_fraction(factor: SiteFactor, eta: tuple, delta: tuple) -> jax.Array:
    """Per-factor fraction t in (0, 1] so that eta + t delta stays in the domain: 1 when the
    full step is valid, else half the distance to the nearest boundary."""
    t = jnp.ones(factor.batch_shape)
    for (lo, hi), v, d, shape in zip(
        DOMAIN[factor.name], eta, delta, factor.family.param_shapes, strict=True
    ):
        axes = tuple(range(v.ndim - len(shape), v.ndim))
        for bound, sign in ((lo, 1.0), (hi, -1.0)):
            if bound is None:
                continue
            gap, move = sign * (v - bound), sign * d  # gap > 0; the step is bad if gap+move <= 0
            cut = jnp.where(gap + move > 0, 1.0, 0.5 * gap / jnp.where(move < 0, -move, 1.0))
            t = jnp.minimum(t, jnp.min(cut, axis=axes) if axes else cut)
    return t
