"""EM for a Gaussian mixture on iris, two ways: textbook updates and unit natural steps.

The classical M-step (Bishop 2006, eq. 9.24-9.27) and ``ngvi.em.fit_gmm`` (E-step, then
``natural_step(FullRankGaussian, eta_k, E[T], lr=1, coords="mean")`` per component) give the
same iterates to machine precision. Writes to the output directory (argv[1], default ./out):

* ``gmm_em_loglik.png``: log-likelihood per iteration for both, and their absolute difference;
* ``gmm_em_components.png``: the fitted components (1- and 2-sigma ellipses) on the data.

    python examples/gmm_em.py [out_dir] [num_iters]
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

from ngvi import em  # noqa: E402
from ngvi.models.gaussian_mixture import load_iris_features  # noqa: E402


def classical_em(X: np.ndarray, init: em.GMMParams, num_iters: int) -> tuple[list, np.ndarray]:
    """Textbook EM; returns the parameters and log-likelihood of every iteration."""
    w, mu, cov = (np.asarray(v) for v in init)
    params, lls = [], []
    for _ in range(num_iters + 1):
        logp = np.stack(
            [np.log(w[k]) + gauss_logpdf(X, mu[k], cov[k]) for k in range(len(w))], axis=1
        )
        ll = logsumexp(logp, axis=1)
        params.append((w, mu, cov))
        lls.append(ll.sum())
        r = np.exp(logp - ll[:, None])
        nk = r.sum(0)
        w, mu = nk / len(X), (r.T @ X) / nk[:, None]
        cov = np.stack([(r[:, k] * (X - mu[k]).T) @ (X - mu[k]) / nk[k] for k in range(len(w))])
    return params, np.array(lls)


def gauss_logpdf(X: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    diff = X - mean
    maha = np.sum(diff * np.linalg.solve(cov, diff.T).T, axis=1)
    return -0.5 * (maha + np.linalg.slogdet(cov)[1] + X.shape[1] * np.log(2 * np.pi))


def plot_loglik(ll_classical: np.ndarray, ll_natural: np.ndarray, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    it = np.arange(len(ll_classical))
    ax1.plot(it, ll_classical, "o-", label="classical EM")
    ax1.plot(it, ll_natural, "x--", label="E-step + unit natural step")
    ax1.set(xlabel="iteration", ylabel="log-likelihood", title="GMM on iris (K = 3)")
    ax1.legend()
    diff = np.abs(ll_classical - ll_natural)
    ax2.semilogy(it, np.maximum(diff, 1e-17), "s-")
    ax2.set(xlabel="iteration", ylabel="|difference|", title="classical vs natural step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_ellipses(ax, mean: np.ndarray, cov: np.ndarray, color, label: str | None) -> None:
    vals, vecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
    for n_sd, alpha in ((1, 0.35), (2, 0.15)):
        w, h = 2 * n_sd * np.sqrt(vals[::-1])
        ax.add_patch(
            Ellipse(
                mean,
                w,
                h,
                angle=angle,
                color=color,
                alpha=alpha,
                label=label if n_sd == 1 else None,
            )
        )


def plot_components(X: np.ndarray, classical, natural: em.GMMParams, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    titles = ("classical EM", "E-step + unit natural step")
    for ax, (w, mu, cov), title in zip(axes, (classical, natural), titles):
        ax.scatter(X[:, 0], X[:, 1], s=8, c="k", alpha=0.5)
        for k in range(len(w)):
            add_ellipses(ax, mu[k], cov[k], f"C{k}", f"w = {w[k]:.3f}")
            ax.plot(*mu[k], "+", color=f"C{k}", ms=12, mew=2)
        ax.set(title=title, xlabel="petal length (std.)", ylabel="petal width (std.)")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out_dir: str = "out", num_iters: int = 30) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    X = np.asarray(load_iris_features(), dtype=np.float64)
    init = em.init_gmm(X, 3, jax.random.PRNGKey(1))
    classical, ll_classical = classical_em(X, init, num_iters)
    res = em.fit_gmm(X, 3, num_iters, init=init)
    ll_natural = np.asarray(res.log_likelihood)
    final = jax.tree_util.tree_map(lambda v: np.asarray(v[-1]), res.params)
    gaps = [np.abs(a - b).max() for a, b in zip(classical[-1], final)]
    print(f"final log-likelihood: classical {ll_classical[-1]:.12f}, natural {ll_natural[-1]:.12f}")
    print(f"max |difference| in weights, means, covariances: {max(gaps):.2e}")
    plot_loglik(ll_classical, ll_natural, out / "gmm_em_loglik.png")
    plot_components(X, classical[-1], final, out / "gmm_em_components.png")
    print(f"wrote {out / 'gmm_em_loglik.png'} and {out / 'gmm_em_components.png'}")


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(a) for a in sys.argv[2:3]))
