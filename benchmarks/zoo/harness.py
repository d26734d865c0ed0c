"""Fit one zoo model with one guide, with ``NGVI``'s defaults and nothing else, and judge it.

``run_cell(entry, guide, num_steps)`` is the whole recipe (the table and the tests use it):

    guide = Guide(model)                                   # the guide's defaults
    result = ngvi.NGVI(model, guide).run(key, num_steps, *args, progress_bar=False, **kwargs)

in the process's dtype, recording the wall-clock seconds (set-up and compilation included), the
steps run, ``converged``, the rejected steps, every warning the fit emitted and a ``FitError``
(its ``result`` is judged); then ``assess`` scores the averaged parameters in float64.

The rule of issue 17, one verdict per cell (``TOL_NAT`` = 0.1 nat):

* ``ok``: the fit is within 0.1 nat of its family optimum (``gap <= 0.1``);
* ``miss (warned)``: it is not, did not report ``converged=True``, and said so (a warning or a
  ``FitError``);
* ``SILENT MISS``: it is not, and it reported ``converged=True`` or said nothing;
* ``unscored``: no family optimum to compare with.

A gap from 0.1 to 1 nat against an L-BFGS optimum is rechecked on draws the optimum was not fit
to (``heldout``); the held-out gap then decides.
"""

from __future__ import annotations

import time
import warnings

import jax
import numpy as np

import ngvi
from benchmarks.zoo.assess import GUIDES, assess, judge, reuse
from benchmarks.zoo.registry import ZooModel
from ngvi.errors import FitError, NGVIError

__all__ = ["TOL_NAT", "fit_cell", "judge_cell", "run_cell", "verdict"]

TOL_NAT = 0.1
DEFAULT_STEPS = 5000  # a budget: a fit stops where its check passes
_IGNORED = (DeprecationWarning, FutureWarning, PendingDeprecationWarning)


def fit_cell(entry: ZooModel, guide_name: str, num_steps: int, seed: int = 0) -> dict:
    """Fit with defaults in the active dtype; returns the record and the averaged params."""
    args, kwargs = entry.data()
    rec = {"model": entry.name, "guide": guide_name, "dtype": str(jax.numpy.result_type(float))}
    rec.update(steps=None, converged=None, rejected=None, error=None, params=None, guide_obj=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            guide = rec["guide_obj"] = GUIDES[guide_name](entry.model)
            result = ngvi.NGVI(entry.model, guide).run(
                jax.random.PRNGKey(seed), num_steps, *args, progress_bar=False, **kwargs
            )
        except FitError as e:
            rec["error"] = f"FitError: {e}"
            result = e.result
        except (NGVIError, FloatingPointError, ValueError, RuntimeError) as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            result = None
        jax.block_until_ready(result)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["warnings"] = sorted(
        {
            f"{w.category.__name__}: {w.message}"[:300]
            for w in caught
            if not issubclass(w.category, _IGNORED)
        }
    )
    if result is not None:
        rec.update(steps=int(result.num_steps), converged=bool(result.converged))
        rec.update(rejected=int(result.num_rejected), params=result.params)
    return rec


def verdict(gap: float | None, converged: bool | None, warned: bool) -> str:
    """The issue's rule (module docstring); ``warned``: a warning or an error was raised."""
    if gap is None:
        return "unscored"
    if gap <= TOL_NAT:
        return "ok"
    if converged or not warned:
        return "SILENT MISS"
    return "miss (warned)"


def run_cell(
    entry: ZooModel,
    guide_name: str,
    num_steps: int = DEFAULT_STEPS,
    refs: dict | None = None,
    optima: dict | None = None,
    seed: int = 0,
    diagnostics: bool = True,
) -> dict:
    """Fit (``fit_cell``), score (``assess``) and judge (``judge_cell``) one model x guide cell.
    Without ``refs``/``optima`` the cell is scored but not judged (``judge_cell`` later); without
    ``diagnostics`` only the ELBO is scored (no posterior mean, no k-hat: the tests' fast path)."""
    rec = fit_cell(entry, guide_name, num_steps, seed)
    params, guide = rec.pop("params"), rec.pop("guide_obj")
    if guide is not None and rec["dtype"] == "float64" and guide._target is not None:
        reuse(entry, guide_name, guide)  # a float64 fit's guide serves its assessment
    if params is not None:
        rec.update(assess(entry, guide_name, params, diagnostics))
    rec = {k: _plain(v) for k, v in rec.items()}
    return judge_cell(rec, refs, optima) if refs is not None or optima is not None else rec


def judge_cell(cell: dict, refs: dict | None, optima: dict | None) -> dict:
    """The cell with its gap, mean error (``assess.judge``) and verdict (``verdict``)."""
    name = cell["model"]
    optimum = (optima or {}).get(name)
    out = {**cell, **judge(cell, (refs or {}).get(name), optimum)}
    reference = (optimum or {}).get(cell["guide"])
    if cell.get("heldout_gap") is not None and reference and "beaten_by" not in reference:
        out["fixed_gap"], out["gap"] = out["gap"], cell["heldout_gap"]  # ``heldout``
    warned = bool(cell.get("warnings") or cell.get("error"))
    out["verdict"] = verdict(out["gap"], cell.get("converged"), warned)
    return {k: _plain(v) for k, v in out.items()}


def _plain(v):
    """Python scalars for JSON (numpy floats and bools)."""
    if isinstance(v, np.floating):
        return float(v)
    return bool(v) if isinstance(v, np.bool_) else v
