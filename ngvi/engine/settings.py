"""``NGVI``'s settings: the defaults it takes from a guide, and the checks of its
hyperparameters and of ``run``'s arguments (a ``ConfigError`` naming the argument, the value and
what it takes)."""

from __future__ import annotations

import math

import numpy as np

from ngvi.errors import ConfigError
from ngvi.guides.base import Guide

__all__ = ["ENGINE_DEFAULTS", "check_hyper", "check_run", "engine_defaults"]

ENGINE_DEFAULTS = {"lr": 1.0, "num_particles": 8}  # when neither the user nor the guide says


def engine_defaults(guide: Guide, **given) -> tuple:
    """Each of ``given`` (lr, num_particles) as the user set it, else the guide's
    ``engine_defaults``, else ``ENGINE_DEFAULTS``; a guide naming another key is a ConfigError."""
    stated = dict(guide.engine_defaults)
    unknown = sorted(set(stated) - set(ENGINE_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"{type(guide).__name__}.engine_defaults names {unknown}, which NGVI does not take "
            f"from a guide; it takes {sorted(ENGINE_DEFAULTS)}."
        )
    pick = lambda k: given[k] if given[k] is not None else stated.get(k, ENGINE_DEFAULTS[k])
    return tuple(pick(k) for k in given)


def check_hyper(lr, damping, num_particles, average, max_rejections) -> None:
    """``NGVI``'s hyperparameters: ConfigError naming the first that is not what it takes."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(
            f"lr must be a positive finite number (1.0 is the unit natural step), got {lr!r}."
        )
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"damping must be a finite number >= 0, got {damping!r}.")
    if not (isinstance(num_particles, (int, np.integer)) and num_particles >= 1):
        raise ConfigError(f"num_particles must be an integer >= 1, got {num_particles!r}.")
    if not 0 <= average < 1:
        raise ConfigError(
            f"average must be in [0, 1) (decay of the iterate average), got {average!r}."
        )
    if not (isinstance(max_rejections, (int, np.integer)) and max_rejections >= 1):
        raise ConfigError(f"max_rejections must be an integer >= 1, got {max_rejections!r}.")


def check_run(num_steps, tol, checkpoint_every) -> None:
    """``NGVI.run``'s arguments: ConfigError naming the first that is not what it takes."""
    if not (isinstance(num_steps, (int, np.integer)) and num_steps >= 1):
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}.")
    ok_tol = isinstance(tol, (int, float, np.floating)) and math.isfinite(tol) and tol > 0
    if tol is not None and not ok_tol:
        raise ConfigError(
            f"tol must be None (no convergence check) or a positive number of nats (the "
            f"default 0.1 stops within about 0.1 nat of the optimum), got {tol!r}."
        )
    every = checkpoint_every
    if every is not None and not (isinstance(every, (int, np.integer)) and every >= 1):
        raise ConfigError(f"checkpoint_every must be a positive integer, got {every!r}.")
