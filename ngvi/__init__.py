"""ngvi: natural-gradient variational inference for NumPyro models.

Layers, lowest first (each imports only from those before it): ``errors`` and ``numerics``;
``families`` (exponential-family math); ``model`` (NumPyro model -> flat target, dense layers);
``guides`` and ``em``; ``engine`` (the NGVI driver); ``nn`` (BNN training) and ``report``
(baselines, comparison, ArviZ, plots); ``cli``. The bundled models (``ngvi.models``, from the
repository's ``models/``) import ngvi, never the reverse.

The diagnostics and plotting names (ArviZ, matplotlib: ~2 s to import) load on first use.

Importing ngvi before JAX starts its CPU backend adds ``--xla_cpu_multi_thread_eigen=false`` to
``XLA_FLAGS`` unless they already set it: XLA:CPU's multi-threaded Eigen kernels (matrix
products, triangular solves) fan out into the thread pool they run on, and full-rank fits froze
there on two cores (every thread waiting, the run never returning). Set the flag yourself
(``=true``) to keep multi-threaded Eigen."""

import os as _os

if "xla_cpu_multi_thread_eigen" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = " ".join(
        [_os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false"]
    ).strip()

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
    LayoutError,
    ModelError,
    NGVIError,
    NGVIWarning,
)
from ngvi.guides import (
    DiagonalFisherGuide,
    ExpFamilyGuide,
    FullRankGaussian,
    Guide,
    GuideParams,
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
    "LayoutError",
    "GuideParams",
    "NGVIWarning",
    "ConvergenceWarning",
]

_LAZY = ("PSISResult", "psis_diagnostic", "psis_khat", "to_inference_data")
_LAZY += ("plot_elbo", "plot_marginals", "plot_pair")


def __getattr__(name: str):
    """ArviZ/matplotlib-backed names, imported on first access by ``ngvi.report`` (PEP 562)."""
    if name in _LAZY:
        from ngvi import report

        value = getattr(report, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ngvi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
