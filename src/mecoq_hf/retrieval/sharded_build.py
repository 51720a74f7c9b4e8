"""Building an index file of an image dataset in shards: bounded memory, several processes, resumable.

What `mecoq index build` runs. The dataset's rows are cut into shards of `shard_size` images; each shard is
encoded and written, atomically, as its own index file (codes, ids, labels, paths; `CodeIndex.save`) in the
work folder `OUTPUT.parts/`, next to `plan.json` (the model's codebooks checksum, the data source, the number
of items and the shard size). Then the main process merges the shards once into OUTPUT, streaming them
(`index_file.write_index_file`), and deletes the work folder.

- Memory: one shard's images in flight (a DataLoader batch at a time) and its codes, labels and paths; the
  merge holds one shard's tensors at a time, plus, for IVF, the k-means sample (train_size x d floats) and
  the centroids. Shards are memory-mapped files, so nothing grows with the database but the page cache.
- Resume: an interrupted build (Ctrl-C, SIGKILL, a lost machine) leaves complete shard files only; running
  the same command again encodes the missing shards and merges. A work folder of another model, data source
  or shard size is refused with the difference named.
- Processes: under `accelerate launch` every rank encodes a disjoint set of the missing shards (shard i on
  rank i mod world size) without any gather, and the main process merges after a barrier.
- One writer: the main process holds `build_lock.BuildLock(OUTPUT)` from the start to the end; a second
  concurrent build of the same output is refused with the holder's pid.
- IVF (`backend="ivf"`): coarse centroids by spherical k-means on a seeded sample of decoded codes, every
  item's list stored in the file, and, with `on_disk`, faiss on-disk inverted lists in `OUTPUT.ivf/`
  (`ivf.write_ondisk_lists`), which searches memory-map.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..file_io import read_json, write_json
from . import ivf
from .build_lock import BuildLock
from .index import CodeIndex
from .index_file import IndexFile, TensorPlan, read_index_file, write_index_file
from .scoring import SearchSettings
from .sidecar import IndexSidecar, describe_header, sidecar_path

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset

    from ..models.mecoq.modeling_mecoq import MeCoQModel

PLAN_FORMAT = "mecoq-hf/index-build"
DEFAULT_SHARD_SIZE = 50_000
INDEX_BACKENDS = ("exhaustive", "ivf")
MERGE_CHUNK = 1 << 20  # items per chunk when writing the on-disk lists from the merged file


def parts_folder(output: str | os.PathLike) -> Path:
    """`index.safetensors` -> `index.safetensors.parts`: the work folder of a build in progress."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


