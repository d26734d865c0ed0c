"""The model zoo: fit every zoo model with every ngvi guide that applies, with NGVI's defaults, in
float32 and float64, and write benchmarks/results/zoo.json and docs/zoo.md.

    python benchmarks/zoo.py [--quick] [--only NAME ...] [--guides G ...] [--dtypes D ...]
                             [--steps N] [--resume]

The models, their NUTS references and family optima live in the package benchmarks/zoo/
(this thin script runs benchmarks.zoo.cli); see docs/zoo.md for the protocol and the last table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.zoo.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
