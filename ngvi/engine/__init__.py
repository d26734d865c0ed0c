"""The NGVI driver (state, natural step, damping, stopping), the natural step as an optax
transformation (``ngvi.engine.optax``), checkpoints and data sharding.
May import every layer below it: ``ngvi.errors``, ``numerics``, ``families``, ``model``,
``guides``."""

from ngvi.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ngvi.engine.convergence import CheckInfo
from ngvi.engine.infer import NGVI, NGVIInfo, NGVIRunResult, NGVIState, StepContext
from ngvi.engine.optax import NaturalGradientState, natural_gradient, neg_elbo, precondition
from ngvi.engine.sharding import data_mesh, shard_data

__all__ = [
    "NGVI",
    "CheckInfo",
    "CheckpointError",
    "NGVIInfo",
    "NGVIRunResult",
    "NGVIState",
    "NaturalGradientState",
    "StepContext",
    "data_mesh",
    "load_checkpoint",
    "natural_gradient",
    "neg_elbo",
    "precondition",
    "save_checkpoint",
    "shard_data",
]
