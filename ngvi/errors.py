"""The errors ngvi raises: every message names the site or argument, the bad value and the fix."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConvergenceWarning",
    "DataError",
    "FitError",
    "LayoutError",
    "ModelError",
    "NGVIError",
    "NGVIWarning",
]


class NGVIError(Exception):
    """Base class of every error ngvi raises on purpose."""


class ModelError(NGVIError, ValueError):
    """The model cannot be fitted as written (discrete or improper latent site, no latent site,
    a log density that is not finite anywhere, a guide built for another model)."""


class DataError(NGVIError, ValueError):
    """Observed data that the model cannot score (NaN/inf, outside the likelihood's support,
    shapes that do not broadcast)."""


class ConfigError(NGVIError, ValueError):
    """An invalid hyperparameter or option (lr <= 0, unknown site in per-site options, ...)."""


class LayoutError(ConfigError):
    """Guide parameters that do not belong to the guide they are given to: fitted to another
    model (other latent sites or shapes) or another guide family. The message names both
    layouts."""


class FitError(NGVIError, RuntimeError):
    """A fit that cannot go on (too many rejected steps in a row).

    ``result`` holds the run result with the last good state, so nothing is lost.
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class NGVIWarning(UserWarning):
    """Base class of every warning ngvi gives on purpose: each names what it saw and a fix."""


class ConvergenceWarning(NGVIWarning):
    """A fit that ended without passing its convergence check (``NGVI.run(tol=...)``): the
    result is returned, but it is not known to be within ``tol`` of the optimum."""
