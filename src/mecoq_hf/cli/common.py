"""What the `mecoq` commands share: argument groups, the launch's Accelerator, a model and its images."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..data.sources import DataSource
from ..data.splits import PROTOCOLS, SplitDefinition

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset

    from ..models.mecoq.modeling_mecoq import MeCoQModel

EXIT_USAGE = 2
Handler = Callable[[argparse.Namespace], int]  # a command: parsed arguments -> exit status
DATA_FLAGS = {  # data setting (`SplitDefinition` field) -> flag, of `mecoq train` and `mecoq evaluate`
    "source": "dataset",
    "split": "split",
    "limit": "limit",
    "image_column": "image_column",
    "label_column": "label_column",
    "protocol": "protocol",
    "num_train": "train_size",
    "num_query": "num_query",
    "num_validation": "num_validation",
    "seed": "seed",
    "on_bad_image": "on_bad_image",
}


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """setting -> value of the flags (setting -> flag name) that were given; None means not given."""
    return {key: getattr(args, flag) for key, flag in flags.items() if getattr(args, flag) is not None}


def _say(accelerator: Accelerator | None, message: str) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(message, flush=True)


def _finish(accelerator: Accelerator) -> None:
    """Let every process reach the end, then tear the process group down (avoids an abort at exit)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _accelerator() -> Accelerator:
    """The Accelerator of the current launch (one process under plain `mecoq`), built as for training so
    that several processes on a CPU-only machine are joined over gloo; it logs nothing and saves no state."""
    from ..training import TrainingArguments, build_accelerator

    return build_accelerator(TrainingArguments(output_dir=os.getcwd(), report_to=[]))


def _model_and_images(args: argparse.Namespace) -> tuple[MeCoQModel, DataSource, Accelerator, Dataset]:
    """The model, the data source of the data flags, the launch's Accelerator and the source's images."""
    from ..models.loading import load_model

    model = load_model(args.model)
    data = DataSource(
        args.dataset, args.split, args.limit, args.image_column or "image", args.label_column or "label",
        on_bad_image=args.on_bad_image or "raise",
    )  # fmt: skip
    accelerator = _accelerator()
    with accelerator.main_process_first():
        images = data.load()
    _report_skipped(accelerator, data.skipped_images)
    return model, data, accelerator, images


def _report_skipped(accelerator: Accelerator | None, skipped: list[str]) -> None:
    """List the unreadable images that --on-bad-image skip dropped (one line each)."""
    if skipped:
        lines = "\n".join(f"  {line}" for line in skipped)
        _say(accelerator, f"Skipped {len(skipped)} unreadable image(s) (--on-bad-image skip):\n{lines}")


def _encoding_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "show_progress_bar": not args.no_progress,
    }


def _data_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        required=required,
        metavar="SOURCE",
        help="fashion-mnist, an image folder (<root>/<class>/<images>), a save_to_disk folder, or a "
        "Hub dataset name (where the Hub is reachable)",
    )
    group.add_argument("--split", help="split of a multi-split source (e.g. test; train+test concatenates)")
    group.add_argument("--limit", type=int, metavar="N", help="use only the first N images of the source")
    group.add_argument("--image-column", help="image column of the source (default: image)")
    group.add_argument(
        "--label-column", help="label column (default: label, or labels; none: unlabelled images)"
    )
    group.add_argument(
        "--on-bad-image",
        choices=("raise", "skip"),
        help="an unreadable image file: stop with an error naming it (raise, the default), or skip it and "
        "list the skipped files",
    )


def _split_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("splits (query / validation / database / train)")
    defaults = SplitDefinition  # the defaults of the data settings are SplitDefinition's
    group.add_argument(
        "--protocol", choices=PROTOCOLS, help=f"how to split (default: {defaults.protocol}, per class)"
    )
    group.add_argument(
        "--num-query", type=int, metavar="N", help=f"query (test) images (default {defaults.num_query})"
    )
    group.add_argument(
        "--num-validation",
        type=int,
        metavar="N",
        help="validation queries for model selection, disjoint from the queries (default "
        f"{defaults.num_validation}; 0: none)",
    )
    group.add_argument(
        "--train-size",
        type=int,
        metavar="N",
        help="training images, drawn from the database (default: the whole database)",
    )
    group.add_argument(
        "--seed",
        type=int,
        help=f"seed of the split draw (and, for train, of training; default {defaults.seed})",
    )


def _run_options(parser: argparse.ArgumentParser, batch_size: int | None = 128) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size, metavar="B", help="images per batch")
    parser.add_argument("--num-workers", type=int, default=0, metavar="N", help="DataLoader worker processes")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _debug_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the full traceback of errors instead of a one-line message",
    )


def _subparser(
    commands: Any, name: str, handler: Handler, help_text: str, description: str
) -> argparse.ArgumentParser:
    """The parser of one command; `main` calls `handler(args)` when it is chosen."""
    parser = commands.add_parser(
        name, help=help_text, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(handler=handler)
    _debug_option(parser, argparse.SUPPRESS)  # SUPPRESS: a `mecoq --debug cmd` is not reset by the subcommand
    return parser


__all__ = ["DATA_FLAGS", "EXIT_USAGE", "Handler"]
