"""Property: on random models from a small grammar, a short NGVI fit either succeeds, with finite
parameters and posterior samples in every site's support, or raises one of ngvi's documented
errors (``NGVIError`` subclasses) -- never a NaN posterior or a foreign exception.

The grammar: 1-4 latent sites, each real / positive / unit-interval / interval / simplex /
ordered / LKJ-Cholesky with a random hyperparameter (concentrations down to 0.02, where float32
underflows), optionally inside a plate, optionally with an observed site whose data are drawn
from the model; random guide family, initial scale and step size. Shapes come from a tiny set so
the few examples of the default run stay fast; the slow run draws many more."""

import contextlib

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from numpyro.distributions.transforms import OrderedTransform
from numpyro.handlers import seed, substitute, trace
from numpyro.infer import init_to_uniform

from ngvi import NGVI, FullRankGaussian, MeanFieldGaussian, NGVIError

KINDS = ("real", "positive", "unit", "interval", "simplex", "ordered", "corr_cholesky")


def _prior(kind: str, h):
    """The prior of a site of this kind with hyperparameter h > 0."""
    if kind == "real":
        return dist.Normal(0.0, h)
    if kind == "positive":
        return dist.Gamma(h, 1.0)
    if kind == "unit":
        return dist.Beta(h, 1.0)
    if kind == "interval":
        return dist.Uniform(-h, 2.0)
    if kind == "simplex":
        return dist.Dirichlet(jnp.full(3, h))
    if kind == "ordered":
        base = dist.Normal(0.0, h).expand([3]).to_event(1)
        return dist.TransformedDistribution(base, OrderedTransform())
    return dist.LKJCholesky(2, h)


def make_model(sites: tuple, plate: int, observed: bool):
    """``model(y)``: the sites (name -> (kind, h)) inside an optional plate and, if
    ``observed``, ``y ~ Normal(sum of every site's values, 1)`` per plate element."""

    def model(y=None):
        with numpyro.plate("p", plate) if plate else contextlib.nullcontext():
            total = 0.0
            for name, (kind, h) in sites:
                x = numpyro.sample(name, _prior(kind, h))
                event = x.ndim - (1 if plate else 0)
                total = total + jnp.sum(x, axis=tuple(range(x.ndim - event, x.ndim)))
            if observed:
                numpyro.sample("y", dist.Normal(total, 1.0), obs=y)

    return model


@st.composite
def problems(draw):
    n = draw(st.integers(1, 4))
    hyper = st.sampled_from([0.02, 0.3, 1.0, 4.0])
    sites = tuple((f"s{i}", (draw(st.sampled_from(KINDS)), draw(hyper))) for i in range(n))
    plate = draw(st.sampled_from([0, 2]))
    observed = draw(st.booleans())
    guide = draw(st.sampled_from([MeanFieldGaussian, FullRankGaussian]))
    init_scale = draw(st.sampled_from([0.01, 0.1, 1.0]))
    lr = draw(st.sampled_from([0.5, 1.0]))
    seed_ = draw(st.integers(0, 2**16))
    return sites, plate, observed, guide, init_scale, lr, seed_


def check_fit(sites, plate, observed, guide_cls, init_scale, lr, seed_) -> None:
    model = make_model(sites, plate, observed)
    key = jax.random.PRNGKey(seed_)
    # data drawn from the model at a random point of the support (init_to_uniform: drawing
    # the latents from their priors would compile a Gamma/LKJ sampler per example)
    at_random = substitute(seed(model, key), substitute_fn=init_to_uniform)
    y = trace(at_random).get_trace()["y"]["value"] if observed else None
    guide = guide_cls(model, init_scale=init_scale, init_strategy=init_to_uniform)
    try:
        r = NGVI(model, guide, lr=lr, max_rejections=20).run(key, 30, y, progress_bar=False)
    except NGVIError as e:
        event(f"raised {type(e).__name__}")
        return  # a documented error (improper posterior, too many rejections, ...)
    event("fitted")
    leaves = jax.tree.leaves(r.params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves), "non-finite parameters"
    draws = guide.sample_posterior(jax.random.PRNGKey(1), r.params, sample_shape=(20,))
    for site in guide.target.sites:
        x = draws[site.name]
        assert bool(jnp.all(jnp.isfinite(x))), f"non-finite draws of {site.name}"
        assert bool(jnp.all(site.support(x))), f"draws of {site.name} outside {site.support}"


_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@settings(max_examples=1, **_SETTINGS)  # ~10 s of compiles per example on 2 cores
@given(problems())
def test_random_models_fit_or_raise_documented_errors(problem):
    check_fit(*problem)


@pytest.mark.slow
@settings(max_examples=30, **_SETTINGS)
@given(problems())
def test_random_models_fit_or_raise_documented_errors_many(problem):
    check_fit(*problem)
