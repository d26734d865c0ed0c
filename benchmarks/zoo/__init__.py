"""A zoo of real NumPyro models with NUTS references and family optima, and the harness that fits
each with every ngvi guide that applies (``python benchmarks/zoo.py``; see docs/zoo.md).

``REGISTRY`` maps a name to its ``ZooModel``; the family modules register themselves on import.
"""

from benchmarks.zoo import bnn, conjugate, hierarchical, regression, timeseries  # noqa: F401
from benchmarks.zoo.registry import FULLRANK_MAX_DIM, REGISTRY, ZooModel, guides_for

__all__ = ["FULLRANK_MAX_DIM", "REGISTRY", "ZooModel", "guides_for", "get", "names"]


def names(quick: bool = False) -> list[str]:
    """Every model's name (registration order), or the ``--quick`` subset."""
    return [n for n, m in REGISTRY.items() if m.quick or not quick]


def get(name: str) -> ZooModel:
    if name not in REGISTRY:
        raise KeyError(f"no zoo model {name!r}; the zoo has {sorted(REGISTRY)}")
    return REGISTRY[name]