def codebooks_sha256(codebooks: torch.Tensor) -> str:
    """The sha256 of (M, K, D) float32 codebooks: what a work folder's shards were encoded with."""
    data = codebooks.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class BuildPlan:
    """What the shards of a work folder are: the model's codebooks, the data, the sizes and the scoring."""

    model: str
    codebooks_sha256: str
    data: dict[str, Any]
    num_items: int
    shard_size: int
    distance: str
    normalize_query_subvectors: bool

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_items // self.shard_size))

    def bounds(self, shard: int) -> tuple[int, int]:
        """Dataset rows [start, stop) of a shard."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_items)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **self.__dict__}


def shard_file(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


# the build


def build_index(
    model: MeCoQModel,
    images: Dataset,
    *,
    output: str | os.PathLike,
    model_source: str | os.PathLike,
    data: dict[str, Any],
    shard_size: int = DEFAULT_SHARD_SIZE,
    backend: str = "exhaustive",
    nlist: int | None = None,
    train_size: int | None = None,
    on_disk: bool = True,
    distance: str | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    show_progress_bar: bool = True,
    seed: int = 0,
) -> Path:
    """Encode a normal-form image dataset shard by shard and write one index file; see the module docstring.

    Args:
        model: the model that makes the codes; its config gives the scoring (`distance` overrides it).
        images: a dataset with an `image` column (labels and file paths are recorded when present).
        output: the index file to write.
        model_source, data: recorded in the file (where the model and the images are reloaded from).
        shard_size: images per shard (the unit of memory, of work per process and of resumption).
        backend: "exhaustive" (codes only) or "ivf" (coarse lists stored too; needs K = 256).
        nlist: IVF lists (default `ivf.default_nlist(N)`); train_size: k-means sample (default 64 x nlist).
        on_disk: with "ivf", also write faiss on-disk inverted lists to OUTPUT.ivf/.
        accelerator: split the shards over its processes (only the main process merges and returns).
        batch_size, num_workers, show_progress_bar: of the encoding.
        seed: of the k-means sample and of k-means.

    Returns:
        The path of the index file.

    Raises:
        build_lock.IndexBuildLocked: another build is writing `output`.
        ValueError: bad arguments, or a work folder of another build.
    """
    _check_arguments(shard_size, backend, nlist)
    output = Path(output)
    settings = SearchSettings.from_config(model.config, distance=distance)
    if backend == "ivf":
        CodeIndex(
            model.normalized_codebooks(), settings=settings, backend="ivf"
        )  # K = 256, asymmetric, or a clear error
    plan = BuildPlan(
        model=str(model_source),
        codebooks_sha256=codebooks_sha256(model.normalized_codebooks()),
        data=dict(data),
        num_items=len(images), shard_size=shard_size, distance=settings.distance,
        normalize_query_subvectors=settings.normalize_query_subvectors,
    )  # fmt: skip
    if plan.num_items == 0:
        raise ValueError("The dataset holds no images; nothing to index.")
    is_main = accelerator is None or accelerator.is_main_process
    lock = BuildLock(output)
    _on_main(accelerator, lambda: _prepare(lock, parts_folder(output), plan))
    try:
        _encode_missing_shards(model, images, plan, parts_folder(output), settings, accelerator,
                               batch_size, num_workers, show_progress_bar)  # fmt: skip
        _on_main(accelerator, lambda: _merge(plan, output, model, settings, backend, nlist, train_size,
                                             on_disk, seed, show_progress_bar))  # fmt: skip
    finally:
        if is_main:
            lock.release()
    return output


def _check_arguments(shard_size: int, backend: str, nlist: int | None) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r} (--shard-size).")
    if backend not in INDEX_BACKENDS:
        raise ValueError(f"backend must be one of {INDEX_BACKENDS}, got {backend!r} (--backend).")
    if nlist is not None and backend != "ivf":
        raise ValueError("nlist is an IVF setting: pass --backend ivf with --nlist.")
    if nlist is not None and (isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1):
        raise ValueError(f"nlist must be a positive integer, got {nlist!r} (--nlist).")


def _on_main(accelerator: Accelerator | None, step: Any) -> None:
    """Run `step` on the main process only; every process raises its error (and none waits forever)."""
    if accelerator is None:
        step()
        return
    from accelerate.utils import broadcast_object_list

    failure: list[Any] = [None]
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            step()
        except BaseException as caught:  # told to the other processes, then raised here
            error, failure[0] = caught, f"{type(caught).__name__}: {caught}"
    broadcast_object_list(failure, from_process=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise ValueError(f"The main process failed: {failure[0]}")


def _prepare(lock: BuildLock, folder: Path, plan: BuildPlan) -> None:
    """Take the lock, then create the work folder or check that it holds shards of this same build."""
    lock.acquire()
    try:
        plan_file = folder / "plan.json"
        if plan_file.is_file():
            recorded = read_json(plan_file, "Index build plan")
            different = sorted(key for key, value in plan.to_dict().items() if recorded.get(key) != value)
            if different:
                raise ValueError(
                    f"{folder} holds an interrupted build with other {', '.join(different)} than this one. "
                    "Run the same command as then to resume it, or delete the folder to start over."
                )
        else:
            write_json(plan_file, plan.to_dict())
        for stale in folder.glob(".shard-*.tmp"):  # the temp file of a shard whose writer was killed
            stale.unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise


def _shard_done(folder: Path, shard: int, plan: BuildPlan) -> bool:
    """Whether a shard file exists with the planned number of items (complete files only: atomic writes)."""
    from safetensors import safe_open

    path = shard_file(folder, shard)
    if not path.is_file():
        return False
    start, stop = plan.bounds(shard)
    try:
        with safe_open(path, framework="pt") as file:
            return (file.metadata() or {}).get("ntotal") == str(stop - start)
    except Exception:  # unreadable: encoded again
        return False


def _encode_missing_shards(
    model: MeCoQModel,
    images: Dataset,
    plan: BuildPlan,
    folder: Path,
    settings: SearchSettings,
    accelerator: Accelerator | None,
    batch_size: int,
    num_workers: int,
    show_progress_bar: bool,
) -> None:
    from tqdm.auto import tqdm

    from ..data.sources import class_names, image_paths
    from ..encoding import encode_images

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if accelerator is not None:
        model.to(accelerator.device)
    missing = [shard for shard in range(plan.num_shards) if not _shard_done(folder, shard, plan)]
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every rank has listed the missing shards before any is written
    mine = missing[rank::world]
    if world > 1:
        print(f"rank {rank}/{world} encodes shards {mine} of {plan.num_shards}", flush=True)
    names = class_names(images)
    for shard in tqdm(mine, desc=f"index shards (rank {rank})", disable=not show_progress_bar):
        start, stop = plan.bounds(shard)
        subset = images.select(range(start, stop))
        encoded = encode_images(model, subset, None, method="encode", batch_size=batch_size,
                                num_workers=num_workers, show_progress_bar=show_progress_bar)  # fmt: skip
        index = CodeIndex(model.normalized_codebooks(), settings=settings)
        index.add(encoded.outputs, ids=encoded.ids)
        sidecar = IndexSidecar.describe(
            model=plan.model, data=plan.data, ids=index.ids.tolist(),
            labels=encoded.labels.tolist() if encoded.labels is not None else None,
            class_names=names, paths=image_paths(subset),
        )  # fmt: skip
        index.save(shard_file(folder, shard), sidecar=sidecar)
    if accelerator is not None:
        accelerator.wait_for_everyone()


# the merge


def _merge(
    plan: BuildPlan,
    output: Path,
    model: MeCoQModel,
    settings: SearchSettings,
    backend: str,
    nlist: int | None,
    train_size: int | None,
    on_disk: bool,
    seed: int,
    show_progress_bar: bool,
) -> None:
    """Merge the shards of the work folder into `output` (streamed), add the IVF parts, delete the folder."""
    from tqdm.auto import tqdm

    folder = parts_folder(output)
    shards = [_read_shard(folder, shard, plan) for shard in tqdm(range(plan.num_shards), desc="check shards",
                                                                  disable=not show_progress_bar)]  # fmt: skip
    codewords = model.normalized_codebooks().detach().to("cpu", torch.float32)
    plans, metadata = _merged_plans(shards, codewords, settings, plan, show_progress_bar)
    if backend == "ivf":
        nlist = nlist if nlist is not None else ivf.default_nlist(plan.num_items)
        size = train_size or 64 * nlist
        centroids = _train_centroids(shards, codewords, nlist, size, seed, show_progress_bar)
        quantizer = ivf.coarse_quantizer(centroids)
        plans["ivf.centroids"] = TensorPlan.of(centroids)
        plans["ivf.lists"] = TensorPlan(torch.int32, (plan.num_items,), lambda: (
            ivf.assign_lists(shard.tensors["codes"], codewords, quantizer)
            for shard in tqdm(shards, desc="assign lists", disable=not show_progress_bar)
        ))  # fmt: skip
    written = write_index_file(output, plans, metadata)
    sidecar_path(written).unlink(missing_ok=True)  # a JSON sidecar of an older build would mislead
    if backend == "ivf" and on_disk:
        merged = read_index_file(written, verify=False)
        write_ondisk_lists_of(merged, show_progress_bar)
    elif ivf.ondisk_folder(written).is_dir():
        shutil.rmtree(ivf.ondisk_folder(written))  # lists of an earlier IVF build of this output
    shutil.rmtree(folder)


def write_ondisk_lists_of(file: IndexFile, show_progress_bar: bool = True) -> Path:
    """Write the on-disk inverted lists of an IVF index file (codes and lists read in chunks)."""
    codes, lists = file.tensors["codes"], file.tensors["ivf.lists"]
    chunks = ((codes[start : start + MERGE_CHUNK], lists[start : start + MERGE_CHUNK])
              for start in range(0, codes.shape[0], MERGE_CHUNK))  # fmt: skip
    return ivf.write_ondisk_lists(file.path, file.metadata["sha256"], file.tensors["codebooks"],
                                  file.tensors["ivf.centroids"], chunks, show_progress_bar)  # fmt: skip


def _read_shard(folder: Path, shard: int, plan: BuildPlan) -> IndexFile:
    path = shard_file(folder, shard)
    if not path.is_file():
        raise FileNotFoundError(
            f"Shard {path.name} of the build in {folder} is missing (a process was interrupted, or the file "
            "was deleted). Run the same `mecoq index build` command again to encode it and finish."
        )
    file = read_index_file(path)  # checksum verified
    start, stop = plan.bounds(shard)
    if file.metadata.get("ntotal") != str(stop - start):
        raise ValueError(
            f"{path} holds {file.metadata.get('ntotal')} items, planned {stop - start}; delete it."
        )
    if codebooks_sha256(file.tensors["codebooks"]) != plan.codebooks_sha256:
        raise ValueError(f"{path} was encoded with other codebooks than {plan.model}; delete {folder}.")
    return file


def _merged_plans(
    shards: list[IndexFile],
    codewords: torch.Tensor,
    settings: SearchSettings,
    plan: BuildPlan,
    show_progress_bar: bool = False,
) -> tuple[dict[str, TensorPlan], dict[str, str]]:
    """Tensor plans concatenating the shards (codes, ids, labels, paths) and the merged file's header."""
    first = shards[0]
    num_codebooks, codebook_size, subvector_dim = codewords.shape
    codes_dtype = first.tensors["codes"].dtype

    def concatenation(name: str, dtype: torch.dtype, row_shape: tuple[int, ...]) -> TensorPlan:
        return TensorPlan(
            dtype, (plan.num_items, *row_shape), lambda: (shard.tensors[name] for shard in shards)
        )

    def codes() -> Iterator[torch.Tensor]:
        from tqdm.auto import tqdm

        bar = tqdm(shards, desc="merge shards", disable=not show_progress_bar)
        return (shard.tensors["codes"] for shard in bar)

    plans = {
        "codebooks": TensorPlan.of(codewords),
        "codes": TensorPlan(codes_dtype, (plan.num_items, num_codebooks), codes),
        "ids": concatenation("ids", torch.int64, ()),
    }
    if "labels" in first.tensors:
        if any("labels" not in shard.tensors for shard in shards):
            raise ValueError(
                "Some shards carry labels and others do not; delete the work folder and rebuild."
            )
        labels = first.tensors["labels"]
        plans["labels"] = concatenation("labels", labels.dtype, tuple(labels.shape[1:]))
    if any("paths.bytes" in shard.tensors for shard in shards):
        plans.update(_path_plans(shards, plan.num_items))
    first_header = first.metadata
    sidecar = IndexSidecar(model=plan.model, data=plan.data, ids=[],
                           class_names=json.loads(first_header.get("class_names", "null")))  # fmt: skip
    metadata = {
        "num_codebooks": str(num_codebooks),
        "codebook_size": str(codebook_size),
        "subvector_dim": str(subvector_dim),
        "ntotal": str(plan.num_items),
        "distance": settings.distance,
        "normalize_query_subvectors": json.dumps(settings.normalize_query_subvectors),
        **describe_header(sidecar),
    }
    return plans, metadata


