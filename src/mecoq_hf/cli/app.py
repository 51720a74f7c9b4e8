"""`mecoq app` (serve the search page) and `mecoq push-app` (publish it as a Hugging Face Space)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..retrieval.backends import BACKENDS
from .common import EXIT_USAGE, _subparser

INSTALL_HINT = 'pip install "mecoq-hf[app]"'


def cmd_app(args: argparse.Namespace) -> int:
    try:
        from ..app.page import build_page, launch_page
    except ImportError as error:
        if error.name != "gradio" and not str(error.name).startswith("gradio."):
            raise
        print(f"mecoq app: error: the search page needs gradio: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_USAGE
    if args.port is not None and not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}.")
    page = build_page(args.model, args.index, args.images, metrics=args.metrics, top_k=args.top_k,
                      examples=args.examples, backend=args.backend)  # fmt: skip
    engine = page.search_page.engine
    problem = page.search_page.problem if engine is None else engine.image_problem
    if problem:
        print(f"mecoq app: warning: {problem}", file=sys.stderr)
    url = launch_page(page, args.host, args.port, block=False)
    print(f"Search page of {args.model} on {url} (Ctrl+C stops it)", flush=True)
    page.block_thread()
    return 0


def cmd_push_app(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..app.space import image_source_note, push_space, write_space

    options = {"images": args.images, "bundle_images": args.bundle_images, "title": args.title}
    note = (
        image_source_note(args.index, args.images, args.bundle_images) if Path(args.index).is_file() else None
    )
    if note:
        print(f"mecoq push-app: warning: {note}", file=sys.stderr)
    if args.output_dir:
        written = write_space(args.output_dir, args.model, args.index, **options)
        print(f"Space files written to {args.output_dir}: {', '.join(Path(p).name for p in written)}")
        return 0
    if args.space is None:
        raise ValueError("Pass SPACE_ID (namespace/name) to push the Space, or --output-dir DIR to write it.")
    commit = push_space(args.space, args.model, args.index, token=args.token, private=args.private,
                        commit_message=args.commit_message, **options)  # fmt: skip
    print(f"Pushed the search page of {args.model} to the Space {args.space}: {commit.commit_url}")
    return 0


def _app_parsers(commands: Any) -> None:
    app = _subparser(
        commands,
        "app",
        cmd_app,
        "serve the search page of a model and its index (gradio)",
        "Serve a page where you drop an image and see its nearest neighbours in INDEX (rank, score, id and\n"
        "label), with the model's bits, bytes per image and mAP. Needs gradio: " + INSTALL_HINT + ".",
    )
    app.add_argument("model", metavar="MODEL_DIR_OR_REPO", help="a model folder or a Hub id namespace/name")
    app.add_argument("--index", required=True, metavar="INDEX", help="an index written by mecoq index build")
    app.add_argument(
        "--images",
        metavar="SOURCE",
        help="where to load the indexed images from (default: the source recorded in INDEX.meta.json)",
    )
    app.add_argument(
        "--metrics",
        metavar="metrics.json",
        help="mecoq evaluate --output file (default MODEL_DIR/metrics.json)",
    )
    app.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        help="search backend of the index (default: as mecoq search: ivf for an IVF index, else the faster "
        "exhaustive one)",
    )
    app.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)"
    )
    app.add_argument("--port", type=int, metavar="N", help="default: the first free port from 7860")
    app.add_argument(
        "--top-k", type=int, default=10, metavar="K", help="initial number of results (default 10)"
    )
    app.add_argument(
        "--examples", type=int, default=8, metavar="N", help="database images offered as examples"
    )

    push = _subparser(
        commands,
        "push-app",
        cmd_push_app,
        "push the search page to a Hugging Face Space",
        "Write the search page as a Space (app.py, README.md with `sdk: gradio` and `models: MODEL_REPO`,\n"
        "requirements.txt, the index) and upload it to SPACE_ID in one commit. MODEL_REPO is the model's\n"
        "Hub repo (mecoq push MODEL_DIR MODEL_REPO); the index is checked against its codebooks first.",
    )
    push.add_argument("model", metavar="MODEL_REPO", help="the model's Hub repo id namespace/name")
    push.add_argument("space", metavar="SPACE_ID", nargs="?", help="the Space repo id namespace/name")
    push.add_argument("--index", required=True, metavar="INDEX", help="an index written by mecoq index build")
    images = push.add_mutually_exclusive_group()
    images.add_argument("--images", metavar="SOURCE", help="a Hub dataset the Space loads the images from")
    images.add_argument(
        "--bundle-images", action="store_true", help="upload the indexed images with the Space (images/)"
    )
    push.add_argument("--title", help="the Space's title (default: MeCoQ image search: <model name>)")
    push.add_argument("--output-dir", metavar="DIR", help="only write the Space files into DIR, push nothing")
    push.add_argument("--commit-message")
    push.add_argument("--token", help="Hub token (default: the saved login)")
    push.add_argument("--private", action="store_true", help="create the Space as private")
