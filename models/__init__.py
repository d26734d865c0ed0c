"""Bundled NumPyro models and a loader for model files, installed as ``ngvi.models``.

The source lives in the repository's ``models/`` folder; ``pyproject.toml`` maps it to the
package ``ngvi.models`` (never a top-level ``models``, which would shadow a user's own module)
and registers every model under the ``ngvi.models`` entry points, through which ``ngvi`` finds
them (``ngvi`` itself never imports this package). Models import each other relatively.

Every model file ``models/<name>.py`` defines

* ``model(...)`` -- a NumPyro model function, and
* ``data() -> (args, kwargs)`` -- the arguments to call it with (observations as keywords).

Conjugate / closed-form targets also define ``exact_posterior(*args, **kwargs)`` and
``posterior_moments(*args, **kwargs)``.  ``references.json`` (written by
``python -m ngvi.models.make_references``) holds NUTS posterior moments.

``load(spec)`` accepts a bundled name (``"eight_schools"``), a file path
(``"models/eight_schools.py"``) or ``"path/to/file.py:model_fn_name"`` and returns
``(model_fn, args, kwargs)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ngvi.model.loader import ModelLoadError, bundled, load, load_module

__all__ = ["BUNDLED", "ModelLoadError", "load", "load_module", "load_references"]

#: bundled name -> module, as registered under the ``ngvi.models`` entry points
BUNDLED: dict[str, str] = bundled()

#: bundled models with a closed-form ``exact_posterior``
CONJUGATE = ("beta_bernoulli", "normal_normal", "gamma_poisson", "dirichlet_categorical")

_HERE = Path(__file__).resolve().parent
REFERENCES_PATH = _HERE / "references.json"


def load_references(path: str | Path | None = None) -> dict:
    """The NUTS reference moments written by ``python -m ngvi.models.make_references``."""
    with open(REFERENCES_PATH if path is None else path) as f:
        return json.load(f)
