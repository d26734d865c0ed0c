"""ngvi: natural-gradient variational inference for NumPyro models.

Layers, lowest first (each imports only from those before it): ``errors`` and ``numerics``;
``families`` (exponential-family math); ``model`` (NumPyro model -> flat target, dense layers);
``guides`` and ``em``; ``engine`` (the NGVI driver); ``nn`` (BNN training) and ``report``
(baselines, comparison, ArviZ, plots); ``cli``. The bundled models (``ngvi.models``, from the
repository's ``models/``) import ngvi, never the reverse.

The diagnostics and plotting names (ArviZ, matplotlib: ~2 s to import) load on first use."""

import importlib

from ngvi import em, families, nn
from ngvi.engine import (
    NGVI,
    CheckpointError,
    NGVIInfo,
    NGVIRunResult,
    NGVIState,
    StepContext,
    data_mesh,
    load_checkpoint,
    natural_gradient,
    save_checkpoint,
    shard_data,
)
from ngvi.errors import (
    ConfigError,
    ConvergenceWarning,
    DataError,
    FitError,
    ModelError,
    NGVIError,
    NGVIWarning,
)
from ngvi.guides import (
    DiagonalFisherGuide,
    ExpFamilyGuide,
    FullRankGaussian,
    Guide,
    KFACGuide,
    MeanFieldGaussian,
    kfac,
)
from ngvi.model import Site, Target, make_target
from ngvi.report import advi, compare, compare_vi, nuts

__all__ = [
    "NGVI",
    "NGVIState",
    "NGVIInfo",
    "NGVIRunResult",
    "StepContext",
    "natural_gradient",
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
    "NGVIWarning",
    "ConvergenceWarning",
]

_LAZY = {
    **dict.fromkeys(
        ("PSISResult", "psis_diagnostic", "psis_khat", "to_inference_data"),
        "ngvi.report.diagnostics",
    ),
    **dict.fromkeys(("plot_elbo", "plot_marginals", "plot_pair"), "ngvi.report.plots"),
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
