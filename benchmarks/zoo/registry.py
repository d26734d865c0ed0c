"""The zoo's registry: one ``ZooModel`` record per model, filled by the family modules.

A record states what the harness needs and nothing it could compute wrongly by itself: the model,
its data, its latent dimension (checked against the traced model by ``tests/test_zoo.py``), the
guides that apply (``guides_for``: ``MeanFieldGaussian`` always, ``FullRankGaussian`` for
d <= 200, ``ExpFamilyGuide`` when some site gets a Gamma, Beta or Dirichlet factor, ``KFACGuide``
when the model declares ``ngvi.nn.dense`` layers) and how its NUTS reference is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

__all__ = ["FULLRANK_MAX_DIM", "REGISTRY", "RHAT_MAX", "ZooModel", "guides_for", "register"]

FULLRANK_MAX_DIM = 200
RHAT_MAX = 1.01  # a NUTS reference is reliable with no divergence and every r_hat <= this


class ZooModel(NamedTuple):
    name: str
    model: Callable
    data: Callable[[], tuple[tuple, dict]]  # () -> (args, kwargs), arrays in the active dtype
    dim: int  # latent dimension (flat, unconstrained)
    guides: tuple[str, ...]  # e.g. ("meanfield", "fullrank", "expfam")
    kind: str  # "hierarchical", "time series", ... (for the table)
    target_accept: float = 0.8  # NUTS target acceptance probability
    twin: str | None = None  # a reparameterised twin whose NUTS run gives this model's reference
    twin_sites: dict | None = None  # {site here: site (latent or deterministic) in the twin}
    multimodal: bool = False  # symmetric modes (BNN weights): NUTS chains may sit in different ones
    nuts_init: Callable | None = (
        None  # () -> {site: value}: NUTS starts there (mixtures' main mode)
    )
    quick: bool = False  # in the --quick subset
    note: str = ""


def guides_for(dim: int, positive_or_simplex: bool, layers: bool = False) -> tuple[str, ...]:
    """The guides that apply to a model (module docstring)."""
    out = ["meanfield"]
    if dim <= FULLRANK_MAX_DIM:
        out.append("fullrank")
    if positive_or_simplex:
        out.append("expfam")
    if layers:
        out.append("kfac")
    return tuple(out)


REGISTRY: dict[str, ZooModel] = {}


def register(
    name: str,
    model: Callable,
    data: Callable,
    dim: int,
    kind: str,
    *,
    expfam: bool,
    layers: bool = False,
    **extra,
) -> ZooModel:
    """Add a model to ``REGISTRY``; ``expfam``: some site has a positive, unit-interval or simplex
    support (so ``ExpFamilyGuide`` places a Gamma, Beta or Dirichlet factor on it)."""
    if name in REGISTRY:
        raise ValueError(f"zoo model {name!r} is registered twice")
    entry = ZooModel(name, model, data, dim, guides_for(dim, expfam, layers), kind, **extra)
    REGISTRY[name] = entry
    return entry


def traced_layout(entry: ZooModel) -> tuple[int, bool, bool]:
    """(latent dimension, some site gets an ExpFamilyGuide Gamma/Beta/Dirichlet factor, the model
    declares dense layers), read off one abstract trace of the model on its data
    (``jax.eval_shape``: shapes only, nothing computed): what the declared ``dim`` and ``guides``
    must agree with."""
    import math

    import jax
    from numpyro.distributions.transforms import biject_to
    from numpyro.handlers import seed, trace

    from ngvi.guides.expfam_factors import support_family
    from ngvi.nn import layer_markers

    args, kwargs = entry.data()
    facts = {}

    def unconstrained(key):
        tr = trace(seed(entry.model, key)).get_trace(*args, **kwargs)
        latent = [s for s in tr.values() if s["type"] == "sample" and not s["is_observed"]]
        facts["expfam"] = any(support_family(s["fn"].support) != "gaussian" for s in latent)
        facts["layers"] = bool(layer_markers(tr))
        return {s["name"]: biject_to(s["fn"].support).inv(s["value"]) for s in latent}

    shapes = jax.eval_shape(unconstrained, jax.random.PRNGKey(0))
    dim = sum(math.prod(x.shape) for x in shapes.values())
    return dim, facts["expfam"], facts["layers"]
