"""Fitted guide parameters that know which model and guide they belong to.

``GuideParams`` is a plain ``dict`` of arrays keyed by the guide's ``numpyro.param`` names (so
``Predictive(model, guide=guide, params=result.params)`` and ``handlers.substitute`` find them)
that also carries a ``ParamLayout``: the guide family and the model's latent sites (names, shapes,
supports). The layout is static pytree metadata, so it survives ``jax.jit``, ``jax.tree.map`` and
pickling, and a guide can refuse parameters fitted to another model even when every array has the
right shape (two models with the same number of latent coordinates).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from numpyro.handlers import substitute
from numpyro.primitives import _PYRO_STACK

from ngvi.errors import LayoutError

__all__ = ["GuideParams", "ParamLayout", "check_param_shapes", "layout_in_handlers"]


class ParamLayout(NamedTuple):
    """What a guide's parameters mean: the guide family and the latent sites it covers."""

    guide: str  # guide class name, e.g. "MeanFieldGaussian"
    sites: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, constrained shape, support)
    detail: str = ""  # family choices that change the meaning of the arrays (per-site families)

    def describe(self) -> str:
        sites = ", ".join(f"{n} {s} {sup}" for n, s, sup in self.sites)
        extra = f"; {self.detail}" if self.detail else ""
        return f"{self.guide} over sites [{sites}]{extra}"


class GuideParams(dict):
    """A guide's parameters (``dict`` of arrays by ``numpyro.param`` name) with their layout.

    Behaves as the dict it is (``params["loc"]``, ``Predictive(..., params=params)``); a
    registered pytree whose static metadata is the ``ParamLayout``, so transformations keep it.
    A plain dict built from it (``dict(params)``, ``{**params}``) drops the layout: guides then
    check keys and shapes only."""

    def __init__(self, values: Any = (), layout: ParamLayout | None = None):
        super().__init__(values)
        self.layout = layout

    def copy(self) -> GuideParams:
        """A shallow copy that keeps the layout (NumPyro's ELBOs copy their params)."""
        return GuideParams(self, self.layout)

    def __repr__(self) -> str:
        return f"GuideParams({dict.__repr__(self)}, layout={self.layout!r})"


def _flatten(p: GuideParams):
    keys = tuple(sorted(p))
    return [p[k] for k in keys], (keys, p.layout)


def _flatten_with_keys(p: GuideParams):
    keys = tuple(sorted(p))
    return [(jax.tree_util.DictKey(k), p[k]) for k in keys], (keys, p.layout)


def _unflatten(aux, children) -> GuideParams:
    keys, layout = aux
    return GuideParams(zip(keys, children, strict=True), layout)


jax.tree_util.register_pytree_with_keys(GuideParams, _flatten_with_keys, _unflatten, _flatten)


def layout_mismatch(given: ParamLayout, expected: ParamLayout) -> LayoutError:
    """The error for parameters fitted with another layout (both named)."""
    return LayoutError(
        f"these parameters were fitted for {given.describe()}, but the guide they are given to "
        f"is {expected.describe()}. Pass the parameters of a fit of this model with this guide "
        "(result.params of NGVI(model, guide).run on this model), or the guide that produced "
        "them."
    )


def check_param_shapes(params: dict, expected: dict, layout: ParamLayout) -> None:
    """``LayoutError`` unless ``params`` has exactly the keys and shapes of ``expected``
    (``{key: shape}``), naming both."""
    given = {k: tuple(getattr(v, "shape", ())) for k, v in params.items()}
    want = {k: tuple(v) for k, v in expected.items()}
    if given == want:
        return
    missing, extra = sorted(set(want) - set(given)), sorted(set(given) - set(want))
    wrong = sorted(k for k in set(want) & set(given) if want[k] != given[k])
    parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
    parts += [f"{k} has shape {given[k]}, needs {want[k]}" for k in wrong]
    raise LayoutError(
        f"parameters {given} do not fit {layout.describe()}, which needs {want} "
        f"({'; '.join(p for p in parts if p)}). They belong to another model or guide: pass the "
        "parameters of a fit of this model with this guide."
    )


def layout_in_handlers() -> ParamLayout | None:
    """The layout of ``GuideParams`` that an enclosing ``numpyro.handlers.substitute`` supplies
    (``Predictive(..., params=result.params)``, ``Trace_ELBO().loss(key, result.params, ...)``),
    or ``None`` when the parameters are a plain dict. Reads NumPyro's handler stack, never
    changes it."""
    for handler in reversed(_PYRO_STACK):
        data = getattr(handler, "data", None) if isinstance(handler, substitute) else None
        if isinstance(data, GuideParams) and data.layout is not None:
            return data.layout
    return None
