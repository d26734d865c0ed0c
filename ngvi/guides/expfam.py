r"""An exponential-family guide: one ``ngvi.families`` member per latent site, natural steps.

Each latent site gets a mean-field factor from an exponential family chosen by its support
(positive -> ``Gamma``, unit interval -> ``Beta``, simplex -> ``Dirichlet``, anything else -> a
``DiagGaussian`` on the site's unconstrained coordinates), overridable per site by name:
``ExpFamilyGuide(model, families={"sigma": "gaussian"})``. The parameters are the natural
parameters ``eta`` of every factor, so a natural step is a step along ``grad_m ELBO`` (the
gradient in the mean parameters ``m = grad A(eta)``, Khan & Lin 2017):

    eta' = eta + rho * nat,      nat = grad_m ELBO = F(eta)^-1 grad_eta ELBO,

``rho = lr / (1 + damping) * step_schedule(step)`` (a unit first step, then a running average of
the noisy estimates: ``ngvi.guides.default_precision_schedule``). The damping is Marquardt-scaled
(every step shrinks by ``1 / (1 + damping)``). A step that would leave the natural-parameter
domain (every domain here is a box: ``a > 0``, ``b > 0``, ``-1/(2 sigma^2) < 0``) is cut per
factor to half the distance to the boundary, so every iterate is a valid distribution.

**Gradient estimators** (``estimator=``, one name for every site or ``{site: name}``; the
formulas and their variances are in ``ngvi.guides.expfam_estimators``), for
``f(x) = log p(data, x)`` in the factor's own space:

* ``"pathwise"``: ``nat = -F(eta)^-1 grad_eta L`` with the family's closed-form
  ``fisher_inverse`` and the engine's autodiff gradient of ``L = -ELBO``, which flows through the
  draws by implicit reparameterisation (``jax.random.gamma`` / ``beta`` / ``dirichlet``, Figurnov
  et al. 2018) or location-scale (Gaussian). Unbiased, the lowest variance for smooth ``f``, but
  not zero even for conjugate sites (one unit step is exact only in expectation).
* ``"regression"`` (Salimans & Knowles 2013): ``nat = Cov_P[T]^-1 Cov_P[T, f] - eta``, the
  score function with the optimal linear control variate; one k x k solve per factor. **Exact**
  for conjugate sites (``f`` linear in ``T``) with ``P >= k + 1`` distinct draws (conjugate-
  computation VI: one unit step lands on the exact posterior); elsewhere the part of ``f`` that
  ``T`` does not explain (other sites, non-conjugate terms) is noise, with O(1/P) bias.
* ``"score"``: ``nat = F(eta)^-1 g - eta`` with the score-function estimate
  ``g = mean_k (f_k - b_k)(T_k - m)`` and the leave-one-out baseline ``b_k`` as control variate
  (``control_variate="loo"``, or ``"none"``): unbiased, needs neither gradients nor a
  reparameterised sampler, and has the highest variance of the three.
* ``"auto"`` (default), per factor: ``"regression"`` when the guide has a single factor (e.g. a
  one-site conjugate model) and ``P >= k + 1``; else ``"pathwise"`` when the family has a
  (implicitly) reparameterised sampler; else ``"score"``. Every family this guide places on a
  NumPyro latent site (Gaussian, Gamma, Exponential, Beta, Dirichlet; NumPyro targets have no
  discrete latent sites) is reparameterised, so today ``"auto"`` picks ``"score"`` only for a
  family without one; ask for it by name to use it.

**Unconstrained space.** The engine scores ``log p`` on the model's flat unconstrained vector
``u``; a factor on ``x = T(u)`` (``T = biject_to(support)``) is mapped to ``u`` with density
``q_u(u) = q_x(x) |dT/du|``, so ``H[q_u] = H[q_x] - E[log |dT/du|]``. For numpyro's bijections the
log-Jacobian is linear in the sufficient statistics, so the expectation is closed form:
``exp``: ``log x``; ``sigmoid``: ``log x + log(1 - x)``; stick-breaking: ``sum_k log x_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import digamma
from numpyro.distributions import constraints
from numpyro.distributions.transforms import (
    ExpTransform,
    IndependentTransform,
    SigmoidTransform,
    StickBreakingTransform,
    biject_to,
)

from ngvi.errors import ConfigError
from ngvi.families import Beta, DiagGaussian, Dirichlet, ExpFamily, Exponential, Gamma
from ngvi.guides.base import Guide, check_quantiles, default_precision_schedule
from ngvi.guides.expfam_estimators import (
    CONTROL_VARIATES,
    regression_natural_params,
    score_natural_gradient,
)
from ngvi.model.target import Site, Target

__all__ = ["ExpFamilyGuide", "SiteFactor", "regression_natural_params"]

_ESTIMATORS = ("auto", "regression", "pathwise", "score")
_ALIASES = {"gaussian": "gaussian", "normal": "gaussian", "diaggaussian": "gaussian"}
_ALIASES.update({k: k for k in ("gamma", "beta", "dirichlet", "exponential")})
# family -> the bijection it needs (None: any; the Gaussian lives on unconstrained coordinates)
_NEEDS = {"gamma": ExpTransform, "exponential": ExpTransform, "beta": SigmoidTransform}
_NEEDS.update({"dirichlet": StickBreakingTransform, "gaussian": None})
_DEFAULT = {ExpTransform: "gamma", SigmoidTransform: "beta", StickBreakingTransform: "dirichlet"}
# natural-parameter domain per leaf: (lower, upper) bounds, None for unbounded
_DOMAIN = {
    "gaussian": ((None, None), (None, 0.0)),
    "gamma": ((-1.0, None), (None, 0.0)),
    "exponential": ((None, 0.0),),
    "beta": ((-1.0, None), (-1.0, None)),
    "dirichlet": ((-1.0, None),),
}


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


def _base_transform(support) -> Any:
    t = biject_to(support)
    return t.base_transform if isinstance(t, IndependentTransform) else t


def _family_name(spec: Any) -> str:
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


def _make_factor(site: Site, name: str) -> SiteFactor:
    need = _NEEDS[name]
    if need is not None and not isinstance(_base_transform(site.support), need):
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


def _expected_log_jacobian(factor: SiteFactor, eta: tuple) -> jax.Array:
    """E_q[log |dT/du|] for the factor's bijection (module docstring), summed over the site."""
    if factor.on_unconstrained:
        return jnp.zeros(())
    if factor.name == "exponential":  # E[log x] = psi(1) - log(rate)
        return jnp.sum(digamma(1.0) - jnp.log(-eta[0]))
    m = factor.family.natural_to_mean(eta)
    if factor.name == "gamma":  # T = (log x, x): E log x
        return jnp.sum(m[0])
    return sum(jnp.sum(leaf) for leaf in m)  # beta: E log x + E log(1-x); dirichlet: sum E log x


