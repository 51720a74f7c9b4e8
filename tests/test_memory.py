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


def numbered(*values: float) -> torch.Tensor:
    """(B, 2, 3) soft codes whose entries all equal the given values, one row per value."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None].expand(len(values), 2, 3)


def oldest_first(memory: CodeMemory) -> list[float]:
    """The filled entries in FIFO order: from the pointer (the next slot to be overwritten) round the ring."""
    order = [(int(memory.pointer) + i) % memory.size for i in range(memory.size)]
    return [float(memory.codes[slot, 0, 0]) for slot in order if memory.filled[slot]]


def test_block_larger_than_memory_keeps_newest_and_stays_fifo():
    """Size 3: enqueue 0..4 then 9 must keep [3, 4, 9] (the pointer used to stay on the newest entry)."""
    memory = CodeMemory(size=3, num_codebooks=2, codebook_size=3)
    memory.enqueue(numbered(0, 1, 2, 3, 4))
    assert oldest_first(memory) == [2.0, 3.0, 4.0]
    memory.enqueue(numbered(9))
    assert oldest_first(memory) == [3.0, 4.0, 9.0]


@pytest.mark.parametrize("start", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("block_sizes", [(5, 1), (4, 4, 2), (7, 2, 9), (3, 6), (1, 1, 1, 1, 8)])
def test_any_sequence_of_blocks_keeps_the_newest_entries_in_order(start, block_sizes):
    """Against a plain FIFO (a Python list) for every pointer position and blocks smaller/larger than 5."""
    memory = CodeMemory(size=5, num_codebooks=2, codebook_size=3)
    memory.enqueue(numbered(*[-1.0] * start))  # move the pointer to `start` (a no-op for start=0)
    expected = [-1.0] * start
    counter = 0
    for size in block_sizes:
        values = [float(counter + i) for i in range(size)]
        counter += size
        memory.enqueue(numbered(*values))
        expected = (expected + values)[-5:]
        assert oldest_first(memory) == expected


def test_nominal_advance_larger_than_the_block_keeps_fifo_order_of_the_written_entries():
    """advance=4 into 8 slots: blocks stay aligned to multiples of 4, short blocks leave stale slots."""
    memory = CodeMemory(size=8, num_codebooks=2, codebook_size=3)
    memory.enqueue(numbered(0, 1, 2, 3), advance=4)
    memory.enqueue(numbered(4, 5), advance=4)  # short block: slots 6 and 7 stay empty
    assert int(memory.pointer) == 0 and oldest_first(memory) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    memory.enqueue(numbered(6, 7, 8, 9), advance=4)
    assert int(memory.pointer) == 4 and oldest_first(memory) == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    with pytest.raises(ValueError, match="advance"):
        memory.enqueue(numbered(1, 2, 3), advance=2)


def test_nominal_advance_larger_than_the_memory_falls_back_to_fifo():
    """Under DDP the nominal block (world_size x batch) can exceed the memory: no alignment is possible."""
    memory = CodeMemory(size=3, num_codebooks=2, codebook_size=3)
    memory.enqueue(numbered(0, 1, 2, 3, 4), advance=8)
    assert oldest_first(memory) == [2.0, 3.0, 4.0]
    memory.enqueue(numbered(5, 6), advance=8)  # a short last batch
    assert oldest_first(memory) == [4.0, 5.0, 6.0]


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
