"""What a fit is judged by: the baselines (NumPyro ADVI, NUTS), the common-random-numbers ELBO
scorer, the side-by-side comparison, ArviZ InferenceData with PSIS k-hat, and plots. May import
every layer below it; the ArviZ- and matplotlib-backed modules (``diagnostics``, ``plots``) load
on first use."""

import importlib

from ngvi.report.baselines import advi, advi_flat, nuts
from ngvi.report.comparison import compare, compare_vi, format_table, verdicts
from ngvi.report.scoring import crn_noise, make_elbo_scorer, meanfield_optimum

__all__ = [
    "PSISResult",
    "advi",
    "advi_flat",
    "compare",
    "compare_vi",
    "crn_noise",
    "format_table",
    "make_elbo_scorer",
    "meanfield_optimum",
    "nuts",
    "plot_elbo",
    "plot_marginals",
    "plot_pair",
    "psis_diagnostic",
    "psis_khat",
    "to_inference_data",
    "verdicts",
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
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
