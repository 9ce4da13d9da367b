"""k-means++ initialisation of mixture components on a subsample."""

from __future__ import annotations

import torch


def kmeans_init(
    sample: torch.Tensor, num_components: int, num_iterations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed ``num_components`` centres by k-means++ and refine them with Lloyd iterations.

    Parameters
    ----------
    sample : torch.Tensor of shape (num_points, dim)
        Data subsample.
    num_components : int
        Number of centres. When it exceeds ``num_points``, the extra centres are copies
        of random points with zero count.
    num_iterations : int
        Lloyd iterations after seeding.
    generator : torch.Generator
        Source of randomness (CPU).

    Returns
    -------
    centers : torch.Tensor of shape (num_components, dim)
        Sorted by decreasing cluster size.
    variance : torch.Tensor of shape (dim,)
        Pooled within-cluster variance per dimension.
    counts : torch.Tensor of shape (num_components,)
        Cluster sizes in the subsample, sorted in decreasing order.
    """
    num_points = sample.shape[0]
    seeded = min(num_components, num_points)
    centers = _kmeans_plus_plus(sample, seeded, generator)
    for _ in range(num_iterations):
        labels = _nearest(sample, centers)
        centers = _update_centers(sample, labels, centers)
    labels = _nearest(sample, centers)
    counts = torch.bincount(labels, minlength=seeded).to(sample.dtype)
    residual = sample - centers[labels]
    variance = (residual**2).mean(0).clamp_min(1e-6 * sample.var(0).clamp_min(1e-12))

    if seeded < num_components:
        extra = torch.randint(num_points, (num_components - seeded,), generator=generator)
        centers = torch.cat([centers, sample[extra.to(sample.device)]])
        counts = torch.cat([counts, counts.new_zeros(num_components - seeded)])
    order = torch.argsort(counts, descending=True, stable=True)
    return centers[order], variance, counts[order]


def _kmeans_plus_plus(sample: torch.Tensor, num_centers: int, generator: torch.Generator) -> torch.Tensor:
    num_points = sample.shape[0]
    first = int(torch.randint(num_points, (1,), generator=generator))
    chosen = [first]
    closest = ((sample - sample[first]) ** 2).sum(-1)  # N
    for _ in range(1, num_centers):
        total = closest.sum()
        if total <= 0:  # every point coincides with a centre: pick uniformly
            index = int(torch.randint(num_points, (1,), generator=generator))
        else:
            index = int(torch.multinomial((closest / total).cpu(), 1, generator=generator))
        chosen.append(index)
        closest = torch.minimum(closest, ((sample - sample[index]) ** 2).sum(-1))
    return sample[torch.tensor(chosen, device=sample.device)].clone()


def _nearest(sample: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    # ||x - c||^2 up to the per-row constant ||x||^2, as one matrix product.
    distances = (centers * centers).sum(-1) - 2 * sample @ centers.T  # N K
    return torch.argmin(distances, dim=-1)


def _update_centers(sample: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros_like(centers).index_add_(0, labels, sample)
    counts = torch.bincount(labels, minlength=centers.shape[0]).to(sample.dtype)
    empty = counts == 0
    updated = sums / counts.clamp_min(1).unsqueeze(-1)
    return torch.where(empty.unsqueeze(-1), centers, updated)  # empty clusters keep their centre
