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
        """Write a block of soft codes at the pointer, overwriting the oldest entries.

        Args:
            assignments: (B, M, K) soft codes; detached and stored in the buffer's dtype.
            advance: how far the pointer moves (defaults to B). The reference code always advances by the
                nominal batch size, also after a smaller last batch (docs/method.md §5); pass that size for parity.
        """
        if self.size == 0:
            return
        if assignments.ndim != 3 or assignments.shape[1:] != self.codes.shape[1:]:
            raise ValueError(
                f"Soft codes must have shape (B, {self.codes.shape[1]}, {self.codes.shape[2]}), "
                f"got {tuple(assignments.shape)}."
            )
        block = assignments.detach()[-self.size :]  # only the newest `size` entries can survive
        slots = (self.pointer + torch.arange(block.shape[0], device=self.codes.device)) % self.size
        self.codes[slots] = block.to(self.codes.dtype)
        self.filled[slots] = True
        step = assignments.shape[0] if advance is None else advance
        self.pointer.copy_((self.pointer + step) % self.size)

    def soft_codes(self) -> torch.Tensor:
        """(n, M, K) the filled entries (n <= N_M), in slot order.

        The model turns them into negatives with the *current* codebooks (`ProductQuantizer.reconstruct_soft`).
        """
        return self.codes[self.filled]

    def extra_repr(self) -> str:
        return f"size={self.size}, num_codebooks={self.codes.shape[1]}, codebook_size={self.codes.shape[2]}"


__all__ = ["CodeMemory"]
