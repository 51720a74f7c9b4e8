"""The search page: drop an image and see its nearest neighbours in a MeCoQ code index (a gradio `Blocks`).

`build_page(model, index, images)` loads everything through `app.search` and lays out the page: the model
card's headline numbers, the query image (uploaded, pasted, or one of a few database examples), the number of
results k, and the results as a gallery (rank, label, score and id under each image) plus a table. Problems a
user can fix are messages in the page, never a dead server: a file that is not an image, an index built with
other codebooks than the model (the page then explains it and searches nothing), or images that cannot be
loaded (results are then listed without pictures). `launch_page` serves it on 127.0.0.1 and nothing is sent
elsewhere: no analytics, no share link, no server-side rendering, the theme's fonts from gradio's own files.

The logic of a request is `SearchPage.answer(upload, k)`, plain Python that tests call without a browser.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from .search import (
    Headline,
    IndexModelMismatchError,
    Neighbour,
    SearchEngine,
    describe_source,
    headline_numbers,
    open_search,
    read_query_image,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_TOP_K = 10
MAX_TOP_K = 100
DEFAULT_EXAMPLES = 8
PAGE_CSS = """
.mecoq-pixels img { image-rendering: pixelated; }
#query img { width: 100%; height: 100%; object-fit: contain; }
.mecoq-problem { border-left: 4px solid #d9480f; padding-left: 0.75em; }
"""
UPLOAD_HINT = "Drop an image above (or pick an example) to search the index."


@dataclass(frozen=True)
class PageAnswer:
    """The page's outputs for one request: gallery items (image, caption), the results table and a status."""

    gallery: list[tuple[Any, str]]
    table: str
    status: str


def _not_an_image(path: Path, name: str, error: BaseException) -> str:
    cause = error.__cause__ or error  # BadImageError wraps PIL's error, which names the server's copy
    reason = " ".join(str(cause).replace(str(path), name).split()) or type(cause).__name__
    return f"{name} is not an image that can be read ({reason}). Upload a PNG, JPEG, WebP or BMP image."


def _upload_path(upload: str | os.PathLike | dict[str, Any]) -> tuple[Path, str]:
    """(server path, name the user gave) of an upload: a path, or gradio's file data (`path`, `orig_name`)."""
    if isinstance(upload, dict):
        path = Path(str(upload.get("path") or ""))
        return path, str(upload.get("orig_name") or path.name)
    return Path(upload), Path(upload).name


def _problem(text: str) -> str:
    return f"**Problem:** {text}"


# what a request returns


class SearchPage:
    """The page's behaviour, without gradio: turns (upload, k) into a `PageAnswer`.

    Args:
        engine: the loaded model, index and images; None when the index cannot be searched with the model.
        problem: why nothing can be searched (shown for every request), when `engine` is None.
    """

    def __init__(self, engine: SearchEngine | None, problem: str | None = None) -> None:
        if engine is None and problem is None:
            raise ValueError("SearchPage needs an engine, or the problem that prevents one.")
        self.engine = engine
        self.problem = problem

    @property
    def max_k(self) -> int:
        return max(1, min(MAX_TOP_K, self.engine.ntotal if self.engine else MAX_TOP_K))

    def answer(self, upload: str | os.PathLike | dict[str, Any] | None, k: float | int | None) -> PageAnswer:
        """Search the index with the uploaded file and return what the page shows.

        Args:
            upload: the file's path, or gradio's file data of the query component (`path`, `orig_name`);
                None when the query was cleared.
            k: the number of results (rounded, clipped to 1..`max_k`; None: the default).
        """
        if self.engine is None:
            return PageAnswer([], "", _problem(self.problem or ""))
        if upload is None:
            return PageAnswer([], "", UPLOAD_HINT)
        path, name = _upload_path(upload)
        try:
            image = read_query_image(path)
        except (OSError, ValueError) as error:  # BadImageError is a ValueError
            return PageAnswer([], "", _problem(_not_an_image(path, name, error)))
        top_k = int(round(k)) if isinstance(k, (int, float)) else DEFAULT_TOP_K
        top_k = min(max(top_k, 1), self.max_k)
        started = time.perf_counter()
        neighbours = self.engine.search(image, top_k)
        seconds = time.perf_counter() - started
        status = (
            f"Top {len(neighbours)} of {self.engine.ntotal} images ({self.engine.distance} scores, "
            f"{seconds * 1000:.0f} ms)."
        )
        if self.engine.image_problem:
            status += "\n\n" + _problem(self.engine.image_problem)
        return PageAnswer(_gallery(neighbours), _table(neighbours), status)

    def answer_tuple(self, upload: Any, k: Any) -> tuple[list[tuple[Any, str]], str, str]:
        answer = self.answer(upload, k)
        return answer.gallery, answer.table, answer.status


def caption(neighbour: Neighbour) -> str:
    """The text under a result image: `#rank label · score · id`."""
    return f"#{neighbour.rank} {neighbour.label} · {neighbour.score:.4f} · id {neighbour.id}"


def _gallery(neighbours: list[Neighbour]) -> list[tuple[Any, str]]:
    return [(item.image, caption(item)) for item in neighbours if item.image is not None]


def _table(neighbours: list[Neighbour]) -> str:
    rows = [f"| {item.rank} | {item.id} | {item.score:.4f} | {item.label} |" for item in neighbours]
    return "\n".join(["| rank | id | score | label |", "| ---: | ---: | ---: | :--- |", *rows])


def headline_text(headline: Headline) -> str:
    """The model card's numbers in one line: bits, bytes per image, the mAP results."""
    size = f"{headline.bytes_per_image} bytes per image, " if headline.bytes_per_image else ""
    parts = [
        f"**{headline.bits} bits** per image ({size}{headline.num_codebooks} codebooks "
        f"x {headline.codebook_size} codewords)"
    ]
    for metric, dataset, split, value in headline.results[:2]:
        where = f"{dataset}, {split} split" if split else dataset
        parts.append(f"**{metric.split(' (')[0]} {value:.4f}** ({where})")
    if not headline.results:
        parts.append("mAP not recorded (run `mecoq evaluate MODEL_DIR --output MODEL_DIR/metrics.json`)")
    return " · ".join(parts)


# the page


def _example_files(engine: SearchEngine | None, count: int) -> tuple[list[list[str]], list[str], str | None]:
    """Write up to `count` database images as PNG files for gr.Examples: (examples, labels, their folder)."""
    examples = engine.examples(count) if engine is not None else []
    if not examples:
        return [], [], None
    folder = tempfile.mkdtemp(prefix="mecoq-app-examples-")  # gradio serves files from the temp folder
    paths, labels = [], []
    for item, label, image in examples:
        path = Path(folder) / f"example-{item}.png"
        image.save(path)
        paths.append([str(path)])
        labels.append(f"{label} (id {item})")
    return paths, labels, folder


def build_page(
    model: str | os.PathLike,
    index: str | os.PathLike,
    images: str | None = None,
    *,
    metrics: str | os.PathLike | None = None,
    top_k: int = DEFAULT_TOP_K,
    examples: int = DEFAULT_EXAMPLES,
    title: str | None = None,
    backend: str | None = None,
) -> gr.Blocks:
    """The search page of a model and its index, ready for `launch_page`.

    Args:
        model: a model folder or a Hub id (`namespace/name`).
        index: an index file written by `mecoq index build`.
        images: where to load the indexed images from, instead of the source recorded next to the index.
        metrics: a `mecoq evaluate --output` file for the headline mAP (default: MODEL_DIR/metrics.json).
        top_k: the initial number of results.
        examples: how many database images to offer as example queries (0: none).
        title: the page's title (default: "MeCoQ image search: <model name>").
        backend: the index's search backend (`retrieval.backends.BACKENDS`); None: as `mecoq search`.

    Raises:
        FileNotFoundError / ValueError: the model or the index cannot be read (see `search.open_search`).
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # gradio reads it at each telemetry call
    try:
        engine, problem = open_search(model, index, images, backend=backend), None
    except IndexModelMismatchError as error:
        engine, problem = None, str(error)
    page = SearchPage(engine, problem)
    name = Path(str(model)).name if Path(str(model)).expanduser().is_dir() else str(model)
    title = title or f"MeCoQ image search: {name}"
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(f"# {title}")
        if engine is not None:
            headline = headline_numbers(model, engine.model, metrics)
            gr.Markdown(f"{headline_text(headline)}  \nIndex: {describe_source(engine)}.", elem_id="headline")
        else:
            gr.Markdown(_problem(problem or ""), elem_id="problem", elem_classes="mecoq-problem")
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Image(
                    label="Query image",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=280,
                    elem_id="query",
                    elem_classes="mecoq-pixels",
                )
                k = gr.Slider(1, page.max_k, value=min(top_k, page.max_k), step=1, label="k (results)")
                example_rows, example_labels, folder = _example_files(engine, examples)
                if example_rows:
                    gr.Examples(
                        example_rows,
                        inputs=[query],
                        label="Examples from the database",
                        cache_examples=False,
                        examples_per_page=len(example_rows),
                    )
                    weakref.finalize(blocks, shutil.rmtree, folder, True)
            with gr.Column(scale=2):
                status = gr.Markdown(UPLOAD_HINT if engine else _problem(problem or ""), elem_id="status")
                gallery = gr.Gallery(
                    label="Nearest images",
                    columns=5,
                    object_fit="contain",
                    format="png",
                    height="auto",
                    elem_id="results",
                    elem_classes="mecoq-pixels",
                )
                table = gr.Markdown(elem_id="results-table")
        # preprocess=False: the page reads the upload itself, so that a file that is not an image becomes a
        # message in the page (gr.Image's own preprocessing would fail first, with PIL's bare error).
        events = {"inputs": [query, k], "outputs": [gallery, table, status], "preprocess": False}
        query.change(page.answer_tuple, api_name="search", **events)
        k.change(page.answer_tuple, api_visibility="private", trigger_mode="always_last", **events)
    blocks.search_page = page  # the request logic, for tests and callers that want it without a browser
    return blocks


def launch_page(
    blocks: gr.Blocks, host: str | None = DEFAULT_HOST, port: int | None = None, *, block: bool = True
) -> str:
    """Serve the page and return its URL; with `block=True` (the CLI) only after the server stops (Ctrl+C).

    `host=None` and `port=None` take gradio's own defaults (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, which a
    Hugging Face Space sets; else 127.0.0.1 and the first free port from 7860). Nothing leaves the machine:
    no share link, no analytics (see `build_page`), client-side rendering only.
    """
    _, local_url, _ = blocks.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        css=PAGE_CSS,
    )
    if block:
        blocks.block_thread()
    return local_url


__all__ = [
    "DEFAULT_HOST",
    "PageAnswer",
    "SearchPage",
    "build_page",
    "caption",
    "headline_text",
    "launch_page",
]