def _path_plans(shards: list[IndexFile], num_items: int) -> dict[str, TensorPlan]:
    """`paths.bytes` and `paths.offsets` of all shards; a shard without paths adds empty ones."""

    def offsets() -> Iterator[torch.Tensor]:
        total = 0
        yield torch.zeros(1, dtype=torch.int64)
        for shard in shards:
            count = int(shard.metadata["ntotal"])
            local = shard.tensors.get("paths.offsets", torch.zeros(count + 1, dtype=torch.int64))
            yield local[1:] + total
            total += int(local[-1])

    num_bytes = sum(
        int(shard.tensors["paths.bytes"].numel()) for shard in shards if "paths.bytes" in shard.tensors
    )
    return {
        "paths.bytes": TensorPlan(torch.uint8, (num_bytes,), lambda: (
            shard.tensors["paths.bytes"] for shard in shards if "paths.bytes" in shard.tensors
        )),
        "paths.offsets": TensorPlan(torch.int64, (num_items + 1,), offsets),
    }  # fmt: skip


def _train_centroids(
    shards: list[IndexFile], codewords: torch.Tensor, nlist: int, size: int, seed: int, verbose: bool
) -> torch.Tensor:
    """k-means centroids on a seeded uniform sample of `size` decoded codes drawn across all shards."""
    from ..models.mecoq.quantization import decode_codes

    counts = [int(shard.metadata["ntotal"]) for shard in shards]
    total = sum(counts)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[: min(size, total)].sort().values
    parts, start = [], 0
    for shard, count in zip(shards, counts):
        local = chosen[(chosen >= start) & (chosen < start + count)] - start
        parts.append(decode_codes(shard.tensors["codes"][local], codewords))
        start += count
    if verbose:
        print(f"k-means: {nlist} lists on {int(chosen.numel())} decoded codes", flush=True)
    return ivf.train_coarse_centroids(torch.cat(parts), nlist, seed=seed, verbose=verbose)


__all__ = ["DEFAULT_SHARD_SIZE", "INDEX_BACKENDS", "BuildPlan", "build_index", "parts_folder"]
