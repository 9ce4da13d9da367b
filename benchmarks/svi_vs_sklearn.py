"""Benchmark: `fit_svi` against scikit-learn's DP BayesianGaussianMixture on one seeded mixture.

Both fit the same data: ``num_points`` points from ``num_clusters`` Gaussian clusters in
``dim`` dimensions (centres ``randn * 3``, unit noise), truncation 50. The script prints a
markdown table with wall time, the SVI/scikit-learn time ratio, the adjusted Rand index
against the true clusters, the mean log-density of fresh points from the same mixture,
and the components above 1% weight. Run by hand::

    python benchmarks/svi_vs_sklearn.py                      # diag, 100,000 points, dim 64
    python benchmarks/svi_vs_sklearn.py --covariance full --dim 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import BayesianGaussianMixture

from dinodpmm.experiments.compare import posterior_from_sklearn
from dinodpmm.inference import fit_svi

# Weight above which a component counts as used in the table.
WEIGHT_THRESHOLD = 0.01


def mixture_sample(num_points, dim, num_clusters, seed):
    """Return (train, train_labels, heldout) from one seeded mixture; heldout has 20,000 points."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_clusters, dim)) * 3.0

    def draw(count):
        labels = rng.integers(num_clusters, size=count)
        return (centers[labels] + rng.standard_normal((count, dim))).astype(np.float32), labels

    train, labels = draw(num_points)
    heldout, _ = draw(20_000)
    return train, labels, heldout


def summarize(name, posterior, seconds, train, labels, heldout):
    return {
        "method": name,
        "wall_time_s": seconds,
        "ari": adjusted_rand_score(labels, posterior.assign(train).numpy()),
        "heldout_log_likelihood": float(posterior.log_density(heldout).double().mean()),
        "components_above_1%": int((posterior.weights > WEIGHT_THRESHOLD).sum()),
    }


def run(args) -> list[dict]:
    train, labels, heldout = mixture_sample(args.num_points, args.dim, args.num_clusters, args.seed)
    started = time.perf_counter()
    svi = fit_svi(train, truncation=args.truncation, covariance=args.covariance, seed=args.seed, progress=False)
    svi_row = summarize("fit_svi", svi, time.perf_counter() - started, train, labels, heldout)
    svi_row["steps"] = svi.settings["steps_run"]

    model = BayesianGaussianMixture(
        n_components=args.truncation, covariance_type=args.covariance,
        weight_concentration_prior_type="dirichlet_process", random_state=0,
    )
    started = time.perf_counter()
    model.fit(train.astype(np.float64))
    sklearn_row = summarize("sklearn", posterior_from_sklearn(model), time.perf_counter() - started, train, labels, heldout)
    sklearn_row["steps"] = int(model.n_iter_)
    svi_row["time_ratio"] = svi_row["wall_time_s"] / sklearn_row["wall_time_s"]
    sklearn_row["time_ratio"] = 1.0
    return [svi_row, sklearn_row]


def markdown(rows) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def main(args) -> int:
    print(
        f"{args.num_points} points, dim {args.dim}, {args.num_clusters} clusters, truncation "
        f"{args.truncation}, {args.covariance} covariance, seed {args.seed}\n"
    )
    print(markdown(run(args)))
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-points", type=int, default=100_000, help="training points")
    parser.add_argument("--dim", type=int, default=64, help="dimension")
    parser.add_argument("--num-clusters", type=int, default=8, help="true clusters")
    parser.add_argument("--truncation", type=int, default=50, help="components of both fits")
    parser.add_argument("--covariance", choices=("diag", "full"), default="diag", help="covariance family")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of fit_svi")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
