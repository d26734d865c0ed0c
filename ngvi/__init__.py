"""ngvi: natural-gradient variational inference for NumPyro models."""

from ngvi.errors import ConfigError, DataError, FitError, ModelError, NGVIError
from ngvi.guides import Guide, MeanFieldGaussian
from ngvi.infer import NGVI, NGVIInfo, NGVIRunResult, NGVIState
from ngvi.target import Site, Target, make_target

__all__ = [
    "NGVI",
    "ConfigError",
    "DataError",
    "FitError",
    "Guide",
    "MeanFieldGaussian",
    "ModelError",
    "NGVIError",
    "NGVIInfo",
    "NGVIRunResult",
    "NGVIState",
    "Site",
    "Target",
    "make_target",
]
