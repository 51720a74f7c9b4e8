"""An inverted file over our codes: coarse centroids, list assignment, and faiss `IndexIVFPQ` built from them.

faiss searches an `IndexIVFPQ` by picking the `nprobe` lists whose centroids score highest with the query
(inner product) and scanning their PQ codes. With `by_residual = False` the PQ part scores a stored code
exactly as our asymmetric search does (<q, decoded code>, the codebooks being ours), so `nprobe = nlist`
returns the exhaustive result and smaller `nprobe` trades recall for speed.

Our codes are added verbatim (`add_sa_codes` with `[list number | code]` rows), never re-encoded: faiss would
assign sub-vectors by L2 distance, which equals our argmax inner product only for unit-norm codewords.

The coarse centroids come from spherical k-means (faiss `Kmeans`) on decoded codes (or on embeddings, see
`train_coarse_centroids`), and an item goes to the list whose centroid has the highest inner product with its
decoded code, the same rule the query side uses.

On-disk inverted lists (`write_ondisk_lists`): per-chunk IVF indexes sharing the trained quantizer are merged
with `faiss.contrib.ondisk.merge_ondisk` into one `lists.ivfdata` file that searches memory-map, so the lists
need not fit in memory. The folder next to the index file also records the sha256 of the index file it was
made from; a reader refuses a folder made from another file (`read_ondisk_lists`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..file_io import write_json
from ..models.mecoq.quantization import decode_codes
from .faiss_interop import check_faiss_codebooks, import_faiss

if TYPE_CHECKING:
    import faiss

ONDISK_SUFFIX = ".ivf"  # index.safetensors -> index.ivf/ (populated.index, lists.ivfdata, binding.json)
ONDISK_FORMAT = "mecoq-hf/ivf-on-disk"
ASSIGN_CHUNK = 65536  # items decoded and assigned at once


def ondisk_folder(index_path: str | os.PathLike) -> Path:
    """`index.safetensors` -> `index.ivf`: where the on-disk inverted lists of an index file are kept."""
    return Path(index_path).with_suffix(ONDISK_SUFFIX)


# coarse quantizer


def default_nlist(num_items: int) -> int:
    """The default number of lists: sqrt(N) rounded to a power of two, between 1 and 65536 (1,024 lists for
    10^6 codes, 4,096 for 10^7). faiss suggests 4-16 sqrt(N) for the fastest search at large N; sqrt(N) keeps
    the k-means and the assignment of every item affordable on a CPU (see BENCHMARKS.md)."""
    target = max(1.0, float(np.sqrt(max(num_items, 1))))
    return int(min(65536, 2 ** round(np.log2(target))))


def train_coarse_centroids(
    vectors: torch.Tensor, nlist: int, *, seed: int = 0, niter: int = 20, verbose: bool = False
) -> torch.Tensor:
    """(nlist, d) unit-norm centroids by spherical k-means on (n, d) vectors (decoded codes or embeddings).

    faiss samples at most 256 vectors per centroid; pass at least 39 x nlist vectors (it warns below that).
    `verbose` prints faiss' progress, one line per iteration.
    """
    if isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1:
        raise ValueError(f"nlist must be a positive integer, got {nlist!r}.")
    if vectors.shape[0] < nlist:
        raise ValueError(
            f"nlist={nlist} lists need at least {nlist} training vectors, got {vectors.shape[0]}. "
            "Use a smaller --nlist (about sqrt(N) is a good start)."
        )
    faiss = import_faiss()
    data = np.ascontiguousarray(vectors.detach().to("cpu", torch.float32).numpy())
    kmeans = faiss.Kmeans(data.shape[1], nlist, niter=niter, spherical=True, seed=seed, verbose=verbose)
    kmeans.train(data)
    return torch.from_numpy(kmeans.centroids.copy())  # (nlist, d)


def training_sample(codes: torch.Tensor, codebooks: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """(min(size, N), d) decoded codes of a seeded random sample of (N, M) codes, in position order."""
    count = codes.shape[0]
    if size >= count:
        positions = torch.arange(count)
    else:
        generator = torch.Generator().manual_seed(seed)
        positions = torch.randperm(count, generator=generator)[:size].sort().values
    return decode_codes(codes[positions], codebooks)


def coarse_quantizer(centroids: torch.Tensor) -> faiss.IndexFlatIP:
    """A faiss `IndexFlatIP` holding (nlist, d) centroids (list choice by highest inner product)."""
    faiss = import_faiss()
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(np.ascontiguousarray(centroids.to(torch.float32).numpy()))
    return quantizer


def assign_lists(codes: torch.Tensor, codebooks: torch.Tensor, quantizer: faiss.Index) -> torch.Tensor:
    """(N,) int32 list of each (N, M) code: the centroid with the highest inner product with its decoding."""
    parts = []
    for start in range(0, codes.shape[0], ASSIGN_CHUNK):
        decoded = decode_codes(codes[start : start + ASSIGN_CHUNK], codebooks)  # (n, d)
        _, best = quantizer.search(np.ascontiguousarray(decoded.numpy()), 1)
        parts.append(torch.from_numpy(best[:, 0].astype(np.int32)))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


# faiss IndexIVFPQ


def empty_ivf(codebooks: torch.Tensor, centroids: torch.Tensor) -> faiss.IndexIVFPQ:
    """A trained, empty `IndexIVFPQ` (inner product, `by_residual = False`) with our codebooks and lists."""
    check_faiss_codebooks(codebooks)
    faiss = import_faiss()
    num_codebooks, _, subvector_dim = codebooks.shape
    dim, nlist = num_codebooks * subvector_dim, centroids.shape[0]
    quantizer = coarse_quantizer(centroids)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, num_codebooks, 8, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
    index.by_residual = False
    centroids_flat = codebooks.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)
    faiss.copy_array_to_vector(centroids_flat, index.pq.centroids)  # (M, 256, D) row-major, as faiss'
    index.is_trained = True
    return index


def add_to_lists(
    index: faiss.IndexIVF, codes: torch.Tensor, lists: torch.Tensor, positions: torch.Tensor
) -> None:
    """Append (n, M) uint8 codes to the given (n,) lists under (n,) int64 ids, verbatim (`add_sa_codes`)."""
    if not codes.shape[0]:
        return
    width = index.coarse_code_size()  # the list number, little-endian
    shifts = 8 * np.arange(width, dtype=np.int64)
    prefix = ((lists.numpy().astype(np.int64)[:, None] >> shifts) & 255).astype(np.uint8)  # (n, width)
    rows = np.ascontiguousarray(np.concatenate([prefix, codes.to(torch.uint8).numpy()], axis=1))
    index.add_sa_codes(rows, np.ascontiguousarray(positions.numpy().astype(np.int64)))


def ivf_index(
    codebooks: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lists: torch.Tensor
) -> faiss.IndexIVFPQ:
    """An in-memory `IndexIVFPQ` holding (N, M) codes in their (N,) lists; faiss ids are positions 0..N-1."""
    index = empty_ivf(codebooks, centroids)
    for start in range(0, codes.shape[0], ASSIGN_CHUNK):
        stop = min(start + ASSIGN_CHUNK, codes.shape[0])
        add_to_lists(index, codes[start:stop], lists[start:stop], torch.arange(start, stop))
    return index


# on-disk inverted lists


def write_ondisk_lists(
    index_path: str | os.PathLike,
    index_sha256: str,
    codebooks: torch.Tensor,
    centroids: torch.Tensor,
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    show_progress_bar: bool = True,
) -> Path:
    """Write the on-disk inverted lists of an index file into `ondisk_folder(index_path)`; returns it.

    Args:
        index_path: the index file the lists belong to.
        index_sha256: its checksum, recorded in `binding.json`.
        codebooks, centroids: (M, 256, D) and (nlist, d).
        chunks: ((n, M) codes, (n,) lists) in position order; one chunk is held in memory at a time.

    The folder is built next to its final place and renamed into it, so readers see the old folder or the
    complete new one (the binding tells them whether it belongs to the file they opened).
    """
    from faiss.contrib.ondisk import merge_ondisk
    from tqdm.auto import tqdm

    faiss = import_faiss()
    target = ondisk_folder(index_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        trained = empty_ivf(codebooks, centroids)
        faiss.write_index(trained, str(work / "trained.index"))
        block_files, start = [], 0
        for number, (codes, lists) in enumerate(
            tqdm(chunks, desc="inverted lists", disable=not show_progress_bar)
        ):
            block = faiss.read_index(str(work / "trained.index"))
            add_to_lists(block, codes, lists, torch.arange(start, start + codes.shape[0]))
            start += codes.shape[0]
            block_files.append(str(work / f"block-{number:05d}.index"))
            faiss.write_index(block, block_files[-1])
            del block
        merged = faiss.read_index(str(work / "trained.index"))
        logging.getLogger("faiss.contrib.ondisk").setLevel(logging.WARNING)
        _quietly(lambda: merge_ondisk(merged, block_files, str(work / "lists.ivfdata")))
        faiss.write_index(merged, str(work / "populated.index"))
        for name in [*block_files, str(work / "trained.index")]:
            Path(name).unlink()
        write_json(
            work / "binding.json", {"format": ONDISK_FORMAT, "index_sha256": index_sha256, "ntotal": start}
        )
        os.chmod(work, 0o777 & ~_umask())
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def read_ondisk_lists(index_path: str | os.PathLike, index_sha256: str) -> faiss.IndexIVFPQ:
    """The on-disk `IndexIVFPQ` of an index file (its lists memory-mapped), checked to belong to that file.

    Raises:
        FileNotFoundError: a file of the folder is missing.
        ValueError: the folder was made from another index file.
    """
    faiss = import_faiss()
    folder = ondisk_folder(index_path)
    for name in ("binding.json", "populated.index", "lists.ivfdata"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} is missing: the on-disk inverted lists of {index_path} are incomplete. "
                "Rebuild them with `mecoq index build ... --backend ivf` (or search with --no-on-disk)."
            )
    binding = json.loads((folder / "binding.json").read_text())
    if binding.get("format") != ONDISK_FORMAT or binding.get("index_sha256") != index_sha256:
        raise ValueError(
            f"{folder} holds the inverted lists of another index file than {index_path} (checksums differ). "
            "Rebuild the index with `mecoq index build ... --backend ivf`, or delete the folder."
        )
    return _quietly(lambda: faiss.read_index(str(folder / "populated.index"), faiss.IO_FLAG_ONDISK_SAME_DIR))


def _quietly(function: Any) -> Any:
    """`function()` with C-level stdout and stderr silenced (faiss prints "resizing ..." while merging lists
    and "updating ondisk filename ..." while reading them)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            return function()
    finally:
        for descriptor, original in zip((1, 2), saved):
            os.dup2(original, descriptor)
            os.close(original)


def _umask() -> int:
    from ..file_io import current_umask

    return current_umask()


__all__ = [
    "assign_lists",
    "default_nlist",
    "empty_ivf",
    "ivf_index",
    "ondisk_folder",
    "read_ondisk_lists",
    "train_coarse_centroids",
    "training_sample",
    "write_ondisk_lists",
]
