"""Exponential families in natural / mean coordinates for natural-gradient VI.

See ``ngvi.families.base`` for the conventions (parameter pytrees, Fisher
layout, Bregman KL, natural gradient = gradient in mean parameters).
"""

from .base import ExpFamily, Params, cg_solve, solve_sym_2x2
from .discrete import Bernoulli, Categorical, Poisson
from .gaussian import DiagGaussian, FullRankGaussian
from .normal_gamma import NormalGamma, NormalGammaDistribution
from .oracles import (
    fisher_autodiff,
    fisher_monte_carlo,
    kl_from_samples,
    kl_monte_carlo,
    stats_covariance,
)
from .positive import Beta, Dirichlet, Exponential, Gamma
from .special import (
    beta_icdf,
    dirichlet_from_mean_log,
    gamma_icdf,
    gamma_shape_from_log_ratio,
    inv_digamma,
    trigamma,
)

__all__ = [
    "ExpFamily",
    "Params",
    "DiagGaussian",
    "FullRankGaussian",
    "Bernoulli",
    "Categorical",
    "Poisson",
    "Gamma",
    "Exponential",
    "Beta",
    "Dirichlet",
    "NormalGamma",
    "NormalGammaDistribution",
    "fisher_autodiff",
    "fisher_monte_carlo",
    "kl_monte_carlo",
    "kl_from_samples",
    "stats_covariance",
    "inv_digamma",
    "gamma_shape_from_log_ratio",
    "gamma_icdf",
    "beta_icdf",
    "dirichlet_from_mean_log",
    "trigamma",
    "cg_solve",
    "solve_sym_2x2",
]
