"""Bayesian neural networks: the dense layers a model declares (from ``ngvi.model``), their
predictive metrics and the minibatch training loop over epochs. May import the engine and every
layer below it; nothing below imports it."""

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
from ngvi.nn.metrics import Metrics, evaluate_bnn, expected_calibration_error
from ngvi.nn.train import FitResult, bnn_engine, fit_bnn, minibatches

__all__ = [
    "LAYER",
    "FisherLogLik",
    "FitResult",
    "Layer",
    "LayerTap",
    "Metrics",
    "bnn_engine",
    "data_plate",
    "dense",
    "evaluate_bnn",
    "expected_calibration_error",
    "fast_target",
    "find_layers",
    "fit_bnn",
    "layer_markers",
    "minibatch",
    "minibatches",
    "mlp",
]
