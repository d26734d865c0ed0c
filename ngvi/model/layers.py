"""Neural-network layers for NumPyro models that curvature-aware guides can see.

``dense(name, x, features)`` samples an ordinary weight site ``f"{name}_w"`` of shape
``(in, out)`` (and a bias site ``f"{name}_b"`` of shape ``(out,)``) from a Normal prior and returns
the pre-activation ``s = x @ W + b``. Before returning, it sends one extra NumPyro message of type
``"ngvi_layer"`` carrying the layer's input ``x`` and pre-activation ``s`` (a *marker* message,
not a ``deterministic`` site, so it costs nothing, never appears in ``Predictive`` output and is
ignored by every NumPyro handler). Outside the handlers below the marker returns ``s`` unchanged.

``LayerTap`` is the handler a K-FAC guide (``ngvi.KFACGuide``) wraps the model in: it records each
layer's input ``a`` and adds a zero perturbation ``delta[name]`` to ``s``, so that

    d log p(y | x, W) / d delta[name]  =  d log p / d s   (per example: row n of the result)

gives the pre-activation gradients ``g`` of the whole minibatch in one backward pass (the
standard K-FAC trick, Martens & Grosse 2015, sec. 3). Layers are therefore *declared* by the
model, not detected by pattern matching: a weight used outside ``dense`` is an ordinary latent.
``find_layers`` reads the markers of a traced model into ``Layer`` records and ``fast_target``
lays a BNN's latent space out with one compiled trace.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.initialization import init_to_median
from numpyro.primitives import Messenger, apply_stack

from ngvi.errors import ConfigError, ModelError
from ngvi.model.target import (
    Site,
    Target,
    check_observed,
    invalid_parameter,
    model_failed,
    observed_facts,
)

__all__ = [
    "Layer",
    "fast_target",
    "find_layers",
    "minibatch",
    "data_plate",
    "LAYER",
    "LayerTap",
    "FisherLogLik",
    "dense",
    "layer_markers",
    "mlp",
]

LAYER = "ngvi_layer"


def _marker(name: str, x: jax.Array, s: jax.Array, bias: bool) -> jax.Array:
    """Send the layer's (input, pre-activation) through the effect stack; returns ``s``."""
    msg = {
        "type": LAYER,
        "name": f"{name}__layer",
        "fn": lambda x, s: s,
        "args": (x, s),
        "kwargs": {},
        "value": None,
        "layer": name,
        "bias": bias,
        "infer": {},
        "cond_indep_stack": [],
    }
    return apply_stack(msg)["value"]


def dense(
    name: str,
    x: jax.Array,
    features: int,
    prior_scale: float = 1.0,
    bias: bool = True,
) -> jax.Array:
    """A fully connected layer: ``W ~ N(0, prior_scale^2)`` elementwise, ``s = x @ W + b``.

    :param name: layer name; the sites are ``f"{name}_w"`` (in, out) and ``f"{name}_b"`` (out,).
    :param x: inputs (..., in); the leading axes are examples (minibatch, plate).
    :param features: number of outputs ``out``.
    :param prior_scale: standard deviation of the Normal prior on every weight and bias.
    :param bias: whether to add a bias ``b ~ N(0, prior_scale^2)``.
    :returns: the pre-activation ``s`` (..., out); apply the nonlinearity yourself.
    """
    n_in = x.shape[-1]
    w = numpyro.sample(
        f"{name}_w", dist.Normal(jnp.zeros((n_in, features)), prior_scale).to_event(2)
    )
    s = x @ w
    if bias:
        b = numpyro.sample(f"{name}_b", dist.Normal(jnp.zeros(features), prior_scale).to_event(1))
        s = s + b
    return _marker(name, x, s, bias)


def mlp(
    x: jax.Array,
    sizes: Sequence[int],
    activation: Callable = jax.nn.relu,
    prior_scale: float = 1.0,
    prefix: str = "layer",
) -> jax.Array:
    """Stack of ``dense`` layers ``f"{prefix}{i}"`` with ``activation`` between them (none after
    the last); returns the last pre-activation (logits / regression mean)."""
    h = x
    for i, features in enumerate(sizes):
        h = dense(f"{prefix}{i}", h, features, prior_scale=prior_scale)
        if i < len(sizes) - 1:
            h = activation(h)
    return h


