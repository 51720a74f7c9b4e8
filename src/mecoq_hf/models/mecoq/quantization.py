"""Product quantization head of MeCoQ: M codebooks of K unit-norm codewords (docs/method.md §2.3-§2.5, §7).

An embedding z of width d is cut into M sub-vectors of width D = d / M. Each sub-vector is L2-normalised
("intra-normalisation") and compared with the K codewords of its own codebook by cosine similarity.

- Training uses *soft* quantization: p = softmax(alpha * cos), reconstruction = sum_k p_k c_k per sub-space.
- The index stores *hard* codes: argmax_k cos per sub-space, one byte per sub-space when K <= 256.
- Search (lookup tables, asymmetric and symmetric scores) lives outside the model, in
  `mecoq_hf.retrieval.scoring`.

The code helpers at the bottom are plain functions of tensors so that code holding codebooks loaded from
`codebooks.safetensors` (the index, the evaluation) can check, make and decode codes without a model.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .file_access import check_readable, write_atomic
from .kmeans import spherical_kmeans

CODEBOOKS_FILE = "codebooks.safetensors"
CODEBOOKS_FORMAT = "mecoq-codebooks"
CODEBOOKS_FORMAT_VERSION = "1"


# helper functions


def code_dtype(codebook_size: int) -> torch.dtype:
    """Smallest integer dtype that holds codes 0..K-1 (uint8 for K <= 256, as in the paper's M-byte codes)."""
    if codebook_size <= 256:
        return torch.uint8
    if codebook_size <= 2**15:
        return torch.int16
    return torch.int32


def split_subvectors(embeddings: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """(B, d) -> (B, M, D). Raises a ValueError when d is not divisible by M."""
    batch, dim = embeddings.shape
    if dim % num_codebooks != 0:
        raise ValueError(
            f"Embedding width {dim} is not divisible by the number of codebooks M={num_codebooks}. "
            "Choose an embedding size that is a multiple of M."
        )
    return embeddings.reshape(batch, num_codebooks, dim // num_codebooks)


class SoftQuantization(NamedTuple):
    """What the quantizer returns in training mode.

    reconstruction: (B, d) concatenation of the M soft reconstructions (each of norm <= 1).
    assignments:    (B, M, K) softmax assignment probabilities (the "soft codes" kept in the code memory).
    codes:          (B, M) hard codes (argmax of the assignments), for logging and the index.
    """

    reconstruction: torch.Tensor
    assignments: torch.Tensor
    codes: torch.Tensor


# main class


class ProductQuantizer(nn.Module):
    """M codebooks of K unit-norm codewords with soft (training) and hard (index) assignment.

    Args:
        dim: width d of the embeddings to quantize; must be divisible by `num_codebooks`.
        num_codebooks: M, the number of sub-spaces (M bytes per code when K <= 256).
        codebook_size: K, codewords per codebook (256 in every experiment of the paper).
        softmax_scale: alpha, scale of the cosine similarities inside the softmax (10 in the paper).
        trainable: whether the codebooks receive gradients. The reference code never trains them
            (docs/method.md §2.3); the paper describes trainable codebooks.

    The stored codewords have unit norm: initialisation normalises them, and the training loop calls
    `renormalize_codebooks_` after every optimizer step, as the reference code does at every step. Keeping
    the norm at 1 matters for trainable codebooks: the forward pass uses `normalized_codebooks`, so a gradient
    step turns a codeword of norm r by about lr * |grad| / r^2 radians, and raw Xavier norms (~0.05-0.4) would
    give each codeword its own, drifting learning rate. The normalisation in the forward pass stays (it keeps
    the gradient tangent to the sphere and makes older checkpoints with raw codewords encode unchanged).

    The quantizer computes in the codebooks' precision (float32) with autocast disabled, also when called
    under `torch.autocast`: bf16 similarities flip hard codes and distort the loss (docs/method.md §2.4).

    Example:
        >>> pq = ProductQuantizer(dim=64, num_codebooks=4, codebook_size=256)
        >>> soft = pq(torch.randn(8, 64))
        >>> soft.reconstruction.shape, soft.assignments.shape
        (torch.Size([8, 64]), torch.Size([8, 4, 256]))
        >>> pq.encode(torch.randn(8, 64)).dtype
        torch.uint8
    """

    def __init__(
        self,
        dim: int,
        num_codebooks: int,
        codebook_size: int = 256,
        softmax_scale: float = 10.0,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        if num_codebooks < 1 or dim % num_codebooks != 0:
            raise ValueError(
                f"Embedding width dim={dim} must be a positive multiple of num_codebooks={num_codebooks}; "
                f"got remainder {dim % max(num_codebooks, 1)}. Change dim or num_codebooks."
            )
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}.")
        self.dim = dim
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.subvector_dim = dim // num_codebooks
        self.softmax_scale = softmax_scale
        # (M, K, D); values are set by `reset_parameters` (the model's `_init_weights` uses the same draw).
        self.codebooks = nn.Parameter(
            torch.empty(num_codebooks, codebook_size, self.subvector_dim), requires_grad=trainable
        )
        self.reset_parameters()

    @property
    def trainable(self) -> bool:
        return self.codebooks.requires_grad

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform on the (M, K, D) tensor, then unit-normalise each codeword (docs/method.md §2.3)."""
        self.codebooks.copy_(random_unit_codebooks(self.codebooks))

    @torch.no_grad()
    def renormalize_codebooks_(self) -> None:
        """Rescale every stored codeword to unit L2 norm, in place (directions unchanged).

        Call it after every optimizer step that updates trainable codebooks: the reference code
        re-normalises the codebook parameter at every step (docs/method.md §2.3, §6).
        """
        self.codebooks.copy_(F.normalize(self.codebooks, dim=-1))

    def normalized_codebooks(self) -> torch.Tensor:
        """(M, K, D) codebooks with unit-norm codewords; differentiable when the codebooks are trainable."""
        return F.normalize(self.codebooks, dim=-1)

    def cosine_similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, M, K) cosine similarity of each intra-normalised sub-vector to each codeword."""
        with _autocast_disabled(embeddings):
            dtype = torch.promote_types(embeddings.dtype, self.codebooks.dtype)
            subvectors = F.normalize(split_subvectors(embeddings.to(dtype), self.num_codebooks), dim=-1)
            codebooks = self.normalized_codebooks().to(dtype)  # (M, K, D)
            return torch.einsum("bmd,mkd->bmk", subvectors, codebooks)  # (B, M, K)

    def forward(self, embeddings: torch.Tensor) -> SoftQuantization:
        """Soft quantization (docs/method.md §2.4): p = softmax(alpha * cos), reconstruction sum_k p_k c_k."""
        with _autocast_disabled(embeddings):
            similarities = self.cosine_similarities(embeddings)  # (B, M, K)
            assignments = torch.softmax(self.softmax_scale * similarities, dim=-1)  # (B, M, K)
            reconstruction = self.reconstruct_soft(assignments)  # (B, d)
        codes = similarities.argmax(dim=-1).to(code_dtype(self.codebook_size))  # (B, M)
        return SoftQuantization(reconstruction, assignments, codes)

    def reconstruct_soft(self, assignments: torch.Tensor) -> torch.Tensor:
        """(B, M, K) soft codes -> (B, d) concatenated convex combinations of the current codewords."""
        with _autocast_disabled(assignments):
            dtype = torch.promote_types(assignments.dtype, self.codebooks.dtype)
            codebooks = self.normalized_codebooks().to(dtype)  # (M, K, D)
            subvectors = torch.einsum("bmk,mkd->bmd", assignments.to(dtype), codebooks)  # (B, M, D)
        return subvectors.reshape(assignments.shape[0], self.dim)

    @torch.no_grad()
    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, M) hard codes, argmax_k <z^m, c_k^m> (docs/method.md §2.5)."""
        with _autocast_disabled(embeddings):
            return hard_codes(embeddings, self.normalized_codebooks())

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, M) hard codes -> (B, d) concatenation of the selected unit-norm codewords."""
        return decode_codes(codes, self.normalized_codebooks())

    @torch.no_grad()
    def init_codebooks_from_embeddings_(
        self, embeddings: torch.Tensor, iterations: int = 30, seed: int = 0
    ) -> None:
        """Set each codebook to the spherical k-means centroids of its unit sub-vectors, in place.

        An optional alternative to the random initialisation (not in the paper or the reference code): with
        codewords that already cover the projected training data, fewer codewords start unused.

        Args:
            embeddings: (N, d) projected embeddings z of training images, N >= K.
            iterations: at most this many assignment/update rounds per sub-space.
            seed: seed of the k-means++ seeding; the same inputs and seed give the same codebooks on a CPU.

        Raises:
            ValueError: when `embeddings` is not (N, d) or N < K.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"Embeddings must have shape (N, {self.dim}) (the projected embeddings z), "
                f"got {tuple(embeddings.shape)}."
            )
        if embeddings.shape[0] < self.codebook_size:
            raise ValueError(
                f"k-means needs at least K={self.codebook_size} embeddings to place {self.codebook_size} "
                f"codewords, got {embeddings.shape[0]}. Encode more training images."
            )
        generator = torch.Generator(device="cpu").manual_seed(seed)
        subvectors = split_subvectors(embeddings.detach().float().cpu(), self.num_codebooks)  # (N, M, D)
        centroids = [
            spherical_kmeans(subvectors[:, m], self.codebook_size, iterations, generator)
            for m in range(self.num_codebooks)
        ]
        self.codebooks.copy_(torch.stack(centroids).to(self.codebooks))  # (M, K, D)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
            f"softmax_scale={self.softmax_scale}, trainable={self.trainable}"
        )


def random_unit_codebooks(like: torch.Tensor) -> torch.Tensor:
    """A fresh Xavier-uniform draw shaped like `like` (M, K, D), each codeword scaled to unit norm.

    Xavier uses PyTorch's fan rules on the 3-D tensor, as the reference code does; only the directions
    matter since the codewords are normalised (docs/method.md §2.3).
    """
    draw = torch.empty_like(like)
    nn.init.xavier_uniform_(draw)
    return F.normalize(draw, dim=-1)


def _autocast_disabled(tensor: torch.Tensor) -> torch.autocast:
    """A context without autocast on `tensor`'s device type, so matmuls run in the inputs' dtype."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


# code helpers (plain functions of tensors; used by the quantizer, the index and the evaluation)


def check_codebooks(codebooks: torch.Tensor) -> tuple[int, int, int]:
    """Validate a (M, K, D) codebook tensor and return (M, K, D)."""
    if codebooks.ndim != 3:
        raise ValueError(
            f"Codebooks must have shape (M, K, D), got {tuple(codebooks.shape)}. "
            "Load them with `load_codebooks` or take `model.quantizer.normalized_codebooks()`."
        )
    return tuple(codebooks.shape)  # type: ignore[return-value]


def check_codes(codes: torch.Tensor, codebooks: torch.Tensor) -> None:
    """Raise a ValueError when codes (N, M) do not fit codebooks (M, K, D)."""
    num_codebooks, codebook_size, _ = check_codebooks(codebooks)
    if codes.ndim != 2 or codes.shape[1] != num_codebooks:
        raise ValueError(
            f"Codes must have shape (N, M={num_codebooks}), got {tuple(codes.shape)}. "
            "Were they produced by a model with a different number of codebooks?"
        )
    if codes.is_floating_point():
        raise ValueError(f"Codes must be an integer tensor, got dtype {codes.dtype}.")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(
            f"Codes must lie in [0, {codebook_size - 1}] for K={codebook_size}, "
            f"got values in [{int(codes.min())}, {int(codes.max())}]."
        )


def decode_codes(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """(N, M) codes and (M, K, D) codebooks -> (N, M*D) reconstructed vectors."""
    check_codes(codes, codebooks)
    num_codebooks, _, subvector_dim = codebooks.shape
    index = codes.long().to(codebooks.device)  # (N, M)
    rows = torch.arange(num_codebooks, device=codebooks.device).expand_as(index)  # (N, M)
    return codebooks[rows, index].reshape(codes.shape[0], num_codebooks * subvector_dim)


def hard_codes(embeddings: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """(B, d) embeddings and (M, K, D) codebooks -> (B, M) codes: argmax cosine per sub-space (docs/method.md
    §2.5).

    The rule of `ProductQuantizer.encode`, for code that holds codebooks but no model (e.g. the index).
    """
    num_codebooks, codebook_size, subvector_dim = check_codebooks(codebooks)
    if embeddings.ndim != 2 or embeddings.shape[1] != num_codebooks * subvector_dim:
        raise ValueError(
            f"Embeddings must have shape (B, {num_codebooks * subvector_dim}) to match codebooks "
            f"{tuple(codebooks.shape)}, got {tuple(embeddings.shape)}."
        )
    subvectors = F.normalize(embeddings.reshape(-1, num_codebooks, subvector_dim).to(codebooks.dtype), dim=-1)
    cosines = torch.einsum("bmd,mkd->bmk", subvectors, F.normalize(codebooks, dim=-1))  # (B, M, K)
    return cosines.argmax(dim=-1).to(code_dtype(codebook_size))


# codebook files


def save_codebooks(path: str | os.PathLike, codebooks: torch.Tensor) -> None:
    """Write (M, K, D) codebooks to a safetensors file with their shape in the metadata, atomically."""
    from safetensors.torch import save_file

    codebooks = codebooks.detach().float().cpu().contiguous()
    num_codebooks, codebook_size, subvector_dim = codebooks.shape
    metadata = {
        "format": CODEBOOKS_FORMAT,
        "version": CODEBOOKS_FORMAT_VERSION,
        "num_codebooks": str(num_codebooks),
        "codebook_size": str(codebook_size),
        "subvector_dim": str(subvector_dim),
        "sha256": _tensor_sha256(codebooks),
    }
    write_atomic(path, lambda name: save_file({"codebooks": codebooks}, name, metadata=metadata))


def load_codebooks(path: str | os.PathLike) -> torch.Tensor:
    """Read (M, K, D) codebooks written by `save_codebooks` (or `save_pretrained`), with format checks.

    Raises:
        FileNotFoundError / PermissionError: the file does not exist / may not be read by this user.
        ValueError: the file is truncated, altered, or not a MeCoQ codebooks file.
    """
    from safetensors import SafetensorError, safe_open

    fix = "Download it again or re-save it with `model.save_pretrained`."
    check_readable(path, "Codebooks file", fix)  # safetensors reports an unreadable file as missing
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            codebooks = file.get_tensor("codebooks")
    except (SafetensorError, OSError, KeyError) as error:
        raise ValueError(
            f"Could not read codebooks from {path}: {error}. The file is missing, truncated or not a MeCoQ "
            "codebooks file; download it again or re-save it with `model.save_pretrained`."
        ) from error
    expected = (metadata.get("num_codebooks"), metadata.get("codebook_size"), metadata.get("subvector_dim"))
    if metadata.get("format") != CODEBOOKS_FORMAT or tuple(str(n) for n in codebooks.shape) != expected:
        raise ValueError(
            f"{path} is not a valid MeCoQ codebooks file: format {metadata.get('format')!r} (expected "
            f"{CODEBOOKS_FORMAT!r}), tensor shape {tuple(codebooks.shape)} vs metadata {expected}."
        )
    if "sha256" in metadata and _tensor_sha256(codebooks) != metadata["sha256"]:
        raise ValueError(
            f"{path} was altered after it was saved: the codebooks' sha256 does not match the recorded one. "
            "Download the file again or re-save it with `model.save_pretrained`."
        )
    return codebooks


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.float().contiguous().numpy().tobytes()).hexdigest()


__all__ = [
    "CODEBOOKS_FILE",
    "ProductQuantizer",
    "SoftQuantization",
    "check_codebooks",
    "check_codes",
    "code_dtype",
    "decode_codes",
    "hard_codes",
    "load_codebooks",
    "save_codebooks",
    "split_subvectors",
]