def _factor_entropy(factor: SiteFactor, eta: tuple) -> jax.Array:
    """H[q_x] = A(eta) - <eta, m> - E[log h], summed over the site's factors."""
    fam = factor.family
    h = jnp.sum(fam.log_partition(eta) - fam.inner(eta, fam.natural_to_mean(eta)))
    if factor.on_unconstrained:  # log h = -log(2 pi) / 2 per element
        h = h + 0.5 * math.log(2 * math.pi) * math.prod(factor.batch_shape)
    return h


def _check_particles(factor: SiteFactor, num: int, need: int, estimator: str) -> None:
    if num < need:
        raise ConfigError(
            f"the {estimator} estimator needs num_particles >= {need} for site "
            f"'{factor.site.name}' ({factor.name}, {factor.family.num_params} statistics), got "
            f"{num}: raise num_particles or use estimator='pathwise'."
        )


def _step_fraction(factor: SiteFactor, eta: tuple, delta: tuple) -> jax.Array:
    """Per-factor fraction t in (0, 1] so that eta + t delta stays in the domain: 1 when the
    full step is valid, else half the distance to the nearest boundary."""
    t = jnp.ones(factor.batch_shape)
    for (lo, hi), v, d, shape in zip(
        _DOMAIN[factor.name], eta, delta, factor.family.param_shapes, strict=True
    ):
        axes = tuple(range(v.ndim - len(shape), v.ndim))
        for bound, sign in ((lo, 1.0), (hi, -1.0)):
            if bound is None:
                continue
            gap, move = sign * (v - bound), sign * d  # gap > 0; the step is bad if gap+move <= 0
            cut = jnp.where(gap + move > 0, 1.0, 0.5 * gap / jnp.where(move < 0, -move, 1.0))
            t = jnp.minimum(t, jnp.min(cut, axis=axes) if axes else cut)
    return t


