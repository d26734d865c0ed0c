"""Bayesian neural network on scikit-learn's digits with K-FAC natural-gradient VI.

    python examples/bnn_digits.py [--epochs 10] [--structure diagonal] [--fisher empirical]

Trains ``models/bnn_classifier.py`` (64-32-10) over shuffled minibatches with a tqdm bar showing
the loss and test accuracy, then reports Monte Carlo test accuracy, NLL and calibration error.
"""

from __future__ import annotations

import argparse

import jax

from ngvi import KFACGuide, models
from ngvi.nn import bnn_engine, fit_bnn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--structure", default="kfac", choices=("kfac", "diagonal"))
    ap.add_argument("--fisher", default="true", choices=("true", "empirical"))
    a = ap.parse_args()
    mod = models.load_module("models/bnn_classifier.py")
    (X,), kw = mod.data()
    (Xt,), kt = mod.test_data()
    guide = KFACGuide(mod.model, structure=a.structure, fisher=a.fisher)
    engine = bnn_engine(guide)  # NGVI with lr=0.1 and one weight sample per step
    result = fit_bnn(
        engine, X, kw["y"], epochs=a.epochs, batch_size=a.batch_size, eval_data=(Xt, kt["y"])
    )
    m = result.history[-1]
    print(f"test accuracy {m.accuracy:.3f}  NLL {m.nll:.3f}  ECE {m.ece:.3f}")
    draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params, sample_shape=(100,))
    print("posterior sd of the output weights:", float(draws["out_w"].std(0).mean()))


if __name__ == "__main__":
    main()
