"""`mecoq encode`, `mecoq index build` and `mecoq search`."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..models.mecoq.configuration_mecoq import DISTANCES
from ..retrieval.backends import BACKENDS
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
    from ..retrieval.image_index import ImageIndex
    from ..retrieval.sidecar import sidecar_path

    model, data, accelerator, images = _model_and_images(args)
    built = ImageIndex.build(
        model, images, model_source=args.model, data=data.to_dict(), accelerator=accelerator,
        distance=args.distance, **_encoding_options(args),
    )  # fmt: skip
    if accelerator.is_main_process:
        built.save(args.output)
    _finish(accelerator)
    _say(
        accelerator,
        f"Indexed {built.index.ntotal} images of {data.name} ({built.index.settings.distance} search): "
        f"{args.output} (+ {sidecar_path(args.output).name})",
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..retrieval.image_index import ImageIndex, read_image

    index = ImageIndex.load(args.index, backend=args.backend)
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
    builders = index.add_subparsers(dest="index_command", metavar="{build}", required=True)
    build = _encoding_parser(
        builders,
        "build",
        cmd_index_build,
        "encode a dataset into a CodeIndex",
        (
            "Encode a dataset and write a CodeIndex (ids = the dataset's index column) plus INDEX.meta.json\n"
            "with the labels, image paths and data source, which mecoq search prints and draws."
        ),
        "index.safetensors",
    )
    build.add_argument("--distance", choices=DISTANCES, help="default: the model's config")

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
        default="native",
        help="; ".join(f"{name}: {backend.description}" for name, backend in BACKENDS.items())
        + " (default: native)",
    )
