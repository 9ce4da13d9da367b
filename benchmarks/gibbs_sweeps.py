"""Benchmark: collapsed Gibbs sweeps per second, `CollapsedGibbsChain` against a per-cluster reference.

The reference is the textbook implementation of the same sampler (Neal 2000, Algorithm 3):
per point, a Python loop over the clusters that recomputes each posterior predictive
from the cluster's sufficient statistics (count, sum, sum of squares or scatter matrix),
with a fresh Cholesky factorisation per cluster for full covariance. Both use the
project's default conjugate prior built from the data. Run by hand::

    python benchmarks/gibbs_sweeps.py                 # N = 10,000, dim 16, diag and full
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy.special import gammaln

from dinodpmm.inference.conjugate import NormalGamma, NormalInverseWishart
from dinodpmm.inference.gibbs import CollapsedGibbsChain


def make_data(num_points, dim, num_clusters, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_clusters, dim)) * 3.0
    labels = rng.integers(num_clusters, size=num_points)
    return centers[labels] + rng.standard_normal((num_points, dim))


class ReferenceSampler:
    """Per-cluster collapsed Gibbs: one predictive per cluster and point, no cached factorisation."""

    def __init__(self, points, prior, alpha, labels, rng):
        self.points, self.prior, self.alpha, self.rng = points, prior, alpha, rng
        self.full = isinstance(prior, NormalInverseWishart)
        self.clusters = {}
        for label in np.unique(labels):
            members = points[labels == label]
            self.clusters[int(label)] = self._statistics(members)
        self.labels = labels.copy()

    def _statistics(self, members):
        second = members.T @ members if self.full else (members**2).sum(0)
        return [len(members), members.sum(0), second]

    def _update(self, label, x, sign):
        stats = self.clusters[label]
        stats[0] += sign
        stats[1] = stats[1] + sign * x
        stats[2] = stats[2] + sign * (np.outer(x, x) if self.full else x * x)
        if stats[0] == 0:
            del self.clusters[label]

    def log_predictive(self, x, stats):
        count, total, second = stats
        prior = self.prior
        kappa = prior.kappa0 + count
        mean = (prior.kappa0 * prior.mean + total) / kappa
        if self.full:
            return self._student_full(x, count, total, second, kappa, mean)
        shape = prior.shape + count / 2
        rate = prior.rate + 0.5 * (second - kappa * mean**2 + prior.kappa0 * prior.mean**2)
        spread = rate * (kappa + 1) / (shape * kappa)
        dof = 2 * shape
        return float(np.sum(
            gammaln((dof + 1) / 2) - gammaln(dof / 2) - 0.5 * np.log(dof * math.pi * spread)
            - (dof + 1) / 2 * np.log1p((x - mean) ** 2 / (dof * spread))
        ))

    def _student_full(self, x, count, total, second, kappa, mean):
        prior, dim = self.prior, len(x)
        nu = prior.nu0 + count
        scale = prior.scale + second + prior.kappa0 * np.outer(prior.mean, prior.mean) - kappa * np.outer(mean, mean)
        dof = nu - dim + 1
        cholesky = np.linalg.cholesky(scale * (kappa + 1) / (kappa * dof))
        solved = np.linalg.solve(cholesky, x - mean)
        return float(
            gammaln((dof + dim) / 2) - gammaln(dof / 2) - 0.5 * dim * np.log(dof * math.pi)
            - np.log(np.diag(cholesky)).sum() - (dof + dim) / 2 * np.log1p(solved @ solved / dof)
        )

    def sweep(self):
        empty = [0, np.zeros(self.points.shape[1]), np.zeros_like(next(iter(self.clusters.values()))[2])]
        for index in self.rng.permutation(len(self.points)):
            x = self.points[index]
            self._update(int(self.labels[index]), x, -1)
            labels = list(self.clusters)
            log_prob = [math.log(self.clusters[k][0]) + self.log_predictive(x, self.clusters[k]) for k in labels]
            log_prob.append(math.log(self.alpha) + self.log_predictive(x, empty))
            log_prob = np.array(log_prob)
            probability = np.exp(log_prob - log_prob.max())
            choice = self.rng.choice(len(probability), p=probability / probability.sum())
            label = labels[choice] if choice < len(labels) else max(self.clusters, default=-1) + 1
            if label not in self.clusters:
                self.clusters[label] = [0, np.zeros_like(x), np.zeros_like(empty[2])]
            self._update(label, x, +1)
            self.labels[index] = label


def time_sweeps(sweep, num_sweeps):
    started = time.perf_counter()
    for _ in range(num_sweeps):
        sweep()
    return num_sweeps / (time.perf_counter() - started)


def run(args):
    points = make_data(args.num_points, args.dim, args.num_clusters, args.seed)
    rows = []
    for covariance, prior_type in (("diag", NormalGamma), ("full", NormalInverseWishart)):
        prior = prior_type.from_data(points)
        chain = CollapsedGibbsChain(points, prior, 1.0, np.random.default_rng(args.seed))
        chain.initialise()
        reference = ReferenceSampler(points, prior, 1.0, chain.labels, np.random.default_rng(args.seed))
        fast = time_sweeps(chain.sweep, args.num_sweeps)
        slow = time_sweeps(reference.sweep, args.reference_sweeps)
        rows.append({"covariance": covariance, "project_sweeps_per_s": fast, "reference_sweeps_per_s": slow,
                     "speedup": fast / slow, "clusters_after": chain.num_clusters,
                     "reference_clusters_after": len(reference.clusters)})
    return rows


def main(args) -> int:
    print(f"N = {args.num_points}, dim {args.dim}, {args.num_clusters} true clusters, seed {args.seed}\n")
    rows = run(args)
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-points", type=int, default=10_000, help="points")
    parser.add_argument("--dim", type=int, default=16, help="dimension")
    parser.add_argument("--num-clusters", type=int, default=8, help="true clusters")
    parser.add_argument("--num-sweeps", type=int, default=3, help="timed sweeps of the project sampler")
    parser.add_argument("--reference-sweeps", type=int, default=1, help="timed sweeps of the reference")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the chains")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
