"""A Lance dataset of an index: ids, labels, paths and vectors, with an IVF_PQ index on our codebooks.

Lance (`pip install mecoq-hf[lance]`, the `pylance` package) stores float vectors and encodes them itself
with the PQ codebook it is given. We give it the *decoded* codes as vectors and our (M, 256, D) codebooks as
its `pq_codebook`: a decoded sub-vector is one of our unit-norm codewords, so Lance encodes it back to the
same code, and with `metric="dot"` (Lance scores `1 - <q, x>` and, unlike for L2 and cosine, does not
quantize residuals) it ranks exactly as our asymmetric search. The IVF partitions are the index's own coarse
centroids when it was built with `--backend ivf`, else one partition (an exhaustive scan).

Queries must be given as our search scores them: `scoring.inner_product_queries(q, M, settings)` (the
settings are in the dataset's schema metadata, `mecoq.normalize_query_subvectors`). Search with plain lance:

    dataset = lance.dataset("fmnist.lance")
    hits = dataset.to_table(nearest={"column": "vector", "q": query, "k": 10, "nprobes": N},
                            columns=["id", "label", "_distance"])
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..models.mecoq.quantization import decode_codes
from .image_index import ImageIndex

EXPORT_CHUNK = 65536  # rows decoded and written at once


def import_lance() -> Any:
    """The `lance` module, or an ImportError that says how to install it."""
    try:
        import lance
    except ImportError as error:
        raise ImportError(
            "The Lance export needs pylance: `pip install mecoq-hf[lance]` (or `pip install pylance`)."
        ) from error
    return lance


def _batches(index: ImageIndex, schema: Any) -> Iterator[Any]:
    import pyarrow as pa

    codes, ids, codewords = index.index.codes, index.index.ids, index.index.codewords
    sidecar = index.sidecar
    for start in range(0, codes.shape[0], EXPORT_CHUNK):
        stop = min(start + EXPORT_CHUNK, codes.shape[0])
        vectors = decode_codes(codes[start:stop], codewords).numpy()  # (n, d)
        columns = {
            "id": pa.array(ids[start:stop].numpy()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        }
        if sidecar is not None and sidecar.labels is not None:
            columns["label"] = pa.array(sidecar.labels[start:stop], type=schema.field("label").type)
        if sidecar is not None and sidecar.paths is not None:
            columns["path"] = pa.array(sidecar.paths[start:stop], type=pa.string())
        yield pa.record_batch([columns[field.name] for field in schema], schema=schema)


def _schema(index: ImageIndex) -> Any:
    import pyarrow as pa

    fields = [pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float32(), index.index.dim))]
    sidecar = index.sidecar
    if sidecar is not None and sidecar.labels is not None:
        multi_hot = bool(sidecar.labels) and isinstance(sidecar.labels[0], list)
        fields.append(pa.field("label", pa.list_(pa.int8()) if multi_hot else pa.int64()))
    if sidecar is not None and sidecar.paths is not None:
        fields.append(pa.field("path", pa.string()))
    settings = index.index.settings
    metadata = {
        "mecoq.distance": settings.distance,
        "mecoq.normalize_query_subvectors": str(settings.normalize_query_subvectors).lower(),
        "mecoq.num_codebooks": str(index.index.num_codebooks),
    }
    if sidecar is not None:
        metadata["mecoq.model"] = sidecar.model
        if sidecar.class_names:
            metadata["mecoq.class_names"] = ",".join(sidecar.class_names)
    return pa.schema(fields, metadata=metadata)


def export_lance(
    index_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    show_progress_bar: bool = True,
) -> Any:
    """Write the Lance dataset of an index file and its IVF_PQ index; returns the `lance.LanceDataset`.

    Args:
        index_path: an index file (`mecoq index build`, `CodeIndex.save`); K = 256 and asymmetric scoring.
        output: the dataset folder to write (conventionally `name.lance`).
        overwrite: replace an existing dataset instead of refusing.
        show_progress_bar: a bar over the rows written, and a line before Lance builds its index.

    Memory: `EXPORT_CHUNK` decoded rows at a time, plus what Lance holds while building its index.
    """
    lance = import_lance()
    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists; pass --overwrite (overwrite=True) to replace it.")
    index = ImageIndex.load(index_path, backend="native")
    codewords, settings = index.index.codewords, index.index.settings
    if codewords.shape[1] != 256 or settings.distance != "asymmetric":
        raise ValueError(
            "Lance's IVF_PQ stores 8-bit codes and scores asymmetrically: the index needs K = 256 codewords "
            f"and asymmetric search, got K = {codewords.shape[1]} and {settings.distance!r}."
        )
    if index.index.ntotal < 256:
        raise ValueError(
            f"Lance builds an IVF_PQ index from 256 rows or more; the index holds {index.index.ntotal}."
        )
    import pyarrow as pa

    schema = _schema(index)
    from tqdm.auto import tqdm

    batches = tqdm(_batches(index, schema), desc="lance rows", unit="batch", disable=not show_progress_bar,
                   total=-(-index.index.ntotal // EXPORT_CHUNK))  # fmt: skip
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    dataset = lance.write_dataset(reader, str(output), mode="overwrite" if overwrite else "create")
    centroids = index.index.stored_state("ivf").get("centroids")
    if centroids is None:
        centroids = torch.zeros(1, index.index.dim)  # one partition: every row scanned
    if show_progress_bar:
        print(f"Lance IVF_PQ index: {centroids.shape[0]} partitions, our codebooks {tuple(codewords.shape)}")
    dataset.create_index(
        "vector", "IVF_PQ", metric="dot", num_partitions=centroids.shape[0],
        ivf_centroids=centroids.to(torch.float32).numpy(), pq_codebook=codewords.numpy(),
        num_sub_vectors=codewords.shape[0], replace=True,
    )  # fmt: skip
    return lance.dataset(str(output))


__all__ = ["export_lance", "import_lance"]
