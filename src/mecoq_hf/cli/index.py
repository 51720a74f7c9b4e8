"""`mecoq encode`, `mecoq index build` and `mecoq search`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..data.sources import DataSource
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
    from ..data.sources import class_names, image_paths
    from ..encoding import encode_images
    from ..retrieval.index import CodeIndex, save_sidecar, sidecar_path

    model, data, accelerator, images = _model_and_images(args)
    encoded = encode_images(model, images, accelerator, method="encode", **_encoding_options(args))
    index = CodeIndex(
        model.codebooks(),
        distance=args.distance or model.config.distance,
        normalize_query_subvectors=model.config.normalize_query_subvectors,
    )
    index.add(encoded.outputs, ids=encoded.ids)
    if accelerator.is_main_process:
        index.save(args.output)
        labels = encoded.labels.tolist() if encoded.labels is not None else None
        save_sidecar(args.output, model=args.model, data=data.to_dict(), ids=index.ids.tolist(), labels=labels,
                     class_names=class_names(images), paths=image_paths(images))  # fmt: skip
    _finish(accelerator)
    _say(
        accelerator,
        f"Indexed {index.ntotal} images of {data.name} ({index.distance} search): {args.output} "
        f"(+ {sidecar_path(args.output).name})",
    )
    return 0


def _label_text(label: Any, class_names: list[str] | None) -> str:
    if isinstance(label, list):  # multi-hot
        return ",".join(class_names[i] if class_names else str(i) for i, on in enumerate(label) if on) or "-"
    return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)


def _labels_of(ids: list[int], sidecar: dict[str, Any] | None) -> list[str] | None:
    if not sidecar or sidecar.get("labels") is None:
        return None
    by_id = dict(zip(sidecar["ids"], sidecar["labels"]))
    return [_label_text(by_id[item], sidecar.get("class_names")) if item in by_id else "-" for item in ids]


def cmd_search(args: argparse.Namespace) -> int:
    from ..data.sources import decode_image
    from ..data.transforms import build_eval_transform
    from ..hub import load_model
    from ..retrieval.index import CodeIndex, load_sidecar, sidecar_path

    if not Path(args.index).is_file():
        raise FileNotFoundError(f"Index file {args.index} does not exist; build it with `mecoq index build`.")
    index = CodeIndex.load(args.index)
    sidecar = load_sidecar(args.index)
    model_source = args.model or (sidecar or {}).get("model")
    if model_source is None:
        raise ValueError(
            f"No model: pass --model MODEL_DIR (the index has no {sidecar_path(args.index).name})."
        )
    model = load_model(model_source)
    codebooks = model.codebooks()
    if codebooks.shape != index.codebooks.shape or not torch.allclose(codebooks, index.codebooks, atol=1e-5):
        raise ValueError(
            f"{args.index} was built with other codebooks than the model {model_source}: pass the "
            "model the index was built with (mecoq index build MODEL_DIR ...)."
        )
    image_path = Path(args.image).expanduser()
    if not image_path.is_file():
        raise FileNotFoundError(f"Query image {image_path} does not exist.")
    query_image = decode_image({"bytes": None, "path": str(image_path)}, str(image_path))
    with torch.no_grad():
        query = model.embed(build_eval_transform(model.backbone.data_config)(query_image)[None])  # (1, d)
    scores, ids = index.search(query, k=args.top_k)
    found = ids[0] >= 0
    scores, ids = scores[0][found].tolist(), ids[0][found].tolist()
    labels = _labels_of(ids, sidecar)
    paths = dict(zip(sidecar["ids"], sidecar["paths"])) if sidecar and sidecar.get("paths") else {}
    print(f"Top {len(ids)} of {index.ntotal} for {args.image} ({index.distance} scores):")
    print(f"{'rank':>4}  {'id':>8}  {'score':>9}  label" + ("  path" if paths else ""))
    for rank, (item, score) in enumerate(zip(ids, scores), start=1):
        label = labels[rank - 1] if labels else "-"
        print(f"{rank:>4}  {item:>8}  {score:>9.4f}  {label}" + (f"  {paths.get(item)}" if paths else ""))
    if args.grid:
        from ..visualization import save_retrieval_grid

        if sidecar is None:
            raise ValueError(
                f"--grid needs the database images, recorded in {sidecar_path(args.index).name} by "
                "`mecoq index build`; it is missing."
            )
        results = DataSource(**sidecar["data"]).images_by_id(ids)
        save_retrieval_grid(query_image, results, scores, labels, args.grid)
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
            "Encode a dataset and write a CodeIndex (ids = the dataset's index column) plus INDEX.meta.json with\n"
            "the labels, image paths and data source, which mecoq search prints and draws."
        ),
        "index.safetensors",
    )
    build.add_argument("--distance", choices=("asymmetric", "symmetric"), help="default: the model's config")

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
