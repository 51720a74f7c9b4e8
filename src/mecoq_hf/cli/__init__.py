"""The `mecoq` command line (see `mecoq --help`)."""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
