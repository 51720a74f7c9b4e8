"""Code memory of MeCoQ (docs/method.md §5): a FIFO ring of *soft codes* from recent batches.

The memory stores assignment probabilities (M x K per entry), not features: at every step they are turned
back into vectors with the *current* codebooks and used as extra negatives. Soft codes drift less than
features as the encoder trains, which is why the paper prefers them (and why hard codes fail).

State lives in buffers so it is saved as safetensors with the training state and restored on resume; the
model leaves these buffers out of released checkpoints. Under DDP the caller enqueues codes gathered from
every process, so all ranks hold the same memory.
"""

from __future__ import annotations

import torch
from torch import nn


class CodeMemory(nn.Module):
    """Ring buffer of `size` soft codes of shape (M, K).

    Args:
        size: N_M, number of entries (384 in the reference code).
        num_codebooks: M.
        codebook_size: K.

    Example:
        >>> memory = CodeMemory(size=6, num_codebooks=2, codebook_size=4)
        >>> memory.enqueue(torch.full((4, 2, 4), 0.25))
        >>> memory.num_filled
        4
    """

    def __init__(self, size: int, num_codebooks: int, codebook_size: int) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"Memory size must be >= 0, got {size}.")
        self.size = size
        self.register_buffer("codes", torch.zeros(size, num_codebooks, codebook_size))  # (N_M, M, K)
        self.register_buffer("filled", torch.zeros(size, dtype=torch.bool))  # (N_M,)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # next slot to write

    @property
    def num_filled(self) -> int:
        return int(self.filled.sum())

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the memory (e.g. before a new training run)."""
        self.codes.zero_()
        self.filled.zero_()
        self.pointer.zero_()

    @torch.no_grad()
    def enqueue(self, assignments: torch.Tensor, advance: int | None = None) -> None:
        """Write a block of soft codes at the pointer, overwriting the oldest entries (first in, first out).

        The block takes the slots pointer, pointer + 1, ... (modulo the size), in order. A block larger than
        the memory keeps only its newest `size` entries, and the pointer ends on the oldest of them, so the
        next write replaces the oldest entry (size 3: enqueue 0..4 then 9 keeps [3, 4, 9]). This happens
        under DDP, where the gathered block is world_size x batch.

        Args:
            assignments: (B, M, K) soft codes; detached and stored in the buffer's dtype.
            advance: the nominal block size, >= B (defaults to B). The pointer then moves by `advance`, and
                the `advance - B` slots after a short block are skipped: they keep their older codes until the
                pointer comes round again, as after the reference code's smaller last batch (docs/method.md
                §5), and blocks stay aligned to multiples of `advance`. A nominal block larger than the
                memory cannot be aligned: the pointer then moves by B, the plain FIFO rule.

        Raises:
            ValueError: when the codes do not have shape (B, M, K), or `advance` < B.
        """
        if assignments.ndim != 3 or assignments.shape[1:] != self.codes.shape[1:]:
            raise ValueError(
                f"Soft codes must have shape (B, {self.codes.shape[1]}, {self.codes.shape[2]}), "
                f"got {tuple(assignments.shape)}."
            )
        block_size = assignments.shape[0]
        if advance is not None and advance < block_size:
            raise ValueError(
                f"advance (the nominal block size) must be >= the block size, got advance={advance} for a "
                f"block of {block_size} soft codes. Pass the nominal batch (x processes), or None."
            )
        if self.size == 0:
            return
        kept = min(block_size, self.size)
        # Block entry i belongs at slot (pointer + i) % size; only the newest `kept` entries can survive.
        offsets = torch.arange(block_size - kept, block_size, device=self.codes.device)  # (kept,)
        slots = (self.pointer + offsets) % self.size  # (kept,), distinct
        self.codes[slots] = assignments.detach()[block_size - kept :].to(self.codes)
        self.filled[slots] = True
        step = block_size if advance is None or advance > self.size else advance
        self.pointer.copy_((self.pointer + step) % self.size)

    def soft_codes(self) -> torch.Tensor:
        """(n, M, K) the filled entries (n <= N_M), in slot order.

        The model turns them into negatives with the *current* codebooks
        (`ProductQuantizer.reconstruct_soft`).
        """
        return self.codes[self.filled]

    def extra_repr(self) -> str:
        return f"size={self.size}, num_codebooks={self.codes.shape[1]}, codebook_size={self.codes.shape[2]}"


__all__ = ["CodeMemory"]
