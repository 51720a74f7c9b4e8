"""Losses against independent straightforward computations (plain loops over anchors, docs/method.md §4)."""

from __future__ import annotations

import math

import pytest
import torch

from mecoq_hf.models.mecoq.losses import assignment_entropy, codeword_diversity, debiased_contrastive_loss


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def reference_loss(
    view_1,
    view_2,
    memory,
    *,
    temperature,
    pos_prior,
    debias,
    reduction,
    count_memory,
    floor,
    normalize_memory,
) -> float:
    """Loop version written from docs/method.md §4.1-§4.2, in float64, without vectorisation."""
    anchors = [v.double() for v in torch.cat([view_1, view_2])]
    batch = view_1.shape[0]
    mem = [] if memory is None else [m.double() for m in memory]
    positives, negative_sums = [], []
    for i, anchor in enumerate(anchors):
        partner = (i + batch) % (2 * batch)
        positives.append(math.exp(_cos(anchor, anchors[partner]) / temperature))
        total = 0.0
        for j, other in enumerate(anchors):
            if j not in (i, partner):
                total += math.exp(_cos(anchor, other) / temperature)
        for vector in mem:
            unit_anchor = anchor / anchor.norm()
            target = vector / vector.norm() if normalize_memory else vector
            total += math.exp(float(unit_anchor @ target) / temperature)
        negative_sums.append(total)
    n = 2 * batch - 2 + (len(mem) if count_memory else 0)
    lower = n * math.exp(-1 / temperature) if floor == "dcl" else math.exp(-n / temperature)

    def term(p: float, s: float) -> float:
        g = max((s - pos_prior * n * p) / (1 - pos_prior), lower) if debias else s
        return -math.log(p / (p + g))

    if reduction == "per_anchor":
        values = [term(p, s) for p, s in zip(positives, negative_sums)]
    else:
        values = [term(p, s) for p in positives for s in negative_sums]
    return sum(values) / len(values)


@pytest.mark.parametrize("reduction", ["per_anchor", "broadcast"])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("with_memory", [False, True])
@pytest.mark.parametrize("floor", ["dcl", "official"])
def test_contrastive_loss_matches_loop_reference(reduction, debias, with_memory, floor):
    torch.manual_seed(0)
    view_1, view_2 = torch.randn(5, 8), torch.randn(5, 8)
    memory = torch.randn(7, 8) * 1.5 if with_memory else None
    for count_memory, normalize_memory in [(False, False), (True, True)]:
        settings = dict(
            temperature=0.4,
            pos_prior=0.1,
            debias=debias,
            reduction=reduction,
            count_memory=count_memory,
            floor=floor,
            normalize_memory=normalize_memory,
        )
        ours = debiased_contrastive_loss(view_1, view_2, memory, **settings)
        expected = reference_loss(view_1, view_2, memory, **settings)
        assert ours.item() == pytest.approx(expected, rel=1e-5)


def test_debias_clamp_is_active_and_matches_reference():
    """Large prior, near-identical views: (S - rho N P)/(1 - rho) goes negative and the floor decides."""
    torch.manual_seed(1)
    base = torch.randn(4, 6)
    view_1, view_2 = base, base + 1e-3 * torch.randn(4, 6)
    settings = dict(
        temperature=0.1,
        pos_prior=0.9,
        debias=True,
        reduction="per_anchor",
        count_memory=False,
        floor="dcl",
        normalize_memory=True,
    )
    ours = debiased_contrastive_loss(view_1, view_2, None, **settings)
    expected = reference_loss(view_1, view_2, None, **settings)
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    # Every anchor is clamped: the loss equals log(1 + floor / P) with P = exp(~1 / tau).
    n = 6
    floor_only = math.log1p(n * math.exp(-1 / 0.1) / math.exp(1 / 0.1))
    assert ours.item() == pytest.approx(floor_only, rel=1e-3)
    # The "official" floor exp(-N/tau) is e^-60 here: far below the DCL floor N e^(-1/tau).
    official = debiased_contrastive_loss(view_1, view_2, None, **{**settings, "floor": "official"})
    assert official.item() == pytest.approx(math.log1p(math.exp(-n / 0.1) / math.exp(1 / 0.1)), rel=1e-2)
    assert official.item() < 1e-20 * ours.item()


def test_broadcast_form_differs_from_per_anchor_and_diagonal_is_per_anchor():
    torch.manual_seed(2)
    view_1, view_2 = torch.randn(6, 8), torch.randn(6, 8)
    common = dict(
        temperature=0.3, pos_prior=0.1, count_memory=False, floor="official", normalize_memory=False
    )
    per_anchor = debiased_contrastive_loss(view_1, view_2, reduction="per_anchor", **common)
    broadcast = debiased_contrastive_loss(view_1, view_2, reduction="broadcast", **common)
    assert not torch.isclose(per_anchor, broadcast)


def test_contrastive_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        debiased_contrastive_loss(torch.randn(4, 8), torch.randn(3, 8), temperature=0.4)
    with pytest.raises(ValueError, match="at least 2 images"):
        debiased_contrastive_loss(torch.randn(1, 8), torch.randn(1, 8), temperature=0.4)
    with pytest.raises(ValueError, match="reduction"):
        debiased_contrastive_loss(torch.randn(2, 8), torch.randn(2, 8), temperature=0.4, reduction="sum")


