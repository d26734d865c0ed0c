"""Per-guide engine defaults: a guide states the NGVI settings it needs (``Guide.engine_defaults``)
and ``NGVI(model, guide)`` uses them unless the user overrides them; K-FAC with nothing else is
the minibatch BNN setting (lr 0.1, one weight sample) and beats mean-field ADVI on a small BNN."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO, init_to_value
from numpyro.infer.autoguide import AutoNormal

import models
from ngvi import NGVI, ConfigError, MeanFieldGaussian
from ngvi.guides.kfac import KFACGuide
from ngvi.nn import bnn_engine, data_plate, dense, fit_bnn, minibatch


def tiny_bnn(X, y=None, subsample_size=None, batch_idx=None, hidden=32):
    """One tanh hidden layer: W ~ N(0, 1), y ~ Categorical(softmax(tanh(X W1 + b1) W2 + b2))."""
    xb, yb = minibatch(X, y, subsample_size, batch_idx)
    h = jnp.tanh(dense("hidden", xb, hidden))
    logits = dense("out", h, 10)
    with data_plate(X.shape[0], xb.shape[0], batch_idx):
        numpyro.sample("y", dist.Categorical(logits=logits), obs=yb)


def normal_mean(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


class _Stated(MeanFieldGaussian):
    def __init__(self, model, stated):
        super().__init__(model)
        self._stated = stated

    @property
    def engine_defaults(self) -> dict:
        return self._stated


def test_kfac_states_its_defaults_and_ngvi_uses_them():
    guide = KFACGuide(tiny_bnn)
    assert guide.engine_defaults == {"lr": 0.1, "num_particles": 1}
    engine = NGVI(tiny_bnn, guide)
    assert (engine.lr, engine.num_particles) == (0.1, 1)
    bnn = bnn_engine(guide)  # the BNN helper is now NGVI with the guide's defaults
    assert (bnn.lr, bnn.num_particles) == (0.1, 1)


def test_user_settings_override_the_guide_defaults():
    guide = KFACGuide(tiny_bnn)
    engine = NGVI(tiny_bnn, guide, lr=0.5, num_particles=4)
    assert (engine.lr, engine.num_particles) == (0.5, 4)
    engine = NGVI(tiny_bnn, guide, num_particles=2)  # one given, the other the guide's
    assert (engine.lr, engine.num_particles) == (0.1, 2)


def test_guides_without_defaults_get_the_engine_defaults():
    guide = MeanFieldGaussian(normal_mean)
    assert guide.engine_defaults == {}
    engine = NGVI(normal_mean, guide)
    assert (engine.lr, engine.num_particles) == (1.0, 8)
    engine = NGVI(normal_mean, _Stated(normal_mean, {"num_particles": 3}))
    assert (engine.lr, engine.num_particles) == (1.0, 3)


def test_bad_guide_defaults_raise_config_errors():
    with pytest.raises(ConfigError, match=r"engine_defaults names \['max_kl'\]"):
        NGVI(normal_mean, _Stated(normal_mean, {"max_kl": 0.1}))
    with pytest.raises(ConfigError, match="lr must be a positive finite number"):
        NGVI(normal_mean, _Stated(normal_mean, {"lr": -1.0}))
    with pytest.raises(ConfigError, match="num_particles must be an integer >= 1"):
        NGVI(normal_mean, _Stated(normal_mean, {"num_particles": 0}))


def _digits(rows: int = 500):
    mod = models.load_module("models/bnn_classifier.py")
    (X,), kw = mod.data()
    (Xt,), kt = mod.test_data()
    return X[:rows], kw["y"][:rows], Xt, kt["y"]


@pytest.mark.slow  # ~1 min: two BNN fits of 25 epochs
def test_kfac_with_nothing_else_beats_advi_on_a_small_bnn():
    """Issue 17: NGVI(model, KFACGuide(model)) with the engine's old defaults (lr 1, 8 particles)
    lost to mean-field ADVI on a one-hidden-layer tanh BNN (500 rows, batch 64, ~180 steps).
    With the guide's own defaults it beats ADVI (AutoNormal, Adam 0.01, the same initial means)
    on test NLL and ECE after the same 25 epochs (175 steps) of digits."""
    X, y, Xt, yt = _digits()
    common = dict(epochs=25, batch_size=64, eval_data=(Xt, yt), progress_bar=False)
    guide = KFACGuide(tiny_bnn)
    kfac = fit_bnn(NGVI(tiny_bnn, guide), X, y, **common).history[-1]
    params = guide.init_params(guide.target)
    means = {}
    for layer in guide.layers:
        m = params[f"{layer.name}:M"]
        means[layer.w.name], means[layer.b.name] = m[:-1], m[-1]
    auto = AutoNormal(tiny_bnn, init_loc_fn=init_to_value(values=means))
    advi = fit_bnn(SVI(tiny_bnn, auto, optax.adam(0.01), Trace_ELBO()), X, y, **common).history[-1]
    print(f"\nK-FAC acc {kfac.accuracy:.3f} nll {kfac.nll:.3f} ece {kfac.ece:.3f}")
    print(f"ADVI  acc {advi.accuracy:.3f} nll {advi.nll:.3f} ece {advi.ece:.3f}")
    assert kfac.nll < advi.nll and kfac.ece < advi.ece
    assert np.isfinite(kfac.nll) and kfac.accuracy > 0.9
