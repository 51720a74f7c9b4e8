"""Spherical k-means: K unit-norm centroids that maximise the summed cosine similarity of points to them.

Used to initialise a codebook from projected training sub-vectors
(`ProductQuantizer.init_codebooks_from_embeddings_`), an option beside the random initialisation of the paper
and the reference code. Plain torch, seeded by a `torch.Generator`, so the same points and seed give the same
centroids on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spherical_kmeans(
    points: torch.Tensor, num_clusters: int, iterations: int, generator: torch.Generator
) -> torch.Tensor:
    """(N, D) points -> (K, D) unit centroids: k-means++ seeding, then Lloyd rounds on cosine similarity.

    Points are L2-normalised first. Each round assigns every point to its most similar centroid and moves
    each centroid to the normalised sum of its points; a centroid left without points is moved to the point
    that is currently worst served. Stops early when no assignment changes.

    Args:
        points: (N, D) floating-point vectors, N >= K.
        num_clusters: K.
        iterations: at most this many assignment/update rounds (0 keeps the k-means++ seeds).
        generator: CPU random generator of the seeding.

    Raises:
        ValueError: when N < K or `iterations` < 0.
    """
    if points.ndim != 2 or points.shape[0] < num_clusters:
        raise ValueError(
            f"spherical_kmeans needs (N, D) points with N >= K={num_clusters}, got {tuple(points.shape)}."
        )
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}.")
    points = F.normalize(points.float(), dim=-1)  # (N, D)
    centroids = kmeans_plus_plus(points, num_clusters, generator)  # (K, D)
    assignment = None
    for _ in range(iterations):
        similarities = points @ centroids.T  # (N, K)
        best, new_assignment = similarities.max(dim=1)  # (N,), (N,)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)  # (K, D)
        counts = torch.bincount(assignment, minlength=num_clusters)  # (K,)
        empty = (counts == 0).nonzero().squeeze(1)  # (E,)
        if empty.numel():
            worst_served = best.argsort()[: empty.numel()]  # (E,) the points farthest from every centroid
            sums[empty] = points[worst_served]
        centroids = F.normalize(sums, dim=-1)
    return centroids


def kmeans_plus_plus(points: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """(N, D) unit points -> (K, D) seeds drawn one by one with probability proportional to the cosine
    distance 1 - max cos to the seeds already chosen (Arthur & Vassilvitskii, 2007, on the sphere)."""
    num_points = points.shape[0]
    first = int(torch.randint(num_points, (1,), generator=generator))
    chosen = [first]
    distance = (1.0 - points @ points[first]).clamp(min=0)  # (N,)
    for _ in range(1, num_clusters):
        weights = distance.double()
        if float(weights.sum()) <= 0:  # every point coincides with a seed: fall back to uniform draws
            weights = torch.ones(num_points, dtype=torch.float64)
            weights[chosen] = 0
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, (1.0 - points @ points[index]).clamp(min=0))
    return points[chosen].clone()


__all__ = ["kmeans_plus_plus", "spherical_kmeans"]