def test_loss_decreases_when_views_agree():
    torch.manual_seed(3)
    view_1 = torch.randn(8, 16)
    aligned = debiased_contrastive_loss(
        view_1, view_1 + 0.01 * torch.randn(8, 16), temperature=0.4, pos_prior=0.1
    )
    random = debiased_contrastive_loss(view_1, torch.randn(8, 16), temperature=0.4, pos_prior=0.1)
    assert aligned < random


def test_codeword_diversity_matches_pairwise_mean():
    torch.manual_seed(4)
    codebooks = torch.nn.functional.normalize(torch.randn(3, 5, 4), dim=-1)
    expected = sum(
        float(codebooks[m, i] @ codebooks[m, j]) for m in range(3) for i in range(5) for j in range(5)
    ) / (3 * 25)
    assert codeword_diversity(codebooks).item() == pytest.approx(expected, rel=1e-5)
    collapsed = torch.nn.functional.normalize(torch.ones(2, 4, 3), dim=-1)
    assert codeword_diversity(collapsed).item() == pytest.approx(1.0, rel=1e-6)


def test_assignment_entropy_matches_definition():
    uniform = torch.full((2, 3, 8), 1 / 8)
    assert assignment_entropy(uniform).item() == pytest.approx(math.log(8), rel=1e-6)
    one_hot = torch.nn.functional.one_hot(torch.tensor([[1, 2]]), 4).float()
    assert assignment_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-9)
    torch.manual_seed(5)
    p = torch.softmax(torch.randn(4, 2, 6), dim=-1)
    expected = (
        sum(-sum(float(x) * math.log(float(x)) for x in p[b, m]) for b in range(4) for m in range(2)) / 8
    )
    assert assignment_entropy(p).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("floor", ["dcl", "official"])
@pytest.mark.parametrize("count_memory", [True, False])
def test_debias_clamp_binds_with_memory_negatives(floor, count_memory):
    """Identical views (P = e^{1/tau}), orthogonal in-batch negatives, memory vectors opposite to the anchors:
    S is tiny next to rho N P, so every anchor sits on the floor, whose N counts the memory or not."""
    temperature, pos_prior, batch, memory_size = 0.2, 0.5, 4, 5
    base = torch.eye(6, dtype=torch.float64)[:batch] * 3.0  # (B, 6), orthogonal rows
    memory = -torch.ones(memory_size, 6, dtype=torch.float64)  # cos -1/sqrt(6) with every anchor
    settings = dict(
        temperature=temperature,
        pos_prior=pos_prior,
        debias=True,
        reduction="per_anchor",
        count_memory=count_memory,
        floor=floor,
        normalize_memory=True,
    )
    loss = debiased_contrastive_loss(base, base.clone(), memory, **settings)
    assert loss.dtype == torch.float64
    n = 2 * batch - 2 + (memory_size if count_memory else 0)
    negatives = (2 * batch - 2) * 1.0 + memory_size * math.exp(-1 / math.sqrt(6) / temperature)  # S
    positive = math.exp(1 / temperature)  # P
    assert (negatives - pos_prior * n * positive) / (1 - pos_prior) < 0  # the unclamped term is negative
    lower = n * math.exp(-1 / temperature) if floor == "dcl" else math.exp(-n / temperature)
    assert loss.item() == pytest.approx(math.log1p(lower / positive), rel=1e-12)
    assert loss.item() == pytest.approx(reference_loss(base, base.clone(), memory, **settings), rel=1e-9)


def _double(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("reduction", ["per_anchor", "broadcast"])
@pytest.mark.parametrize("normalize_memory", [True, False])
def test_contrastive_loss_gradients_match_finite_differences(reduction, normalize_memory):
    """float64 gradcheck of the loss w.r.t. both views and the memory (away from the debias clamp)."""
    view_1, view_2, memory = _double(4, 6, seed=0), _double(4, 6, seed=1), _double(3, 6, seed=2)
    settings = dict(
        temperature=0.4,
        pos_prior=0.1,
        reduction=reduction,
        count_memory=True,
        floor="dcl",
        normalize_memory=normalize_memory,
    )
    assert torch.autograd.gradcheck(
        lambda a, b, m: debiased_contrastive_loss(a, b, m, **settings), (view_1, view_2, memory)
    )
    assert torch.autograd.gradcheck(
        lambda a, b: debiased_contrastive_loss(a, b, None, debias=False, **settings), (view_1, view_2)
    )


def test_regulariser_gradients_match_finite_differences():
    codebooks = _double(2, 5, 3, seed=3)
    assert torch.autograd.gradcheck(codeword_diversity, (codebooks,))

    def diversity_of_unit_codewords(raw: torch.Tensor) -> torch.Tensor:  # as in the model
        return codeword_diversity(torch.nn.functional.normalize(raw, dim=-1))

    assert torch.autograd.gradcheck(diversity_of_unit_codewords, (codebooks,))
    probabilities = torch.softmax(_double(3, 2, 6, seed=4).detach(), dim=-1).requires_grad_()
    assert torch.autograd.gradcheck(assignment_entropy, (probabilities,))
