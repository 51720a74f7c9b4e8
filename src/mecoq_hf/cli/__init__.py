"""The `mecoq` command line: train, encode, index, search, evaluate and share MeCoQ models.

    mecoq train --dataset fashion-mnist --output-dir runs/fmnist --image-size 64 --bits 32 --epochs 5
    mecoq evaluate runs/fmnist --output metrics.json --pr-curve pr.png --baseline pq
    mecoq index build runs/fmnist --dataset fashion-mnist --output index.safetensors
    mecoq search index.safetensors --image shoe.png --top-k 10 --grid results.png
    mecoq encode runs/fmnist --dataset ./my_images --output codes.safetensors
    mecoq push runs/fmnist user/mecoq-fmnist --metrics metrics.json

Each command is thin: flags -> one or a few library calls -> printed results. The work is done by `training`
(run settings, a run folder's records, the loop, the final evaluation), `data`, `encoding`, `retrieval` (the
code index and its sidecar), `visualization` and `hub`.

Multi-process: `accelerate launch [launch flags] -m mecoq_hf.cli train ...` (or `$(which mecoq)` in place of
`-m mecoq_hf.cli`); see `configs/accelerate/README.md`. Bad input prints one line `mecoq <command>: error:
...` and exits with status 2; `mecoq --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from .app import _app_parsers
from .common import EXIT_USAGE, _debug_option
from .evaluate import _evaluate_parser
from .hub import _hub_parsers
from .index import _data_command_parsers
from .train import _train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mecoq",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `mecoq COMMAND --help` for the options of a command.",
    )
    _debug_option(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _train_parser(commands)
    _evaluate_parser(commands)
    _data_command_parsers(commands)
    _hub_parsers(commands)
    _app_parsers(commands)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that bad input causes: printed as one line (exit status 2) unless --debug."""
    import yaml
    from huggingface_hub.errors import StrictDataclassError

    from ..hub import HubUploadError

    return (
        ValueError,
        TypeError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        ConnectionError,
        FloatingPointError,
        HubUploadError,
        StrictDataclassError,
        yaml.YAMLError,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mecoq` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "mecoq " + " ".join(
        part for part in (args.command, getattr(args, "index_command", None)) if part
    )
    try:
        return args.handler(args)
    except _user_errors() as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{command}: error: {message} (run `mecoq --debug ...` for the traceback)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
