"""Input checks of the ``ngvi.em`` fits, run before anything is compiled: each error names the
argument, the bad value and the fix (``DataError`` for the data, ``ConfigError`` for the rest)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ngvi.errors import ConfigError, DataError

__all__ = [
    "check_data",
    "check_init_shapes",
    "check_int",
    "check_k",
    "check_lr",
    "check_positive",
    "check_restarts",
    "check_tol",
]


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _rows(idx: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return f"[{shown}{', ...' if idx.size > limit else ''}]"


def check_data(X: Any, binary: bool = False) -> np.ndarray:
    """``X`` as a finite ``(N, D)`` float array (``binary``: entries in {0, 1})."""
    try:
        arr = np.asarray(X, dtype=float)
    except (TypeError, ValueError):
        raise DataError(f"X must be a numeric (N, D) array, got {type(X).__name__}.") from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(
            f"X must be a 2-D array of N >= 1 rows and D >= 1 features, got shape {arr.shape}"
            " (for one feature pass X[:, None])."
        )
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise DataError(
            f"X has NaN or inf in {bad.size} of its {arr.shape[0]} rows, rows {_rows(bad)}: drop "
            "or impute them first (e.g. X[np.isfinite(X).all(axis=1)])."
        )
    if binary:
        off = np.flatnonzero(((arr != 0) & (arr != 1)).any(axis=1))
        if off.size:
            i = int(off[0])
            value = float(arr[i][(arr[i] != 0) & (arr[i] != 1)][0])
            raise DataError(
                f"a Bernoulli mixture needs X in {{0, 1}}, but rows {_rows(off)} are not "
                f"(row {i} has {value!r}): binarize it first (e.g. X > 0.5)."
            )
    return arr


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_k(K: Any, n: int) -> None:
    """``1 <= K <= N``: every component needs a row to start from."""
    check_int("K", K)
    if K > n:
        raise ConfigError(
            f"K={K} components but X has only {n} rows: each component starts at a distinct row,"
            f" so use K <= {n} (or more data)."
        )


def check_positive(name: str, value: Any, fix: str = "") -> None:
    if not (_real(value) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}{fix}.")


def check_lr(lr: Any) -> None:
    """``lr > 0`` when it is a concrete number (a traced ``lr`` is the caller's to check)."""
    if _real(lr) and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(
            f"lr must be a positive finite number (lr = 1 is the M-step / CAVI update, lr < 1 a "
            f"damped step), got {lr!r}."
        )


def check_tol(tol: Any) -> None:
    if tol is not None:
        check_positive("tol", tol, " (None runs every iteration)")


def check_restarts(num_restarts: Any, init: Any) -> None:
    check_int("num_restarts", num_restarts)
    if init is not None and num_restarts > 1:
        raise ConfigError(
            f"num_restarts={num_restarts} with an explicit init would repeat one fit: drop init "
            "(each restart draws its own) or set num_restarts=1."
        )


def check_init_shapes(kind: str, fields: dict[str, tuple[Any, tuple]], K: int, D: int) -> None:
    """Every ``{label: (value, expected shape)}`` of an ``init`` matches ``K`` components and
    ``D`` features and is finite."""
    for label, (value, shape) in fields.items():
        value = np.asarray(value)
        if value.shape != shape:
            raise ConfigError(
                f"init {label} has shape {value.shape}, but K={K} components and D={D} features "
                f"need {shape}: pass a {kind} for K={K} (or leave init=None)."
            )
        if not np.isfinite(value).all():
            raise ConfigError(f"init {label} is not finite: {value!r}.")
