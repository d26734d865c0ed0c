r"""An exponential-family guide: one ``ngvi.families`` member per latent site, natural steps.

Each latent site gets a mean-field factor from an exponential family chosen by its support
(positive -> ``Gamma``, unit interval -> ``Beta``, simplex -> ``Dirichlet``, anything else -> a
``DiagGaussian`` on the site's unconstrained coordinates), overridable per site by name:
``ExpFamilyGuide(model, families={"sigma": "gaussian"})``. The parameters are the natural
parameters ``eta`` of every factor, so a natural step is a step along ``grad_m ELBO`` (the
gradient in the mean parameters ``m = grad A(eta)``, Khan & Lin 2017):

    eta' = eta + rho * nat,      nat = grad_m ELBO = F(eta)^-1 grad_eta ELBO,

``rho = lr / (1 + damping) * step_schedule(step)`` (a unit first step, then a decay to a constant
0.1: ``default_natural_schedule``; the engine's iterate average removes the noise a constant rate
leaves). The damping is Marquardt-scaled (every step shrinks by ``1 / (1 + damping)``). A step
that would leave the natural-parameter domain (every domain here is a box: ``a > 0``, ``b > 0``,
``-1/(2 sigma^2) < 0``) is cut per factor to half the distance to the boundary, so every iterate
is a valid distribution.

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
Draws, starts and this entropy are computed in log space, so sparse sites (concentrations far
below 1) stay finite in float32: ``ngvi.guides.expfam_factors``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from ngvi.errors import ConfigError
from ngvi.guides.base import Guide, check_quantiles
from ngvi.guides.expfam_estimators import (
    CONTROL_VARIATES,
    linear_cv_coefficients,
    regression_natural_params,
    score_natural_gradient,
)
from ngvi.guides.expfam_factors import (
    DOMAIN,
    SiteFactor,
    base_transform,
    default_family,
    draw_unconstrained,
    entropy_unconstrained,
    family_name,
    make_factor,
    start_natural,
    stats_and_log_jacobian,
    stats_jacobian,
    step_fraction,
)
from ngvi.model.target import Target

__all__ = ["ExpFamilyGuide", "SiteFactor", "default_natural_schedule", "regression_natural_params"]

_ESTIMATORS = ("auto", "regression", "pathwise", "score")


def default_natural_schedule(step) -> jax.Array:
    """Natural step size ``rho_t = max(1 / (1 + 0.3 t), 0.1)``: a unit first step (exact on a
    conjugate site), then a constant rate. Not the mean-field precision schedule's 0.01 floor:
    here *every* natural parameter takes this rate, Gaussian means included, and a rate of 0.01
    leaves a stochastic-approximation crawl (the zoo's linear regression 0.84 nat and its LGCP
    2.9 nat from their optima after 2000 steps, both within 0.04 nat with 0.1). The engine's
    iterate average (``NGVI(average=...)``) takes out the noise a constant rate leaves."""
    return jnp.maximum(1.0 / (1.0 + 0.3 * step), 0.1)


def _check_particles(factor: SiteFactor, num: int, need: int, estimator: str) -> None:
    if num < need:
        raise ConfigError(
            f"the {estimator} estimator needs num_particles >= {need} for site "
            f"'{factor.site.name}' ({factor.name}, {factor.family.num_params} statistics), got "
            f"{num}: raise num_particles or use estimator='pathwise'."
        )


class ExpFamilyGuide(Guide):
    """Mean-field guide with an exponential-family factor per latent site (module docstring).

    :param families: per-site overrides ``{site name: family}``, the family a name
        ('gaussian', 'gamma', 'exponential', 'beta', 'dirichlet') or an ``ngvi.families`` class;
        an unknown site name raises ``ConfigError`` at setup.
    :param estimator: ``"auto"`` (default), ``"regression"``, ``"pathwise"`` or ``"score"``, or
        a dict ``{site name: estimator}`` (sites it does not name use ``"auto"``).
    :param control_variate: ``"loo"`` (default): the score estimator's leave-one-out baseline
        and the pathwise estimator's leave-one-out linear control variate
        (``expfam_estimators.linear_cv_coefficients``); ``"none"``: neither (plain estimators,
        for comparison only: far noisier).
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
        self.families = {k: family_name(v) for k, v in (families or {}).items()}
        self.estimator = dict(estimator) if isinstance(estimator, dict) else estimator
        self.control_variate = control_variate
        self.init_scale = float(init_scale)
        self.step_schedule = step_schedule or default_natural_schedule
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
            make_factor(s, self.families.get(s.name) or default_family(s)) for s in target.sites
        )
        return target

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
        """Only plain pathwise directions are descent steps on the engine's common-random-numbers
        loss; regression, score-function and control-variate directions are judged within its
        Monte Carlo error."""
        return self.resolved_estimator == "pathwise" and self.control_variate == "none"

    def _etas(self, params: dict) -> list[tuple]:
        return [tuple(params[k] for k in f.keys()) for f in self.factors]

    # -- family ---------------------------------------------------------------------------------
    def init_params(self, target: Target) -> dict:
        """Every factor centred at the model's initial point (``start_natural``: formed in log
        space, so a sparse Dirichlet / Beta / Gamma site starts valid in float32 too)."""
        unc = target.unravel(jnp.asarray(target.init_z))
        params = {}
        for f in self.factors:
            eta = start_natural(f, unc[f.site.name], self.init_scale)
            params.update(dict(zip(f.keys(), eta, strict=True)))
        return params

    def _param_specs(self, target, init):
        specs = {}
        for f in self.factors:
            for key, (lo, hi) in zip(f.keys(), DOMAIN[f.name], strict=True):
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
        """One draw of every factor on its site's unconstrained scale (log space)."""
        return {
            f.site.name: draw_unconstrained(f, jax.random.fold_in(key, i), eta)
            for i, (f, eta) in enumerate(zip(self.factors, self._etas(params)))
        }

    def _to_flat(self, us: dict) -> jax.Array:
        """Unconstrained draws per site (P, ...) -> flat vectors (P, d)."""
        return jnp.concatenate(
            [us[f.site.name].reshape(us[f.site.name].shape[0], -1) for f in self.factors], axis=-1
        )

    def _log_jacobian(self, us: dict) -> jax.Array:
        """log |dT/du| per draw (P,), summed over the sites whose factor is on x = T(u)."""
        return sum(stats_and_log_jacobian(f, us[f.site.name])[1] for f in self.factors)

    def reparam(self, params: dict, eps: jax.Array) -> jax.Array:
        us = jax.vmap(lambda k: self._draw_one(params, k))(eps)
        return self._to_flat(us)

    def entropy(self, params: dict) -> jax.Array:
        """H[q_u] = sum over sites of H[q_x] - E[log |dT/du|] (closed form, without
        cancellation: ``expfam_factors.entropy_unconstrained``)."""
        return sum(
            entropy_unconstrained(f, eta) for f, eta in zip(self.factors, self._etas(params))
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

    # -- the gradient and the natural step ------------------------------------------------------
    def value_and_grad(self, loss_and_logp, params: dict, step, ctx):
        """``((-ELBO, log p per draw), grad, None)``: the reported loss is the plain Monte Carlo
        -ELBO at ``params``; the gradient of pathwise factors carries the leave-one-out linear
        control variate (``expfam_estimators``; unbiased), the model's gradient taken once per
        draw. Without pathwise factors, or with fewer than 2 draws, the engine's autodiff."""
        num = ctx.eps.shape[0]
        cv = [self.estimator_for(f, num) == "pathwise" for f in self.factors]
        if self.control_variate == "none" or num < 2 or not any(cv):
            return super().value_and_grad(loss_and_logp, params, step, ctx)
        args, kwargs = ctx.data
        us, draws_vjp = jax.vjp(lambda p: jax.vmap(lambda k: self._draw_one(p, k))(ctx.eps), params)
        log_density = lambda z: self.target.log_density(z, args, kwargs, ctx.model_key)
        logp, dlogp = jax.vmap(jax.value_and_grad(log_density))(self._to_flat(us))  # (P,), (P, d)
        neg_h, grad = jax.value_and_grad(lambda p: -self.entropy(p))(params)  # -H, -grad H
        cotangent = {}
        for f, eta, use_cv in zip(self.factors, self._etas(params), cv, strict=True):
            u = us[f.site.name]
            g = dlogp[:, f.site.offset : f.site.offset + f.site.size].reshape(u.shape)
            if use_cv:
                g, fc = self._linear_cv(f, eta, u, g)
                grad.update({k: grad[k] - v for k, v in zip(f.keys(), fc, strict=True)})
            cotangent[f.site.name] = -g / num
        grad = jax.tree.map(jnp.add, grad, draws_vjp(cotangent)[0])
        return (neg_h - jnp.mean(logp), logp), grad, None

    @staticmethod
    def _linear_cv(f: SiteFactor, eta: tuple, u: jax.Array, g: jax.Array):
        """``(df/du_k - c_k . dT/du_k, F mean_k c_k)`` for one factor's draws ``u`` (P, ...)
        and gradients ``g`` (``expfam_estimators``; ``c`` takes no gradient)."""
        jac = stats_jacobian(f, u)  # (P, *batch, du, k)
        gu = g if f.name == "dirichlet" else g[..., None]  # (P, *batch, du)
        c = jax.lax.stop_gradient(linear_cv_coefficients(jac, gu))
        fitted = jnp.einsum("p...ij,p...j->p...i", jac, c)
        fitted = fitted if f.name == "dirichlet" else fitted[..., 0]
        return g - fitted, f.family.fisher_vp(eta, f.family.unflatten(jnp.mean(c, axis=0)))

    def natural_step(self, params: dict, grad: dict, lr, damping, step, ctx=None) -> dict:
        """eta' = eta + rho * nat per factor, cut to stay in the domain (module docstring)."""
        nats = self._natural_gradients(params, grad, ctx)
        rho = lr / (1.0 + damping) * self.step_schedule(step)
        new = {}
        for f, eta, nat in zip(self.factors, self._etas(params), nats, strict=True):
            delta = tuple(rho * n for n in nat)
            t = step_fraction(f, eta, delta)
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
            us, logp = sampled
            stats = f.family.flatten(stats_and_log_jacobian(f, us[f.site.name])[0])
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
        """P unconstrained draws per factor and f = log p_x = log p(u) - log|dT/du| (P,)."""
        args, kwargs = ctx.data
        us = jax.vmap(lambda k: self._draw_one(params, k))(ctx.eps)
        z = self._to_flat(us)
        logp = jax.vmap(lambda zi: self.target.log_density(zi, args, kwargs, ctx.model_key))(z)
        return us, logp - self._log_jacobian(us)

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
            plain = isinstance(base_transform(f.site.support), type(biject_to(constraints.real)))
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
            x = biject_to(f.site.support)(xs[f.site.name])
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
        """log q_u(u) = log h + <eta, T(x)> - A(eta) + log |dT/du|, in log space."""
        if f.on_unconstrained:
            return f.family.log_prob(u, eta)
        stats, log_det = stats_and_log_jacobian(f, u)
        lp = f.family.inner(eta, stats) - f.family.log_partition(eta)
        return lp.reshape(u.shape[0], -1).sum(-1) + log_det
