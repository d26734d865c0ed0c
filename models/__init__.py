"""Bundled NumPyro models and a loader for model files.

Every model file ``models/<name>.py`` defines

* ``model(...)`` -- a NumPyro model function, and
* ``data() -> (args, kwargs)`` -- the arguments to call it with (observations as keywords).

Conjugate / closed-form targets also define ``exact_posterior(*args, **kwargs)`` and
``posterior_moments(*args, **kwargs)``.  ``references.json`` (written by
``python -m models.make_references``) holds NUTS posterior moments.

``load(spec)`` accepts a bundled name (``"eight_schools"``), a file path
(``"models/eight_schools.py"``) or ``"path/to/file.py:model_fn_name"`` and returns
``(model_fn, args, kwargs)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["BUNDLED", "ModelLoadError", "load", "load_module", "load_references"]

BUNDLED: dict[str, str] = {
    name: f"models.{name}"
    for name in (
        "eight_schools",
        "logistic_regression",
        "hierarchical_linear",
        "beta_bernoulli",
        "normal_normal",
        "normal_gamma",
        "gamma_poisson",
        "dirichlet_categorical",
        "gaussian_mixture",
        "funnel",
        "correlated_gaussian",
        "bernoulli_mixture",
        "bayes_gmm",
        "bnn_classifier",
        "bnn_regressor",
    )
}

#: bundled models with a closed-form ``exact_posterior``
CONJUGATE = ("beta_bernoulli", "normal_normal", "gamma_poisson", "dirichlet_categorical")

_HERE = Path(__file__).resolve().parent
REFERENCES_PATH = _HERE / "references.json"


class ModelLoadError(ValueError):
    """A model spec could not be resolved (unknown name, missing file or attribute)."""


def _split(spec: str) -> tuple[str, str]:
    """Split ``"file.py:fn"`` into ``("file.py", "fn")``; default fn is ``"model"``."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isidentifier() and head:
        return head, tail
    return spec, "model"


def _import_path(path: Path) -> ModuleType:
    if path.parent == _HERE and path.stem in BUNDLED:
        return importlib.import_module(BUNDLED[path.stem])
    name = f"_ngvi_user_model_{path.stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import model file {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_module(name_or_path: str) -> ModuleType:
    """Import the module behind a spec (the ``:fn`` suffix, if any, is ignored)."""
    target, _ = _split(name_or_path)
    if target in BUNDLED:
        return importlib.import_module(BUNDLED[target])
    path = Path(target)
    if path.suffix != ".py" and not path.exists():
        raise ModelLoadError(
            f"unknown model {target!r}: not a bundled model ({', '.join(BUNDLED)}) "
            "and not a .py file"
        )
    if not path.is_file():
        raise ModelLoadError(f"model file {target!r} does not exist")
    return _import_path(path.resolve())


def load(name_or_path: str):
    """Resolve a model spec to ``(model_fn, args, kwargs)``.

    ``name_or_path`` is a bundled name (``"eight_schools"``), a path to a ``.py`` file
    (``"models/eight_schools.py"``), or either of those followed by ``":fn_name"`` to
    pick a model function other than ``model``.  ``args, kwargs = module.data()``.
    Raises :class:`ModelLoadError` naming the file and the missing attribute when the
    model function or ``data`` is absent.
    """
    _, fn_name = _split(name_or_path)
    module = load_module(name_or_path)
    where = getattr(module, "__file__", None) or module.__name__
    model_fn = getattr(module, fn_name, None)
    if model_fn is None or not callable(model_fn):
        raise ModelLoadError(f"{where}: no model function {fn_name!r} (missing attribute)")
    data_fn = getattr(module, "data", None)
    if data_fn is None or not callable(data_fn):
        raise ModelLoadError(
            f"{where}: no 'data' function (missing attribute); it must return (args, kwargs)"
        )
    out = data_fn()
    try:
        args, kwargs = out
        args, kwargs = tuple(args), dict(kwargs)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{where}: data() must return (args, kwargs), got {out!r}") from None
    return model_fn, args, kwargs


def load_references(path: str | Path | None = None) -> dict:
    """The NUTS reference moments written by ``python -m models.make_references``."""
    with open(REFERENCES_PATH if path is None else path) as f:
        return json.load(f)