class ExpFamilyGuide(Guide):
    """Mean-field guide with an exponential-family factor per latent site (module docstring).

    :param families: per-site overrides ``{site name: family}``, the family a name
        ('gaussian', 'gamma', 'exponential', 'beta', 'dirichlet') or an ``ngvi.families`` class;
        an unknown site name raises ``ConfigError`` at setup.
    :param estimator: ``"auto"`` (default), ``"regression"``, ``"pathwise"`` or ``"score"``, or
        a dict ``{site name: estimator}`` (sites it does not name use ``"auto"``).
    :param control_variate: the score estimator's baseline, ``"loo"`` (leave-one-out, default)
        or ``"none"`` (for comparison only: far noisier).
    :param init_scale: the initial factors have mean at the model's initial point and a
        coefficient of variation (Gaussian: sd on the unconstrained scale) of about ``init_scale``.
    """

    def __init__(
        self,
        model: Callable,
        families: dict | None = None,
        *,
        estimator: str | dict = "auto",
        control_variate: str = "loo",
        init_scale: float = 0.1,
        step_schedule: Callable | None = None,
        init_strategy: Callable | None = None,
    ):
        super().__init__(model, init_strategy=init_strategy)
        if families is not None and not isinstance(families, dict):
            raise ConfigError(f"families must be a dict {{site: family}}, got {families!r}.")
        per_site = estimator if isinstance(estimator, dict) else {None: estimator}
        for site, est in per_site.items():
            if est not in _ESTIMATORS:
                where = "" if site is None else f" for site {site!r}"
                raise ConfigError(f"estimator{where} must be one of {_ESTIMATORS}, got {est!r}.")
        if control_variate not in CONTROL_VARIATES:
            raise ConfigError(
                f"control_variate must be one of {CONTROL_VARIATES}, got {control_variate!r}."
            )
        if not (isinstance(init_scale, (int, float)) and 0 < init_scale < math.inf):
            raise ConfigError(f"init_scale must be a positive finite number, got {init_scale!r}.")
        self.families = {k: _family_name(v) for k, v in (families or {}).items()}
        self.estimator = dict(estimator) if isinstance(estimator, dict) else estimator
        self.control_variate = control_variate
        self.init_scale = float(init_scale)
        self.step_schedule = step_schedule or default_precision_schedule
        self.factors: tuple[SiteFactor, ...] = ()

    # -- layout -------------------------------------------------------------------------------
    def setup(self, rng_key: jax.Array, args: tuple = (), kwargs: dict | None = None) -> Target:
        target = super().setup(rng_key, args, kwargs)
        names = [s.name for s in target.sites]
        for arg, given in (("families", self.families), ("estimator", self.estimator)):
            unknown = sorted(set(given) - set(names)) if isinstance(given, dict) else []
            if unknown:
                raise ConfigError(
                    f"{arg} names site(s) {unknown} that the model does not have; its latent "
                    f"sites are {names}."
                )
        self.factors = tuple(
            _make_factor(s, self.families.get(s.name) or self._default(s)) for s in target.sites
        )
        return target

    @staticmethod
    def _default(site: Site) -> str:
        return _DEFAULT.get(type(_base_transform(site.support)), "gaussian")

    def estimator_for(self, factor: SiteFactor, num_particles: int | None = None) -> str:
        """The estimator a factor uses (module docstring): ``"auto"`` is regression for a single
        factor with ``num_particles >= k + 1`` (None: assume enough), else pathwise for a
        reparameterised family, else score."""
        est = self.estimator
        est = est.get(factor.site.name, "auto") if isinstance(est, dict) else est
        if est != "auto":
            return est
        single = sum(math.prod(f.batch_shape) for f in self.factors) == 1
        enough = num_particles is None or num_particles >= factor.family.num_params + 1
        if single and enough:
            return "regression"
        return "pathwise" if factor.family.reparameterized else "score"

    @property
    def resolved_estimator(self) -> str:
        """The estimator every factor uses given enough particles, or ``"mixed"``."""
        used = {self.estimator_for(f) for f in self.factors}
        return used.pop() if len(used) == 1 else "mixed"

    @property
    def crn_descent(self) -> bool:
        """Only pathwise directions are descent steps on the engine's common-random-numbers loss;
        regression and score-function directions are judged within its Monte Carlo error."""
        return self.resolved_estimator == "pathwise"

    def _etas(self, params: dict) -> list[tuple]:
        return [tuple(params[k] for k in f.keys()) for f in self.factors]

    # -- family ---------------------------------------------------------------------------------
    def init_params(self, target: Target) -> dict:
        unc = target.unravel(jnp.asarray(target.init_z))
        params = {}
        for f in self.factors:
            u0 = unc[f.site.name]
            eta = self._init_eta(f, u0, biject_to(f.site.support)(u0))
            params.update(dict(zip(f.keys(), eta, strict=True)))
        return params

    def _init_eta(self, f: SiteFactor, u0, x0) -> tuple:
        kappa = self.init_scale**-2
        if f.name == "gaussian":
            return f.family.from_standard(u0, jnp.full_like(u0, self.init_scale))
        if f.name == "gamma":
            return f.family.from_standard(jnp.full_like(x0, kappa), kappa / x0)
        if f.name == "exponential":
            return f.family.from_standard(1.0 / x0)
        if f.name == "beta":
            return f.family.from_standard(kappa * x0, kappa * (1.0 - x0))
        return f.family.from_standard(kappa * x0)

    def _param_specs(self, target, init):
        specs = {}
        for f in self.factors:
            for key, (lo, hi) in zip(f.keys(), _DOMAIN[f.name], strict=True):
                c = (
                    constraints.real
                    if lo is None and hi is None
                    else (constraints.greater_than(lo) if hi is None else constraints.less_than(hi))
                )
                specs[key] = (init[key], c)
        return specs

    def base_noise(self, rng_key: jax.Array, num_particles: int) -> jax.Array:
        """One PRNG key per particle (``(P, 2)`` uint32): Gamma / Beta / Dirichlet draws come
        from ``jax.random`` with implicit reparameterisation gradients, so the noise is a key."""
        return jax.random.split(rng_key, num_particles)

    def _draw_one(self, params: dict, key: jax.Array) -> dict:
        """One draw of every factor, in the factor's own space (Gaussian: unconstrained)."""
        return {
            f.site.name: f.family.sample(jax.random.fold_in(key, i), eta)
            for i, (f, eta) in enumerate(zip(self.factors, self._etas(params)))
        }

    def _to_flat(self, xs: dict) -> jax.Array:
        """Factor-space draws (P, ...) -> flat unconstrained vectors (P, d)."""
        parts = []
        for f in self.factors:
            x = xs[f.site.name]
            u = x if f.on_unconstrained else biject_to(f.site.support).inv(x)
            parts.append(u.reshape(x.shape[0], -1))
        return jnp.concatenate(parts, axis=-1)

    def _log_jacobian(self, xs: dict) -> jax.Array:
        """log |dT/du| per draw (P,), summed over the sites whose factor is on x = T(u)."""
        total = 0.0
        for f in self.factors:
            if f.on_unconstrained:
                continue
            x = xs[f.site.name]
            t = biject_to(f.site.support)
            ld = t.log_abs_det_jacobian(t.inv(x), x)
            total = total + ld.reshape(x.shape[0], -1).sum(-1)
        return total

    def reparam(self, params: dict, eps: jax.Array) -> jax.Array:
        xs = jax.vmap(lambda k: self._draw_one(params, k))(eps)
        return self._to_flat(xs)

    def entropy(self, params: dict) -> jax.Array:
        """H[q_u] = sum over sites of H[q_x] - E[log |dT/du|] (closed form)."""
        return sum(
            _factor_entropy(f, eta) - _expected_log_jacobian(f, eta)
            for f, eta in zip(self.factors, self._etas(params))
        )

    def kl(self, p: dict, q: dict) -> jax.Array:
        """KL(q_p || q_q): the sum of the factors' closed-form (Bregman) KLs."""
        return sum(
            jnp.sum(f.family.kl(ep, eq))
            for f, ep, eq in zip(self.factors, self._etas(p), self._etas(q))
        )

    def flat_distribution(self, params: dict) -> dist.Distribution:
        """q_u over the flat unconstrained vector (sampling and log density)."""
        return _FlatExpFamily(self, params)

    # -- the natural step -----------------------------------------------------------------------
    def natural_step(self, params: dict, grad: dict, lr, damping, step, ctx=None) -> dict:
        """eta' = eta + rho * nat per factor, cut to stay in the domain (module docstring)."""
        nats = self._natural_gradients(params, grad, ctx)
        rho = lr / (1.0 + damping) * self.step_schedule(step)
        new = {}
        for f, eta, nat in zip(self.factors, self._etas(params), nats, strict=True):
            delta = tuple(rho * n for n in nat)
            t = _step_fraction(f, eta, delta)
            for key, v, d, shape in zip(f.keys(), eta, delta, f.family.param_shapes, strict=True):
                new[key] = v + t.reshape(t.shape + (1,) * len(shape)) * d
        return new

    def _natural_gradients(self, params: dict, grad: dict, ctx) -> list[tuple]:
        """nat per factor with its estimator; the sampled ones share one set of P draws."""
        num = None if ctx is None else ctx.eps.shape[0]
        used = [self.estimator_for(f, num) for f in self.factors]
        sampled = None
        if any(u != "pathwise" for u in used):
            if ctx is None:
                raise ConfigError(f"the {used} estimators need the step context (ctx).")
            sampled = self._draws_and_log_density(params, ctx)
        nats = []
        for f, eta, est in zip(self.factors, self._etas(params), used, strict=True):
            if est == "pathwise":
                g = tuple(grad[k] for k in f.keys())
                nats.append(tuple(-n for n in f.family.fisher_inverse(eta, g)))
                continue
            xs, logp = sampled
            stats = f.family.flatten(f.family.sufficient_stats(xs[f.site.name]))
            if est == "score":
                _check_particles(f, num, 2, est)
                nats.append(
                    score_natural_gradient(f.family, eta, stats, logp, self.control_variate)
                )
            else:
                _check_particles(f, num, f.family.num_params + 1, est)
                beta = f.family.unflatten(regression_natural_params(stats, logp))
                nats.append(tuple(b - e for b, e in zip(beta, eta)))
        return nats

    def _draws_and_log_density(self, params: dict, ctx) -> tuple[dict, jax.Array]:
        """P draws per factor (factor space) and f = log p_x = log p(u) - log|dT/du| (P,)."""
        args, kwargs = ctx.data
        xs = jax.vmap(lambda k: self._draw_one(params, k))(ctx.eps)
        z = self._to_flat(xs)
        logp = jax.vmap(lambda zi: self.target.log_density(zi, args, kwargs, ctx.model_key))(z)
        return xs, logp - self._log_jacobian(xs)

    # -- NumPyro protocol and posterior summaries -------------------------------------------------
    def _layout_detail(self) -> str:
        return "families " + ", ".join(f"{f.site.name}={f.name}" for f in self.factors)

    def _site_distribution(self, f: SiteFactor, eta: tuple) -> dist.Distribution:
        """The site's constrained distribution with the model's batch and event dims (a
        Gaussian factor pushed through the site's bijection)."""
        if f.on_unconstrained:
            t = biject_to(f.site.support)
            u_event = f.site.event_dim - t.codomain.event_dim + t.domain.event_dim
            base = f.family.to_numpyro(eta).to_event(u_event)
            plain = isinstance(_base_transform(f.site.support), type(biject_to(constraints.real)))
            return base if plain else dist.TransformedDistribution(base, t)
        fam_event = len(f.site.shape) - len(f.batch_shape)  # 1 for a Dirichlet, else 0
        return f.family.to_numpyro(eta).to_event(f.site.event_dim - fam_event)

    def site_distributions(self, params: Mapping) -> dict[str, dist.Distribution]:
        """Each latent site's fitted factor as a NumPyro distribution on the constrained value,
        batch and event shape as in the model: ``dist.Gamma``, ``dist.Beta``,
        ``dist.Dirichlet``, ``dist.Exponential`` (wrapped in ``Independent`` for event dims),
        and for a Gaussian factor ``dist.Normal`` on the unconstrained value, pushed through the
        site's bijection (``TransformedDistribution``) unless the site is real."""
        p = self.check_params(params)
        return {
            f.site.name: self._site_distribution(f, eta)
            for f, eta in zip(self.factors, self._etas(p), strict=True)
        }

    def _sample_sites(self, params: dict) -> dict:
        """Sample every latent site from its factor (a NumPyro guide)."""
        return {
            f.site.name: numpyro.sample(f.site.name, self._site_distribution(f, eta))
            for f, eta in zip(self.factors, self._etas(params), strict=True)
        }

    def _site_quantiles(self, f: SiteFactor, eta: tuple, q: jax.Array) -> jax.Array:
        """Marginal quantiles ``(len(q),) + site.shape`` of one factor, constrained."""
        q = q.reshape((-1,) + (1,) * len(f.batch_shape + f.family.event_shape))
        x = f.family.marginal_icdf(eta, q)
        return biject_to(f.site.support)(x) if f.on_unconstrained else x

    def quantiles(self, params: Mapping, quantiles) -> dict:
        """Marginal quantiles per site from each factor's own inverse CDF (Gamma, Beta,
        exponential; a Dirichlet coordinate is Beta(alpha_k, alpha_0 - alpha_k); a Gaussian
        factor's quantiles pushed through the bijection), shape ``(len(q),) + site.shape``.
        Deterministic sites are plug-ins, as ``AutoNormal.quantiles``."""
        q = check_quantiles(quantiles)
        p = self.check_params(params)
        values = {
            f.site.name: self._site_quantiles(f, eta, q)
            for f, eta in zip(self.factors, self._etas(p), strict=True)
        }
        return self.with_deterministic(values)

    def median(self, params: Mapping) -> dict:
        """Marginal posterior medians per site (``quantiles(params, [0.5])``; the coordinates of
        a simplex site need not sum to one), and the deterministic sites there."""
        return {k: v[0] for k, v in self.quantiles(params, [0.5]).items()}

    def sample_posterior(
        self, rng_key: jax.Array, params: Mapping, *args, sample_shape: tuple = (), **kwargs
    ) -> dict:
        """Constrained draws per site, shape ``sample_shape + site.shape``, drawn from the
        factors directly, and the model's deterministic sites at them (on ``*args, **kwargs``,
        else the setup data, as ``AutoNormal``)."""
        p = self.check_params(params)
        n = math.prod(sample_shape)
        xs = jax.vmap(lambda k: self._draw_one(p, k))(jax.random.split(rng_key, max(n, 1)))
        out = {}
        for f in self.factors:
            x = xs[f.site.name]
            x = biject_to(f.site.support)(x) if f.on_unconstrained else x
            out[f.site.name] = x[:n].reshape(tuple(sample_shape) + f.site.shape)
        return self.with_deterministic(out, *args, **kwargs)


