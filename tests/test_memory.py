"""Code memory: FIFO order, the reference code's pointer rule, and state round trips."""

from __future__ import annotations

import pytest
import torch

from mecoq_hf.models.mecoq.memory import CodeMemory


def block(value: float, rows: int = 2) -> torch.Tensor:
    return torch.full((rows, 2, 3), value)


def test_fifo_overwrites_oldest_entries():
    memory = CodeMemory(size=4, num_codebooks=2, codebook_size=3)
    assert memory.num_filled == 0 and memory.soft_codes().shape == (0, 2, 3)
    memory.enqueue(block(1.0))
    memory.enqueue(block(2.0))
    assert memory.num_filled == 4
    memory.enqueue(block(3.0))  # overwrites the two oldest slots (the 1.0 block)
    values = sorted(float(v) for v in memory.soft_codes()[:, 0, 0])
    assert values == [2.0, 2.0, 3.0, 3.0]


def test_reference_pointer_rule_advances_by_nominal_batch():
    """docs/method.md §5: the pointer moves by the nominal batch size even after a short batch."""
    memory = CodeMemory(size=6, num_codebooks=2, codebook_size=3)
    memory.enqueue(block(1.0, rows=1), advance=3)
    assert int(memory.pointer) == 3 and memory.num_filled == 1
    memory.enqueue(block(2.0, rows=3), advance=3)
    assert int(memory.pointer) == 0 and memory.num_filled == 4
    # Slots 1 and 2 were skipped, so only filled entries are returned.
    assert sorted(float(v) for v in memory.soft_codes()[:, 0, 0]) == [1.0, 2.0, 2.0, 2.0]


def test_block_larger_than_memory_keeps_newest():
    memory = CodeMemory(size=3, num_codebooks=2, codebook_size=3)
    codes = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 2, 3)
    memory.enqueue(codes)
    assert sorted(float(v) for v in memory.soft_codes()[:, 0, 0]) == [2.0, 3.0, 4.0]


def test_state_dict_round_trip_and_reset():
    memory = CodeMemory(size=4, num_codebooks=2, codebook_size=3)
    memory.enqueue(torch.rand(3, 2, 3))
    restored = CodeMemory(size=4, num_codebooks=2, codebook_size=3)
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.codes, memory.codes) and int(restored.pointer) == 3
    restored.reset()
    assert restored.num_filled == 0 and int(restored.pointer) == 0


def test_wrong_shape_is_rejected_and_zero_size_is_a_no_op():
    memory = CodeMemory(size=4, num_codebooks=2, codebook_size=3)
    with pytest.raises(ValueError, match=r"\(B, 2, 3\)"):
        memory.enqueue(torch.rand(2, 3, 3))
    empty = CodeMemory(size=0, num_codebooks=2, codebook_size=3)
    empty.enqueue(torch.rand(2, 2, 3))
    assert empty.num_filled == 0