class LayerTap(Messenger):
    """Record every ``dense`` layer's input in ``self.inputs[name]`` and add ``delta[name]``
    (zeros of the pre-activation's shape) to its output, so gradients with respect to ``delta``
    are the gradients with respect to the pre-activations."""

    def __init__(self, fn: Callable | None = None, delta: dict | None = None):
        self.delta = delta or {}
        self.inputs: dict = {}
        self.shapes: dict = {}
        self.bias: dict = {}
        super().__init__(fn)

    def process_message(self, msg) -> None:
        if msg["type"] != LAYER:
            return
        name = msg["layer"]
        x, s = msg["args"]
        self.inputs[name] = x
        self.shapes[name] = jnp.shape(s)
        self.bias[name] = msg["bias"]
        if name in self.delta:
            msg["value"] = s + self.delta[name]


class FisherLogLik(Messenger):
    """Accumulate in ``self.value`` the log-likelihood of every observed site (not ``factor``
    terms; unscaled: per example, not times N / B) at the targets of a Fisher estimate: draws
    from the site's own distribution ``y~ ~ p(y | x, w)``, held constant under differentiation,
    with ``rng_key`` (the *true* Fisher; the ``k``-th observed site uses ``fold_in(rng_key, k)``),
    or the observed values with ``rng_key=None`` (the *empirical* Fisher). The values the model
    is scored on are unchanged, so one forward pass serves the ELBO and the Fisher targets."""

    def __init__(self, fn: Callable | None = None, rng_key: jax.Array | None = None):
        self.rng_key = rng_key
        self._count = 0
        self.value = jnp.zeros(())
        super().__init__(fn)

    def process_message(self, msg) -> None:
        if msg["type"] != "sample" or not msg.get("is_observed", False):
            return
        if isinstance(msg["fn"], dist.distribution.Unit):  # a numpyro.factor, not data
            return
        fn, y = msg["fn"], msg["value"]
        if self.rng_key is not None:
            y = jax.lax.stop_gradient(fn.sample(jax.random.fold_in(self.rng_key, self._count)))
            self._count += 1
        self.value = self.value + jnp.sum(fn.log_prob(y))


def layer_markers(trace: dict) -> dict:
    """``{layer name: marker site}`` of a NumPyro trace, in the order the model calls them."""
    return {s["layer"]: s for s in trace.values() if s["type"] == LAYER}


# -- the layers and layout a curvature-aware guide sees ---------------------------------------
class Layer(NamedTuple):
    """A ``dense`` layer as the guide sees it: its sites and augmented weight-matrix shape."""

    name: str
    w: Site  # weight site (in, out)
    b: Site | None  # bias site (out,) or None
    n_in: int  # rows of the augmented matrix: in (+1 with a bias)
    n_out: int
    prior_prec: float  # mean prior precision of the weights


def find_layers(model, args, kwargs, target: Target, rng_key) -> tuple[tuple[Layer, ...], int]:
    """The model's ``dense`` layers (from their marker messages) and the data size ``N`` (the
    number of observations times the likelihood's scale: N / B * B for a minibatch)."""
    tr = trace(seed(model, rng_key)).get_trace(*args, **kwargs)
    sites = {s.name: s for s in target.sites}
    layers = []
    for name, msg in layer_markers(tr).items():
        w = sites.get(f"{name}_w")
        b = sites.get(f"{name}_b") if msg["bias"] else None
        if w is None or len(w.shape) != 2 or w.shape != w.unconstrained_shape:
            raise ModelError(f"layer '{name}' has no real (in, out) latent site '{name}_w'.")
        prec = float(jnp.mean(1.0 / tr[w.name]["fn"].variance))
        layers.append(Layer(name, w, b, w.shape[0] + (b is not None), w.shape[1], prec))
    if not layers:
        raise ModelError("the model declares no ngvi.nn.dense layer: KFACGuide needs at least one.")
    obs = [s for s in tr.values() if s["type"] == "sample" and s["is_observed"]]
    sizes = [math.prod(s["fn"].batch_shape) * float(s["scale"] or 1.0) for s in obs]
    return tuple(layers), round(max(sizes, default=1))