class _FlatExpFamily(dist.Distribution):
    """q_u on the flat unconstrained vector: draws via the factors, density with the Jacobian."""

    support = constraints.real_vector

    def __init__(self, guide: ExpFamilyGuide, params: dict):
        self.guide, self.params = guide, params
        super().__init__(batch_shape=(), event_shape=(guide.target.dim,))

    def sample(self, key, sample_shape=()):
        n = math.prod(sample_shape)
        keys = jax.random.split(key, max(n, 1))
        xs = jax.vmap(lambda k: self.guide._draw_one(self.params, k))(keys)
        return self.guide._to_flat(xs)[:n].reshape(tuple(sample_shape) + self.event_shape)

    def log_prob(self, value):
        lead = value.shape[:-1]
        flat = value.reshape((-1, value.shape[-1]))
        total = jnp.zeros(flat.shape[0])
        for f, eta in zip(self.guide.factors, self.guide._etas(self.params)):
            s = f.site
            u = flat[:, s.offset : s.offset + s.size].reshape((-1,) + s.unconstrained_shape)
            lp = self._site_log_prob(f, eta, u)
            total = total + lp.reshape(flat.shape[0], -1).sum(-1)
        return total.reshape(lead)

    @staticmethod
    def _site_log_prob(f: SiteFactor, eta: tuple, u: jax.Array) -> jax.Array:
        if f.on_unconstrained:
            return f.family.log_prob(u, eta)
        t = biject_to(f.site.support)
        x = t(u)
        ld = t.log_abs_det_jacobian(u, x)
        return f.family.log_prob(x, eta).reshape(u.shape[0], -1).sum(-1) + ld.reshape(
            u.shape[0], -1
        ).sum(-1)
