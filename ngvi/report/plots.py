"""Figures for comparing fits: ELBO traces, marginal densities and a pairwise plot.

Every function returns a ``matplotlib.figure.Figure`` and, given ``path``, also saves it as a PNG
(``dpi`` x figure size in inches gives its pixel size). Figures are built with the object API on
the Agg backend, so nothing opens a window and nothing touches pyplot's global state. Colors are
the Okabe-Ito palette (Okabe & Ito 2008), distinguishable with every common color-vision
deficiency; methods keep the same color across figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ngvi.errors import ConfigError

__all__ = ["OKABE_ITO", "method_color", "plot_elbo", "plot_marginals", "plot_pair"]

#: Okabe-Ito colorblind-safe palette (black last: kept for the reference, e.g. NUTS)
OKABE_ITO = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
)
_REFERENCE = ("nuts", "mcmc", "exact", "reference")
_DEFAULT_DPI = 100


def method_color(method: str, index: int) -> str:
    """Black for a reference method (NUTS, exact), else the ``index``-th Okabe-Ito color."""
    if method.lower() in _REFERENCE:
        return "#000000"
    return OKABE_ITO[index % len(OKABE_ITO)]


def _colors(methods: Sequence[str]) -> dict[str, str]:
    others = [m for m in methods if m.lower() not in _REFERENCE]
    return {m: method_color(m, others.index(m) if m in others else 0) for m in methods}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path, dpi: int) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


def _check_methods(data: Mapping, what: str) -> None:
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{what} must be a non-empty dict keyed by method name, got {data!r}.")


# -- ELBO ------------------------------------------------------------------------------------
def plot_elbo(
    traces: Mapping[str, Mapping], path=None, *, dpi: int = _DEFAULT_DPI, floor: float | None = None
) -> Figure:
    """ELBO against steps (left) and against seconds (right) for every method.

    ``traces``: ``{method: {"steps": (n,), "seconds": (n,), "elbo": (n,)}}`` ("steps" defaults to
    ``arange(n)``, "seconds" may be absent, then the right panel omits that method). The y-axis
    is clipped below at ``floor`` (default: the 5th percentile over methods, so early, very low
    ELBOs don't flatten the curves); non-finite ELBOs are dropped.
    """
    _check_methods(traces, "traces")
    colors = _colors(list(traces))
    fig = _new_figure(10.0, 4.0)
    ax_steps, ax_secs = fig.subplots(1, 2, sharey=True)
    finite = []
    for method, tr in traces.items():
        elbo = np.asarray(tr["elbo"], dtype=float).reshape(-1)
        steps = np.asarray(tr.get("steps", np.arange(elbo.size)), dtype=float)
        ok = np.isfinite(elbo)
        finite.append(elbo[ok])
        style = dict(color=colors[method], lw=1.6, label=method)
        ax_steps.plot(steps[ok], elbo[ok], **style)
        if tr.get("seconds") is not None:
            secs = np.asarray(tr["seconds"], dtype=float)
            ax_secs.plot(secs[ok], elbo[ok], **style)
    values = np.concatenate(finite) if finite else np.zeros(1)
    if values.size:
        lo = np.percentile(values, 5) if floor is None else floor
        hi = values.max()
        ax_steps.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.05 * (hi - lo + 1e-12))
    ax_steps.set(xlabel="step", ylabel="ELBO (nats)", title="ELBO per step")
    ax_secs.set(xlabel="wall-clock seconds (compile excluded)", title="ELBO per second")
    for ax in (ax_steps, ax_secs):
        ax.grid(alpha=0.3)
    ax_steps.legend(frameon=False)
    return _save(fig, path, dpi)


# -- marginals -------------------------------------------------------------------------------
def _flat_coords(samples: Mapping[str, np.ndarray], site: str) -> list[tuple[str, np.ndarray]]:
    """(label, (n,) draws) for each scalar coordinate of ``site``."""
    arr = np.asarray(samples[site], dtype=float)
    arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[1] == 1:
        return [(site, arr[:, 0])]
    idx = np.ndindex(*np.asarray(samples[site]).shape[1:])
    return [(f"{site}[{','.join(map(str, i))}]", arr[:, j]) for j, i in enumerate(idx)]


def _kde(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian kernel density with Silverman's bandwidth 0.9 min(sd, IQR/1.34) n^(-1/5)."""
    x = x[np.isfinite(x)]
    sd = x.std()
    iqr = np.subtract(*np.percentile(x, [75, 25])) / 1.34
    bw = 0.9 * min(sd, iqr if iqr > 0 else sd) * x.size ** (-0.2)
    if not bw > 0:
        return np.zeros_like(grid)
    u = (grid[:, None] - x[None, :]) / bw
    return np.exp(-0.5 * u**2).sum(axis=1) / (x.size * bw * math.sqrt(2 * math.pi))


def _grid(draws: Sequence[np.ndarray], num: int = 200) -> np.ndarray:
    """A grid over the central 99.5% of all methods' draws."""
    lo = min(np.percentile(d, 0.25) for d in draws)
    hi = max(np.percentile(d, 99.75) for d in draws)
    pad = 0.05 * (hi - lo + 1e-12)
    return np.linspace(lo - pad, hi + pad, num)


def plot_marginals(
    samples_by_method: Mapping[str, Mapping[str, np.ndarray]],
    sites: Sequence[str] | None = None,
    path=None,
    *,
    dpi: int = _DEFAULT_DPI,
    max_panels: int = 24,
    ncols: int = 4,
) -> Figure:
    """Marginal density (Gaussian KDE) of every scalar coordinate of ``sites``, one panel each,
    with all methods overlaid (reference methods such as NUTS in black, dashed).

    ``samples_by_method``: ``{method: {site: (n, ...) draws}}``; ``sites`` defaults to the sites
    every method has, in the first method's order. At most ``max_panels`` panels are drawn.
    """
    _check_methods(samples_by_method, "samples_by_method")
    methods = list(samples_by_method)
    common = [
        s for s in samples_by_method[methods[0]] if all(s in d for d in samples_by_method.values())
    ]
    sites = common if sites is None else list(sites)
    missing = [(m, s) for s in sites for m in methods if s not in samples_by_method[m]]
    if missing:
        raise ConfigError(f"no draws for (method, site) {missing}: every method needs every site.")
    panels = []  # (title, [(method, (n,) draws)])
    for s in sites:
        by_method = {m: _flat_coords(samples_by_method[m], s) for m in methods}
        for j, (label, _) in enumerate(by_method[methods[0]]):
            panels.append((label, [(m, by_method[m][j][1]) for m in methods]))
    panels = panels[:max_panels]
    if not panels:
        raise ConfigError("there is nothing to plot: no site is shared by every method.")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(3.0 * ncols, 2.4 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    colors = _colors(methods)
    for ax, (title, lines) in zip(axes, panels):
        grid = _grid([x for _, x in lines])
        for m, x in lines:
            ref = m.lower() in _REFERENCE
            ax.plot(grid, _kde(x, grid), color=colors[m], lw=1.6, ls="--" if ref else "-", label=m)
        ax.set_title(title)
        ax.set_yticks([])
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    axes[0].legend(frameon=False, fontsize="small")
    fig.supylabel("density")
    return _save(fig, path, dpi)


# -- pair ------------------------------------------------------------------------------------
def _coordinate(samples: Mapping[str, np.ndarray], spec: str) -> np.ndarray:
    """Draws (n,) of a scalar coordinate named ``"site"`` or ``"site[i]"`` / ``"site[i,j]"``."""
    name, _, rest = spec.partition("[")
    if name not in samples:
        raise ConfigError(f"no site {name!r} among {sorted(samples)}.")
    arr = np.asarray(samples[name], dtype=float)
    idx = tuple(int(i) for i in rest.rstrip("]").split(",")) if rest else ()
    if arr.ndim - 1 != len(idx):
        raise ConfigError(
            f"{spec!r} does not name a scalar: site {name!r} has shape {arr.shape[1:]}, "
            f"index it as '{name}[{','.join(['i'] * (arr.ndim - 1))}]'."
        )
    return arr[(slice(None),) + idx]


def _ellipse(x: np.ndarray, y: np.ndarray, level: float) -> np.ndarray:
    """(2, 100) boundary of the Gaussian ellipse holding ``level`` of the mass of (x, y)'s mean
    and covariance: mean + sqrt(chi2_2 quantile) L (cos t, sin t), L L^T = cov."""
    cov = np.cov(np.stack([x, y]))
    chol = np.linalg.cholesky(cov + 1e-12 * np.eye(2))
    t = np.linspace(0, 2 * math.pi, 100)
    r = math.sqrt(-2 * math.log(1 - level))  # chi2 with 2 dof quantile, square-rooted
    return np.array([[x.mean()], [y.mean()]]) + r * chol @ np.stack([np.cos(t), np.sin(t)])


def plot_pair(
    samples_by_method: Mapping[str, Mapping[str, np.ndarray]],
    site_x: str,
    site_y: str,
    path=None,
    *,
    dpi: int = _DEFAULT_DPI,
    max_points: int = 1000,
) -> Figure:
    """Joint draws of two scalar coordinates (``"site"`` or ``"site[i]"``) per method: a
    scatter plus the 50% and 90% Gaussian ellipses, with each method's correlation in the
    legend, so a mean-field guide's missing correlation shows against full-rank and NUTS."""
    _check_methods(samples_by_method, "samples_by_method")
    colors = _colors(list(samples_by_method))
    fig = _new_figure(5.5, 5.0)
    ax = fig.subplots()
    for method, samples in samples_by_method.items():
        x, y = _coordinate(samples, site_x), _coordinate(samples, site_y)
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        rho = np.corrcoef(x, y)[0, 1]
        c = colors[method]
        step = max(1, x.size // max_points)
        ax.scatter(x[::step], y[::step], s=6, alpha=0.25, color=c, linewidths=0)
        for level, ls in ((0.5, "-"), (0.9, "--")):
            ex, ey = _ellipse(x, y, level)
            ax.plot(ex, ey, color=c, lw=1.6, ls=ls)
        ax.plot([], [], color=c, lw=1.6, label=f"{method} (corr {rho:+.2f})")
    ax.plot([], [], color="0.4", ls="-", label="50% ellipse")
    ax.plot([], [], color="0.4", ls="--", label="90% ellipse")
    ax.set(xlabel=site_x, ylabel=site_y, title=f"{site_y} vs {site_x}")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    return _save(fig, path, dpi)
