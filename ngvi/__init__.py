"""ngvi: natural-gradient variational inference for NumPyro models."""

from ngvi import em, families, kfac, nn
from ngvi.baselines import advi, nuts
from ngvi.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ngvi.compare import compare, compare_vi
from ngvi.diagnostics import PSISResult, psis_diagnostic, psis_khat, to_inference_data
from ngvi.errors import ConfigError, DataError, FitError, ModelError, NGVIError
from ngvi.expfam_guide import ExpFamilyGuide
from ngvi.fullrank import FullRankGaussian
from ngvi.guides import Guide, MeanFieldGaussian
from ngvi.infer import NGVI, NGVIInfo, NGVIRunResult, NGVIState, StepContext
from ngvi.kfac import DiagonalFisherGuide, KFACGuide
from ngvi.plots import plot_elbo, plot_marginals, plot_pair
from ngvi.sharding import data_mesh, shard_data
from ngvi.target import Site, Target, make_target

__all__ = [
    "NGVI",
    "NGVIState",
    "NGVIInfo",
    "NGVIRunResult",
    "StepContext",
    "Guide",
    "MeanFieldGaussian",
    "FullRankGaussian",
    "ExpFamilyGuide",
    "KFACGuide",
    "DiagonalFisherGuide",
    "families",
    "em",
    "kfac",
    "nn",
    "Target",
    "Site",
    "make_target",
    "advi",
    "nuts",
    "compare",
    "compare_vi",
    "to_inference_data",
    "psis_khat",
    "psis_diagnostic",
    "PSISResult",
    "plot_elbo",
    "plot_marginals",
    "plot_pair",
    "data_mesh",
    "shard_data",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "NGVIError",
    "ModelError",
    "DataError",
    "ConfigError",
    "FitError",
]
