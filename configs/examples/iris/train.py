"""Train the iris classifier served by this example and write it as ``model.json``.

Usage (needs scikit-learn; the serving side does not)::

    python train.py                 # rewrites model.json next to this file
    python train.py -o /tmp/m.json  # writes elsewhere

The model is a multinomial logistic regression fitted on all 150 rows of scikit-learn's
bundled iris data (no download). It is exported as plain JSON (coefficients, intercepts,
class names, feature names in order, training accuracy) so that ``predictor.py`` needs only
numpy. The run is deterministic (fixed ``random_state``, a tight tolerance so the optimum is
reached, floats rounded), so rerunning this script reproduces ``model.json`` byte for byte.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

FORMAT = "iris-logreg-v1"  # checked by predictor.py against cortex.yaml's metadata
DECIMALS = 6
# The JSON keys of a request, in the column order of load_iris().data
# ("sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)").
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
PARAMS = {"C": 1.0, "solver": "lbfgs", "tol": 1e-10, "max_iter": 10000, "random_state": 0}


def train() -> tuple[LogisticRegression, dict]:
    """Fit the model; return it and its JSON-ready export."""
    iris = load_iris()
    x, y = iris.data, iris.target
    model = LogisticRegression(**PARAMS).fit(x, y)

    def r(value: float) -> float:
        return round(float(value), DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0

    export = {
        "format": FORMAT,
        "model": "LogisticRegression (multinomial, lbfgs)",
        "params": PARAMS,
        "features": FEATURES,
        "classes": [str(name) for name in iris.target_names],
        "coef": [[r(v) for v in row] for row in model.coef_],
        "intercept": [r(v) for v in model.intercept_],
        "training_samples": len(y),
        "training_accuracy": r(model.score(x, y)),
    }
    return model, export


def write(export: dict, path: Path) -> None:
    path.write_text(json.dumps(export, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-o", "--output", type=Path, default=Path(__file__).resolve().parent / "model.json"
    )
    args = parser.parse_args(argv)
    _, export = train()
    write(export, args.output)
    print(f"training accuracy: {export['training_accuracy']:.4f}; wrote {args.output}")


if __name__ == "__main__":
    main()
