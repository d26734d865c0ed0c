"""What ngvi reads from a NumPyro model: the flat unconstrained target (``target``) and the
dense layers a curvature-aware guide can see (``layers``). May import ``ngvi.errors``,
``ngvi.numerics`` and ``ngvi.families``."""

from ngvi.model.layers import (
    LAYER,
    FisherLogLik,
    Layer,
    LayerTap,
    data_plate,
    dense,
    fast_target,
    find_layers,
    layer_markers,
    minibatch,
    mlp,
)
from ngvi.model.target import Site, Target, join_data, make_target, split_data

__all__ = [
    "LAYER",
    "FisherLogLik",
    "Layer",
    "LayerTap",
    "Site",
    "Target",
    "data_plate",
    "dense",
    "fast_target",
    "find_layers",
    "join_data",
    "layer_markers",
    "make_target",
    "minibatch",
    "mlp",
    "split_data",
]