def fast_target(model, args: tuple, kwargs: dict, rng_key) -> Target:
    """A ``Target`` from one jitted trace at the prior median (``init_to_median``), with
    ``make_target``'s observed-data checks (finite, shape, support: the trace returns what they
    need) but not its initialization search (same layout and signature)."""
    info: dict = {}

    def latent_unc():
        init = init_to_median(num_samples=15)
        tr = trace(substitute(seed(model, rng_key), substitute_fn=init)).get_trace(*args, **kwargs)
        latent = [
            s
            for s in tr.values()
            if s["type"] == "sample"
            and not s["is_observed"]
            and not s.get("infer", {}).get("is_auxiliary", False)
        ]
        info["support"] = {s["name"]: s["fn"].support for s in latent}
        info["shape"] = {s["name"]: tuple(jnp.shape(s["value"])) for s in latent}
        plates = [s["args"] for s in tr.values() if s["type"] == "plate"]
        info["sub"] = any(a[1] is not None and a[1] != a[0] for a in plates)
        info["facts"], checks = {}, {}  # static facts out by side channel, arrays returned
        for s in tr.values():
            if s["type"] == "sample" and s["is_observed"]:
                info["facts"][s["name"]], in_support = observed_facts(s)
                checks[s["name"]] = (s["value"], in_support)
        return {s["name"]: biject_to(s["fn"].support).inv(s["value"]) for s in latent}, checks

    try:
        unc, checks = jax.jit(latent_unc)()
    except (TypeError, ValueError) as e:
        if type(e).__module__.startswith("jax"):  # a tracer error: the model, not its data
            raise
        raise invalid_parameter(model, args, kwargs, rng_key, e) or model_failed(e) from e
    for name, (value, in_support) in checks.items():
        check_observed(name, value, in_support, info["facts"][name])
    z0, unravel = ravel_pytree(unc)
    sites, offset = [], 0
    for name in sorted(unc):
        size = int(np.size(unc[name]))
        shape = info["shape"][name]
        sites.append(Site(name, shape, tuple(unc[name].shape), info["support"][name], offset, size))
        offset += size
    signature = ";".join(f"{s.name}{s.shape}{s.support}" for s in sites)
    return Target(model, tuple(sites), int(z0.size), z0, unravel, info["sub"], signature)


# -- minibatch plumbing shared by the BNN models --------------------------------------------
def minibatch(X, y, subsample_size, batch_idx):
    """Rows for this step of a BNN model's data: all, a NumPyro subsample (random, from the
    plate "data") or the given ``batch_idx``."""
    if batch_idx is not None:
        return X[batch_idx], None if y is None else y[batch_idx]
    if subsample_size is None:
        return X, y
    with numpyro.plate("data", X.shape[0], subsample_size=subsample_size) as idx:
        return X[idx], None if y is None else y[idx]


def data_plate(n: int, size: int | None, batch_idx):
    """The likelihood plate "data" over ``n`` rows, its log-likelihood scaled by ``N / B`` for a
    minibatch of ``B`` rows.

    * ``batch_idx=None``: ``numpyro.plate("data", n, subsample_size=size)`` (``size=None``: all
      rows; else NumPyro draws ``size`` random rows).
    * ``batch_idx`` given (the rows of this step, as ``fit_bnn`` passes them): a plate of
      ``B = len(batch_idx)`` rows scaled by ``n / B``, no random draw. ``size=None`` means the
      whole ``batch_idx``; a ``size`` other than ``len(batch_idx)`` raises ``ConfigError``.
    """
    if batch_idx is None:
        return numpyro.plate("data", n, subsample_size=size)
    rows = int(jnp.shape(batch_idx)[0]) if jnp.ndim(batch_idx) else None
    if rows is None:
        raise ConfigError(
            f"batch_idx must be a 1-d array of row indices, got a scalar {batch_idx!r}."
        )
    if size is not None and size != rows:
        raise ConfigError(
            f"data_plate got size={size!r} but batch_idx holds {rows} rows: pass size=None (the "
            "whole batch_idx) or the batch's length."
        )
    return _scaled_plate(rows, n / rows)


@contextlib.contextmanager
def _scaled_plate(size, scale):
    """A plate over the given rows whose log-likelihood is scaled by ``scale`` (= N / B)."""
    with numpyro.plate("data", size), numpyro.handlers.scale(scale=scale):
        yield
