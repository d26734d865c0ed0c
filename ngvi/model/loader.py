"""Load a NumPyro model from a spec: a bundled name, a ``.py`` file, or ``file.py:fn``.

A model file defines ``model(...)`` (or the function named after ``:``) and
``data() -> (args, kwargs)``. Bundled names are the entry points of the group ``ngvi.models``
(the repository's ``models/`` folder, installed as ``ngvi.models``, registers its files there in
``pyproject.toml``; another installed package can register its own), so the library names no
model package itself.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["ModelLoadError", "bundled", "defined_functions", "load", "load_module"]

ENTRY_POINTS = "ngvi.models"


class ModelLoadError(ValueError):
    """A model spec could not be resolved (unknown name, missing file or attribute)."""


def bundled() -> dict[str, str]:
    """``{name: module}`` of the models registered under the ``ngvi.models`` entry points."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINTS)
    return {ep.name: ep.value for ep in sorted(eps, key=lambda ep: ep.name)}


def _split(spec: str) -> tuple[str, str]:
    """Split ``"file.py:fn"`` into ``("file.py", "fn")``; default fn is ``"model"``."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isidentifier() and head:
        return head, tail
    return spec, "model"


def _import_path(path: Path) -> ModuleType:
    for module in bundled().values():  # a bundled file by path: the one module, not a copy
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin and Path(spec.origin).resolve() == path:
            return importlib.import_module(module)
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
    names = bundled()
    if target in names:
        return importlib.import_module(names[target])
    path = Path(target)
    if path.suffix != ".py" and not path.exists():
        raise ModelLoadError(
            f"unknown model {target!r}: not a bundled model ({', '.join(names)}) and not a .py file"
        )
    if not path.is_file():
        raise ModelLoadError(f"model file {target!r} does not exist")
    return _import_path(path.resolve())


def defined_functions(module: ModuleType) -> list[str]:
    """Public functions the module itself defines (not imported ones), ``data`` left out: the
    candidates for the model function."""
    return [
        name
        for name, fn in vars(module).items()
        if inspect.isfunction(fn)
        and fn.__module__ == module.__name__
        and not name.startswith("_")
        and name != "data"
    ]


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
        target, _ = _split(name_or_path)
        defined = defined_functions(module)
        listing = (
            f"it defines {', '.join(defined)}; name one as {target}:NAME"
            if defined
            else "it defines no public function"
        )
        raise ModelLoadError(f"{where}: no model function {fn_name!r}: {listing}")
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
