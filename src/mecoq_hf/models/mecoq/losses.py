"""Losses of MeCoQ (docs/method.md §4): debiased contrastive loss with code-memory negatives, the codeword
diversity penalty and the soft-assignment entropy term.

Both forms of the contrastive loss are here:
- `per_anchor`: the debiased contrastive loss of Chuang et al. (2020) as the paper writes it, one term per
  anchor view;
- `broadcast`: what the reference code computes (docs/method.md §4.2): the (2B, 1) positive term and the (2B,)
  negative sum broadcast to a (2B, 2B) matrix whose mean is the loss. Kept for parity with its numbers.

Every loss computes in float32, or in the inputs' dtype when it is wider (float64 for gradient checks), with
autocast disabled: under `torch.autocast` a bf16 similarity matrix moves the loss and its gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossBreakdown(NamedTuple):
    """Total loss and its terms, each a scalar tensor (the weighted sum is `total`)."""

    total: torch.Tensor
    contrastive: torch.Tensor
    entropy: torch.Tensor
    codeword_diversity: torch.Tensor


def debiased_contrastive_loss(
    view_1: torch.Tensor,
    view_2: torch.Tensor,
    memory: torch.Tensor | None = None,
    *,
    temperature: float,
    pos_prior: float = 0.0,
    debias: bool = True,
    reduction: str = "per_anchor",
    count_memory: bool = True,
    floor: str = "dcl",
    normalize_memory: bool = True,
) -> torch.Tensor:
    """Two-view contrastive loss over soft reconstructions, with optional memory negatives.

    Args:
        view_1: (B, d) soft reconstructions of the first augmented view.
        view_2: (B, d) soft reconstructions of the second view of the same images.
        memory: (N_M, d) reconstructions of the code memory, used as extra negatives for every anchor.
        temperature: tau.
        pos_prior: rho+, the probability that a negative shares the anchor's class (0 disables debiasing).
        debias: debiased estimator (docs/method.md §4.1) when True, plain InfoNCE sums when False.
        reduction: "per_anchor" (one term per anchor) or "broadcast" (the reference code's (2B, 2B) mean).
        count_memory: include the N_M memory negatives in the debiasing count N (reference: N = 2B - 2).
        floor: lower bound of the debiased negative term: "dcl" N * exp(-1/tau) or "official" exp(-N/tau).
        normalize_memory: L2-normalise memory vectors (the reference code leaves them raw).

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).
    """
    if view_1.shape != view_2.shape or view_1.ndim != 2:
        raise ValueError(
            f"Both views must have the same shape (B, d), got {tuple(view_1.shape)} and "
            f"{tuple(view_2.shape)}."
        )
    if reduction not in ("per_anchor", "broadcast"):
        raise ValueError(f"reduction must be 'per_anchor' or 'broadcast', got {reduction!r}.")
    if floor not in ("dcl", "official"):
        raise ValueError(f"floor must be 'dcl' or 'official', got {floor!r}.")
    batch = view_1.shape[0]
    if batch < 2:
        raise ValueError(
            f"The contrastive loss needs at least 2 images per batch for negatives, got {batch}."
        )

    with torch.autocast(device_type=view_1.device.type, enabled=False):
        return _contrastive_loss(
            view_1, view_2, memory, temperature, pos_prior, debias, reduction, count_memory, floor,
            normalize_memory,
        )  # fmt: skip


def _contrastive_loss(
    view_1: torch.Tensor,
    view_2: torch.Tensor,
    memory: torch.Tensor | None,
    temperature: float,
    pos_prior: float,
    debias: bool,
    reduction: str,
    count_memory: bool,
    floor: str,
    normalize_memory: bool,
) -> torch.Tensor:
    batch = view_1.shape[0]
    dtype = _loss_dtype(view_1)
    anchors = F.normalize(torch.cat([view_1, view_2]).to(dtype), dim=-1)  # (2B, d), global L2 normalisation
    similarities = anchors @ anchors.T  # (2B, 2B)
    positive_index = torch.arange(2 * batch, device=anchors.device).roll(batch)  # i <-> i + B
    positives = similarities.gather(1, positive_index[:, None]).squeeze(1)  # (2B,)
    negative_mask = torch.ones_like(similarities, dtype=torch.bool)
    negative_mask.fill_diagonal_(False)
    negative_mask[torch.arange(2 * batch), positive_index] = False
    num_negatives = 2 * batch - 2

    positive_exp = torch.exp(positives / temperature)  # (2B,)
    negative_sum = (torch.exp(similarities / temperature) * negative_mask).sum(dim=1)  # (2B,)
    if memory is not None and memory.shape[0] > 0:
        memory = memory.to(dtype)
        if normalize_memory:
            memory = F.normalize(memory, dim=-1)
        negative_sum = negative_sum + torch.exp(anchors @ memory.T / temperature).sum(dim=1)  # (2B,)
        if count_memory:
            num_negatives += memory.shape[0]

    if reduction == "broadcast":
        positive_exp, negative_sum = positive_exp[:, None], negative_sum[None, :]  # (2B, 1), (1, 2B)
    if debias:
        negative_term = (negative_sum - pos_prior * num_negatives * positive_exp) / (1.0 - pos_prior)
        lower_bound = (
            num_negatives * math.exp(-1.0 / temperature)
            if floor == "dcl"
            else math.exp(-num_negatives / temperature)
        )
        negative_term = negative_term.clamp(min=lower_bound)
    else:
        negative_term = negative_sum
    # -log(P / (P + G)), computed as log(1 + G / P) for stability.
    return torch.log1p(negative_term / positive_exp).mean()


def codeword_diversity(codebooks: torch.Tensor) -> torch.Tensor:
    """Mean inner product of codewords within each codebook, Omega_C = 1/(M K^2) sum_m sum_ij <c_i, c_j>.

    Args:
        codebooks: (M, K, D), normally the L2-normalised codebooks (differentiable when they train).

    Uses sum_ij <c_i, c_j> = ||sum_i c_i||^2, so no (K, K) matrix is formed. The value is 1 when all codewords
    of a codebook coincide and near 0 for spread-out codewords.
    """
    num_codebooks, codebook_size, _ = codebooks.shape
    with torch.autocast(device_type=codebooks.device.type, enabled=False):
        codeword_sums = codebooks.to(_loss_dtype(codebooks)).sum(dim=1)  # (M, D)
        return codeword_sums.pow(2).sum() / (num_codebooks * codebook_size**2)


def assignment_entropy(assignments: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean entropy (nats) of the soft assignments, averaged over images and sub-spaces (docs/method.md §4.3).

    Args:
        assignments: (B, M, K) probabilities summing to one over K.
    """
    with torch.autocast(device_type=assignments.device.type, enabled=False):
        probabilities = assignments.to(_loss_dtype(assignments))
        return -(probabilities * torch.log(probabilities + eps)).sum(dim=-1).mean()


def _loss_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32, or the tensor's dtype when it is wider (float64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


__all__ = ["LossBreakdown", "assignment_entropy", "codeword_diversity", "debiased_contrastive_loss"]
