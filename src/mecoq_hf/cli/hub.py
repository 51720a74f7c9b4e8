"""`mecoq push`, `mecoq card` and `mecoq push-index`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..file_io import write_atomic
from .common import _subparser


def cmd_push(args: argparse.Namespace) -> int:
    from ..hub import model_files, push_model_to_hub
    from ..training import RunFolder

    folder = Path(args.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist.")
    files = model_files(folder, args.include or ())
    sizes = {name: (folder / name).stat().st_size for name in files}
    listing = "\n".join(f"  {name}  ({_size(size)})" for name, size in sizes.items())
    total = _size(sum(sizes.values()))
    print(f"Uploading {len(files)} files ({total}) of {folder} to {args.repo_id}:\n{listing}")
    if args.dry_run:
        print("Dry run: nothing was uploaded.")
        return 0
    commit = push_model_to_hub(
        folder,
        args.repo_id,
        run_record=RunFolder(folder).card_record(args.metrics),
        token=args.token,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        include=args.include or (),
    )
    print(f"Pushed {folder} to {args.repo_id}: {commit.commit_url}")
    return 0


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def cmd_card(args: argparse.Namespace) -> int:
    from ..model_card import build_model_card
    from ..training import RunFolder

    run = RunFolder(args.model)
    record = run.card_record(args.metrics)
    if record is None:
        raise FileNotFoundError(
            f"{run.path} has no run record: `mecoq card` needs a folder written by mecoq train, or --metrics."
        )
    output = Path(args.output) if args.output else run.path / "README.md"
    card = build_model_card(record, repo_id=args.repo_id)
    write_atomic(output, lambda name: card.save(name))
    print(f"Model card written to {output}")
    return 0


def cmd_push_index(args: argparse.Namespace) -> int:
    from ..hub import push_index_to_hub

    commit = push_index_to_hub(
        args.index,
        args.repo_id,
        path_in_repo=args.path_in_repo or Path(args.index).name,
        repo_type=args.repo_type,
        token=args.token,
        private=args.private,
    )
    print(f"Pushed {args.index} to the {args.repo_type} repo {args.repo_id}: {commit.commit_url}")
    return 0


def _hub_parsers(commands: Any) -> None:
    push = _subparser(
        commands,
        "push",
        cmd_push,
        "push a model folder to the Hub",
        (
            "Push a model folder with its model card (built from run_record.json) in one commit. Only\n"
            "the model's files go (config, weights, codebooks, preprocessor config, remote code and\n"
            "README.md), listed first; checkpoints, feature caches, logs and indexes stay local unless\n"
            "named with --include."
        ),
    )
    push.add_argument("model", metavar="MODEL_DIR")
    push.add_argument("repo_id", metavar="REPO_ID", help="namespace/name")
    push.add_argument(
        "--include",
        action="append",
        metavar="PATH",
        help="also upload this file of MODEL_DIR (a path or glob relative to it, e.g. metrics.json; "
        "repeatable)",
    )
    push.add_argument(
        "--dry-run", action="store_true", help="list the files that would be uploaded, and stop"
    )
    push.add_argument(
        "--metrics", metavar="metrics.json", help="a mecoq evaluate --output file to report on the card"
    )
    push.add_argument("--revision", help="branch (created if missing; default main)")
    push.add_argument("--commit-message")
    card = _subparser(
        commands,
        "card",
        cmd_card,
        "write the model card of a model folder",
        "Render the model card (what MeCoQ is, backbone and weights licence, bits, hyperparameters, mAP\n"
        "results as model-index entries) from run_record.json, by default into MODEL_DIR/README.md.",
    )
    card.add_argument("model", metavar="MODEL_DIR")
    card.add_argument(
        "--metrics", metavar="metrics.json", help="a mecoq evaluate --output file to report on the card"
    )
    card.add_argument(
        "--repo-id", metavar="REPO_ID", help="the repo the card will live in (for its usage snippet)"
    )
    card.add_argument("--output", metavar="FILE", help="default: MODEL_DIR/README.md")
    push_index = _subparser(
        commands,
        "push-index",
        cmd_push_index,
        "push an index file to the Hub",
        "Upload a CodeIndex file (checked first) to a dataset (default) or model repo.",
    )
    push_index.add_argument("index", metavar="INDEX")
    push_index.add_argument("repo_id", metavar="REPO_ID")
    push_index.add_argument("--repo-type", choices=("dataset", "model"), default="dataset")
    push_index.add_argument("--path-in-repo", help="default: the file's name")
    for parser in (push, push_index):
        parser.add_argument("--token", help="Hub token (default: the saved login)")
        parser.add_argument("--private", action="store_true", help="create the repo as private")


__all__ = ["cmd_card", "cmd_push", "cmd_push_index"]
