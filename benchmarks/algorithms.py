"""Benchmark: the four inference algorithms side by side on one seeded synthetic mixture.

Fits ``svi``, ``gibbs``, ``online-em`` and ``sklearn`` through
:func:`dinodpmm.experiments.compare.compare_algorithms` on the same training points and
prints the adjusted Rand index against the true clusters, the mean log-density of fresh
points from the same mixture, the number of components (posterior mean and 94% interval)
and the wall time. Gibbs runs on the random subsample set by ``--gibbs-subsample``, so its
ARI is over the full training set under its pooled posterior. Run by hand::

    python benchmarks/algorithms.py
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import adjusted_rand_score

from dinodpmm.experiments.compare import ALGORITHMS, compare_algorithms


def mixture_sample(num_points, num_heldout, dim, num_clusters, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_clusters, dim)) * 3.0

    def draw(count):
        labels = rng.integers(num_clusters, size=count)
        return (centers[labels] + rng.standard_normal((count, dim))).astype(np.float32), labels

    return (*draw(num_points), draw(num_heldout)[0])


def run(args):
    train, labels, heldout = mixture_sample(args.num_points, args.num_heldout, args.dim, args.num_clusters, args.seed)
    options = {
        "truncation": args.truncation, "covariance": args.covariance, "seed": args.seed,
        "gibbs": {"subsample": args.gibbs_subsample},
    }
    rows = compare_algorithms(
        train, heldout, args.algorithms, options,
        evaluate=lambda posterior: {"ari": adjusted_rand_score(labels, posterior.assign(train).numpy())},
    )
    for row in rows:
        del row["posterior"]
    return rows


def main(args) -> int:
    print(
        f"{args.num_points} points, dim {args.dim}, {args.num_clusters} clusters, truncation "
        f"{args.truncation}, {args.covariance} covariance, seed {args.seed}\n"
    )
    rows = run(args)
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-points", type=int, default=20_000, help="training points")
    parser.add_argument("--num-heldout", type=int, default=5_000, help="held-out points")
    parser.add_argument("--dim", type=int, default=16, help="dimension")
    parser.add_argument("--num-clusters", type=int, default=8, help="true clusters")
    parser.add_argument("--truncation", type=int, default=50, help="components (SVI, online EM, sklearn)")
    parser.add_argument("--covariance", choices=("diag", "full"), default="diag", help="covariance family")
    parser.add_argument("--gibbs-subsample", type=int, default=2000, help="points the Gibbs chains run on")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every fit")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
