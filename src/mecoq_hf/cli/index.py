"""`mecoq encode`, `mecoq index build`, `mecoq index export-lance` and `mecoq search`."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..models.mecoq.configuration_mecoq import DISTANCES
from ..retrieval.backends import BACKENDS
from ..retrieval.sharded_build import DEFAULT_SHARD_SIZE, INDEX_BACKENDS
from .common import (
    Handler,
    _data_options,
    _encoding_options,
    _finish,
    _model_and_images,
    _run_options,
    _say,
    _subparser,
)


def cmd_encode(args: argparse.Namespace) -> int:
    from ..encoding import encode_images, quantize_embeddings, save_encoded

    model, data, accelerator, images = _model_and_images(args)
    method = "embed" if args.embeddings else "encode"
    encoded = encode_images(model, images, accelerator, method=method, **_encoding_options(args))
    codes, embeddings = encoded.outputs, None
    if args.embeddings:  # one pass: the codes are the hard quantization of the embeddings (as `model.encode`)
        codes, embeddings = quantize_embeddings(model, encoded.outputs), encoded.outputs
    if accelerator.is_main_process:
        metadata = {
            "model": str(args.model),
            "data": json.dumps(data.to_dict()),
            "num_codebooks": str(model.config.num_codebooks),
            "codebook_size": str(model.config.codebook_size),
        }
        ids = encoded.ids if encoded.ids is not None else torch.arange(len(images))
        save_encoded(args.output, codes, ids, labels=encoded.labels, embeddings=embeddings, metadata=metadata)
    _finish(accelerator)
    _say(
        accelerator,
        f"Encoded {codes.shape[0]} images of {data.name} into {codes.shape[1]}-byte codes: {args.output}",
    )
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from ..retrieval.sharded_build import build_index

    model, data, accelerator, images = _model_and_images(args)
    output = build_index(
        model, images, output=args.output, model_source=args.model, data=data.to_dict(),
        shard_size=args.shard_size, backend=args.backend, nlist=args.nlist, train_size=args.train_size,
        on_disk=not args.no_on_disk, distance=args.distance, accelerator=accelerator,
        **_encoding_options(args),
    )  # fmt: skip
    _finish(accelerator)
    if accelerator.is_main_process:
        from ..retrieval.index import CodeIndex

        index = CodeIndex.load(output, verify=False)
        lists = index.stored_state("ivf").get("centroids")
        kind = f"IVF, {lists.shape[0]} lists" if lists is not None else "exhaustive"
        _say(accelerator, f"Indexed {index.ntotal} images of {data.name} ({kind}, {index.settings.distance} "
                          f"search): {output}")  # fmt: skip
    return 0


def cmd_index_export_lance(args: argparse.Namespace) -> int:
    from ..retrieval.lance_export import export_lance

    progress = not args.no_progress
    dataset = export_lance(args.index, args.output, overwrite=args.overwrite, show_progress_bar=progress)
    rows = dataset.count_rows()
    print(f"Wrote a Lance dataset of {rows} rows with an IVF_PQ index (metric dot): {args.output}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..retrieval.image_index import ImageIndex, default_backend, read_image

    backend = args.backend or default_backend(args.index)
    if args.nprobe is not None and backend != "ivf":
        raise ValueError(
            f"--nprobe is an IVF setting, but {args.index} is searched with the exhaustive {backend!r} "
            "backend. Rebuild it with `mecoq index build ... --backend ivf`, or drop --nprobe."
        )
    options = {"nprobe": args.nprobe} if args.nprobe is not None else {}
    index = ImageIndex.load(args.index, backend=backend, **options)
    model = index.load_model(args.model)
    query_image = read_image(args.image)
    hits = index.search(model, query_image, k=args.top_k)
    codes = index.index
    with_paths = index.sidecar is not None and index.sidecar.paths is not None
    print(f"Top {len(hits)} of {codes.ntotal} for {args.image} ({codes.settings.distance} scores):")
    print(f"{'rank':>4}  {'id':>8}  {'score':>9}  label" + ("  path" if with_paths else ""))
    for rank, hit in enumerate(hits, start=1):
        label = hit.label if hit.label is not None else "-"
        print(f"{rank:>4}  {hit.id:>8}  {hit.score:>9.4f}  {label}" + (f"  {hit.path}" if with_paths else ""))
    if args.grid:
        from ..visualization import save_retrieval_grid

        ids, scores = [hit.id for hit in hits], [hit.score for hit in hits]
        labels = None if any(hit.label is None for hit in hits) else [hit.label for hit in hits]
        save_retrieval_grid(query_image, index.images(ids), scores, labels, args.grid)
        print(f"Grid written to {args.grid}")
    return 0


def _encoding_parser(
    commands: Any, name: str, handler: Handler, help_text: str, description: str, output: str
) -> argparse.ArgumentParser:
    """A command that runs MODEL_DIR over a dataset and writes `--output`."""
    parser = _subparser(commands, name, handler, help_text, description)
    parser.add_argument("model", metavar="MODEL_DIR")
    parser.add_argument("--output", required=True, metavar=output)
    _data_options(parser, required=True)
    _run_options(parser)
    return parser


def _data_command_parsers(commands: Any) -> None:
    encode = _encoding_parser(
        commands,
        "encode",
        cmd_encode,
        "encode a dataset into codes (safetensors)",
        "Hard-code every image of a dataset: codes (N, M), ids (the dataset's index column) and labels.",
        "codes.safetensors",
    )
    encode.add_argument("--embeddings", action="store_true", help="also store the embeddings (N, d)")

    index = commands.add_parser("index", help="build a searchable code index", description="Code indexes.")
    builders = index.add_subparsers(dest="index_command", metavar="{build,export-lance}", required=True)
    build = _encoding_parser(
        builders,
        "build",
        cmd_index_build,
        "encode a dataset into a CodeIndex",
        (
            "Encode a dataset and write one CodeIndex file (ids = the dataset's index column) holding\n"
            "the codes and, under the same checksum, the labels, image paths and data source that\n"
            "mecoq search prints. The dataset is encoded in shards (OUTPUT.parts/, removed at the end):\n"
            "an interrupted build resumes when the same command is run again, and under\n"
            "`accelerate launch` each process encodes its own shards. --backend ivf adds coarse lists\n"
            "(and on-disk inverted lists in OUTPUT.ivf/)."
        ),
        "index.safetensors",
    )
    build.add_argument("--distance", choices=DISTANCES, help="default: the model's config")
    build.add_argument(
        "--backend", choices=INDEX_BACKENDS, default="exhaustive",
        help="exhaustive: every code scanned; ivf: faiss IVF lists over the codes (default: exhaustive)",
    )  # fmt: skip
    build.add_argument(
        "--nlist", type=int, metavar="N", help="IVF lists (default: sqrt(N) as a power of two)"
    )
    build.add_argument("--train-size", type=int, metavar="N", help="IVF k-means sample (default 64 x nlist)")
    build.add_argument("--no-on-disk", action="store_true", help="IVF: do not write on-disk inverted lists")
    build.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
        help=f"images per shard: the memory bound and the unit of resumption (default {DEFAULT_SHARD_SIZE})",
    )  # fmt: skip

    export = _subparser(
        builders,
        "export-lance",
        cmd_index_export_lance,
        "write a Lance dataset with an IVF_PQ index on the learned codebooks",
        (
            "Write a Lance dataset (id, label, path, vector = the decoded codes) and an IVF_PQ index\n"
            "built from the index's own codebooks and lists (metric dot), searchable with plain\n"
            "`lance` / `lancedb`.\n"
            "Needs `pip install mecoq-hf[lance]`."
        ),
    )
    export.add_argument("index", metavar="INDEX", help="an index written by mecoq index build")
    export.add_argument("--output", required=True, metavar="DIR.lance", help="the Lance dataset to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    export.add_argument("--no-progress", action="store_true", help="hide progress bars")

    search = _subparser(
        commands,
        "search",
        cmd_search,
        "search an index with an image",
        "Print the ranked ids, labels and scores of an image's nearest items; optionally draw a grid.",
    )
    search.add_argument("index", metavar="INDEX", help="an index written by mecoq index build")
    search.add_argument("--model", metavar="MODEL_DIR", help="default: the model recorded in INDEX.meta.json")
    search.add_argument("--image", required=True, metavar="PATH", help="the query image")
    search.add_argument("--top-k", type=int, default=10, metavar="K", help="number of results (default 10)")
    search.add_argument("--grid", metavar="out.png", help="write a PNG of the query and its results")
    search.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        help="; ".join(f"{name}: {backend.description}" for name, backend in BACKENDS.items())
        + " (default: ivf for an index built with --backend ivf, else the faster exhaustive one)",
    )
    search.add_argument("--nprobe", type=int, metavar="P", help="IVF lists scanned per query (default 16)")
