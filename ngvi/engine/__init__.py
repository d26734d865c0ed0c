"""The NGVI driver (state, natural step, damping, stopping), checkpoints and data sharding.
May import every layer below it: ``ngvi.errors``, ``numerics``, ``families``, ``model``,
``guides``."""

from ngvi.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ngvi.engine.convergence import CheckInfo
from ngvi.engine.infer import NGVI, NGVIInfo, NGVIRunResult, NGVIState, StepContext
from ngvi.engine.sharding import data_mesh, shard_data

__all__ = [
    "NGVI",
    "CheckInfo",
    "CheckpointError",
    "NGVIInfo",
    "NGVIRunResult",
    "NGVIState",
    "StepContext",
    "data_mesh",
    "load_checkpoint",
    "save_checkpoint",
    "shard_data",
]
