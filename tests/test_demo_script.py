"""`make demo` (examples/demo_fashion_mnist.sh) takes minutes, so the suite checks its parts instead: every
`mecoq` command in it parses with the real CLI parser, and its inline Python runs. (The demo itself is run
before each release and its card committed; see model_cards/.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mecoq_hf.cli import build_parser

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo_fashion_mnist.sh"


def demo_lines(out: Path) -> list[str]:
    """The script's logical lines (backslash continuations joined), with $OUT and $BIN filled in."""
    text = DEMO.read_text().replace("\\\n", " ")
    return [line.replace('"$OUT', f'"{out}').replace('"$BIN/', '"') for line in text.splitlines()]


def mecoq_commands(out: Path) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in demo_lines(out) if line.strip().startswith('"mecoq"')]


def inline_python(out: Path) -> list[tuple[str, list[str]]]:
    """(code, arguments) of every `"$BIN/python" - ARGS <<'PY' ... PY` block."""
    text = DEMO.read_text().replace("$OUT", str(out))
    return [(code, shlex.split(args)) for args, code in
            re.findall(r'"\$BIN/python" - (.*?) <<\'PY\'\n(.*?)\nPY\n', text, flags=re.S)]  # fmt: skip


def test_the_demo_runs_every_step_through_the_cli(tmp_path):
    commands = [argv[0] for argv in mecoq_commands(tmp_path)]
    assert commands == ["train", "evaluate", "index", "search", "card"]


@pytest.mark.parametrize("step", range(5))
def test_every_mecoq_command_of_the_demo_parses(tmp_path, step):
    argv = mecoq_commands(tmp_path)[step]
    args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown or bad flag
    assert callable(args.handler)


def test_the_demos_inline_python_runs(tmp_path):
    blocks = inline_python(tmp_path)
    assert len(blocks) == 1
    code, arguments = blocks[0]
    subprocess.run([sys.executable, "-", *arguments], input=code, text=True, check=True, timeout=120)
    assert Image.open(tmp_path / "query.png").size == (28, 28)
