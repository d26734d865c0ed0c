"""Variational families with closed-form Fisher inverses: the ``Guide`` interface and the
mean-field, full-rank, exponential-family and K-FAC guides (with the K-FAC curvature blocks).
May import ``ngvi.errors``, ``ngvi.numerics``, ``ngvi.families`` and ``ngvi.model``."""

from ngvi.guides.base import Guide
from ngvi.guides.expfam import ExpFamilyGuide
from ngvi.guides.fullrank import FullRankGaussian
from ngvi.guides.kfac import DiagonalFisherGuide, KFACGuide
from ngvi.guides.meanfield import MeanFieldGaussian
from ngvi.guides.params import GuideParams, ParamLayout

__all__ = [
    "DiagonalFisherGuide",
    "ExpFamilyGuide",
    "FullRankGaussian",
    "Guide",
    "GuideParams",
    "KFACGuide",
    "MeanFieldGaussian",
    "ParamLayout",
]
