"""The natural step as an optax transformation (ngvi.engine.optax): the engine's step exactly,
chained with optax's clipping and schedules, jitted without recompiling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ngvi
from ngvi import NGVI, ConfigError, FullRankGaussian, MeanFieldGaussian, models
from ngvi.engine.optax import NaturalGradientState, neg_elbo, precondition


def _setup(name: str, **guide_kw):
    model, args, kwargs = models.load(name)
    guide = MeanFieldGaussian(model, **guide_kw)
    target = guide.setup(jax.random.PRNGKey(0), args, kwargs)
    return model, guide, guide.init_params(target), args, kwargs


def _grad(guide, params, args, kwargs, seed=1):
    key = jax.random.PRNGKey(seed)
    return jax.jit(jax.grad(lambda p: neg_elbo(guide, p, key, *args, **kwargs)))(params)


@pytest.fixture(scope="module")
def schools():
    """Eight schools with a mean-field guide: (model, guide, params, args, kwargs, grads)."""
    model, guide, params, args, kwargs = _setup("eight_schools")
    return model, guide, params, args, kwargs, _grad(guide, params, args, kwargs)


@pytest.mark.parametrize("coords", ["natural", "meanscale"])
def test_unit_update_is_the_guides_natural_step_exactly(schools, coords):
    model, _, params, _, _, grads = schools
    guide = MeanFieldGaussian(model, coords=coords)
    tx = ngvi.natural_gradient(guide)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, damping=0.3)
    proposal = guide.natural_step(params, grads, 1.0, 0.3, 0)
    for k in params:  # bit for bit: the same step, minus the parameters
        np.testing.assert_array_equal(updates[k], proposal[k] - params[k])
    new = optax.apply_updates(params, updates)
    for k in params:
        np.testing.assert_allclose(new[k], proposal[k], rtol=1e-6, atol=1e-6)
    assert int(state.count) == 1
    # precondition + scale_by_learning_rate(1) is the same step, signed like a gradient before
    tx2 = optax.chain(precondition(guide), optax.scale_by_learning_rate(1.0))
    updates2, _ = tx2.update(grads, tx2.init(params), params, damping=0.3)
    for k in params:
        np.testing.assert_array_equal(updates2[k], updates[k])


def test_reproduces_the_engines_step(schools):
    """NGVI.update's accepted proposal (no averaging, fixed damping) from the same gradient."""
    model, _, _, args, kwargs, _ = schools
    guide = MeanFieldGaussian(model)
    engine = NGVI(model, guide, damping=0.5, adapt_damping=False, average=0.0)
    state = engine.init(jax.random.PRNGKey(2), *args, **kwargs)
    _, ctx = engine._context(state, (args, kwargs))  # the step's noise
    grads = jax.jit(jax.grad(ctx.loss_fn))(state.params)
    new_state, _ = engine.update(state, *args, **kwargs)
    assert int(new_state.num_rejected) == 0, "the engine rejected its step: pick another seed"
    tx = ngvi.natural_gradient(guide)
    updates, _ = tx.update(grads, tx.init(state.params), state.params, damping=state.damping)
    new = optax.apply_updates(state.params, updates)
    for k in new:
        np.testing.assert_allclose(new[k], new_state.params[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(new[k], state.params[k])  # it moved


def test_neg_elbo_is_the_engines_estimator(schools):
    model, guide, params, args, kwargs, _ = schools
    engine = NGVI(model, guide)
    key = jax.random.PRNGKey(7)

    @jax.jit
    def both(params):
        eps = guide.base_noise(jax.random.split(key)[0], 8)
        want = engine._neg_elbo(params, eps, (args, kwargs), None)
        return neg_elbo(guide, params, key, *args, **kwargs), want

    got, want = both(params)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_chains_with_clipping_a_schedule_and_extra_args(schools):
    _, guide, params, _, _, grads = schools
    norm = float(optax.tree.norm(grads))
    clip = 0.1 * norm  # clipping is active
    schedule = optax.exponential_decay(0.8, transition_steps=1, decay_rate=0.5)
    tx = optax.chain(
        optax.clip_by_global_norm(clip), precondition(guide), optax.scale_by_learning_rate(schedule)
    )
    state = tx.init(params)
    clipped = jax.tree.map(lambda g: g * clip / norm, grads)
    for t, lr in enumerate([0.8, 0.4]):  # the schedule and the guide's step count advance
        updates, state = tx.update(grads, state, params, damping=0.2)
        direction = guide.natural_step(params, clipped, 1.0, 0.2, t)
        for k in params:
            want = -lr * (params[k] - direction[k])
            np.testing.assert_allclose(updates[k], want, rtol=1e-5, atol=1e-7)
    # damping reaches the member of the chain: another damping, another step
    other, _ = tx.update(grads, tx.init(params), params, damping=5.0)
    first, _ = tx.update(grads, tx.init(params), params, damping=0.2)
    assert not np.allclose(other["loc"], first["loc"])
    # natural_gradient takes the schedule itself: the guide's step at lr_t, after clipping
    tx = optax.chain(optax.clip_by_global_norm(clip), ngvi.natural_gradient(guide, schedule))
    updates, state = tx.update(grads, tx.init(params), params, damping=0.2)
    want = guide.natural_step(params, clipped, 0.8, 0.2, 0)
    for k in params:
        np.testing.assert_allclose(updates[k], want[k] - params[k], rtol=1e-5, atol=1e-7)


def test_jits_without_recompiling_and_fits_a_conjugate_posterior():
    """A hand-written loop: jitted once, and on Normal-Normal (Gaussian posterior, where the
    mean-field guide is exact) it reaches the closed-form posterior."""
    _, guide, params, args, kwargs = _setup("normal_normal")
    tx = optax.chain(optax.clip_by_global_norm(1e3), ngvi.natural_gradient(guide))
    traces = []

    @jax.jit
    def step(params, state, key, damping):
        traces.append(1)
        loss_fn = lambda p: neg_elbo(guide, p, key, *args, **kwargs)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, damping=damping)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    for t in range(30):
        params, state, loss = step(params, state, jax.random.PRNGKey(t), jnp.float32(0.0))
    assert len(traces) == 1, "the second call recompiled"
    assert isinstance(state[1], NaturalGradientState) and int(state[1].count) == 30
    assert all(np.all(np.isfinite(v)) for v in params.values())
    exact = models.load_module("normal_normal").exact_posterior(**kwargs)["mu"]
    assert float(params["loc"][0]) == pytest.approx(exact["loc"], abs=1e-3)
    assert float(params["scale"][0]) == pytest.approx(exact["scale"], rel=1e-2)


def test_named_errors(schools):
    model, guide, params, args, kwargs, grads = schools
    with pytest.raises(ConfigError, match=r"learning_rate must be .* got 0"):
        ngvi.natural_gradient(guide, 0.0)
    with pytest.raises(ConfigError, match="needs an ngvi guide"):
        precondition(object())
    tx = ngvi.natural_gradient(guide)
    with pytest.raises(ConfigError, match=r"tx.update\(grads, state, params\)"):
        tx.update(grads, tx.init(params))
    with pytest.raises(ConfigError, match="differ in structure"):
        tx.update({"loc": grads["loc"]}, tx.init(params), params)
    with pytest.raises(ConfigError, match="damping must be .* got -1"):
        tx.update(grads, tx.init(params), params, damping=-1.0)
    # a guide whose curvature needs the step's noise and data says so (pass ctx=StepContext)
    full = FullRankGaussian(model)
    p = full.init_params(full.setup(jax.random.PRNGKey(0), args, kwargs))
    g = jax.tree.map(jnp.zeros_like, p)
    tx = ngvi.natural_gradient(full)
    with pytest.raises(ConfigError, match="ctx"):
        tx.update(g, tx.init(p), p)
