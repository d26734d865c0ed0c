"""ngvi: natural-gradient variational inference for NumPyro models.

The diagnostics and plotting names (ArviZ, matplotlib: ~2 s to import) load on first use."""

import importlib

from ngvi import em, families, kfac, nn
from ngvi.baselines import advi, nuts
from ngvi.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ngvi.compare import compare, compare_vi
from ngvi.errors import ConfigError, DataError, FitError, ModelError, NGVIError
from ngvi.expfam_guide import ExpFamilyGuide
from ngvi.fullrank import FullRankGaussian
from ngvi.guides import Guide, MeanFieldGaussian
from ngvi.infer import NGVI, NGVIInfo, NGVIRunResult, NGVIState, StepContext
from ngvi.kfac import DiagonalFisherGuide, KFACGuide
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

_LAZY = {
    **dict.fromkeys(
        ("PSISResult", "psis_diagnostic", "psis_khat", "to_inference_data"), "ngvi.diagnostics"
    ),
    **dict.fromkeys(("plot_elbo", "plot_marginals", "plot_pair"), "ngvi.plots"),
}


def __getattr__(name: str):
    """Import ArviZ/matplotlib-backed names on first access (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ngvi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
