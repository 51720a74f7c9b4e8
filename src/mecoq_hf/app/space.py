"""The search page as a Hugging Face Space: write its files, push them to a Space repo.

A Space folder holds `app.py` (which builds the page of `page.build_page` for the model repo and the index
next to it), `README.md` (the Space's front matter: `sdk: gradio`, `app_file: app.py`, `models:` linking the
model repo), `requirements.txt` (mecoq-hf), the index file with its sidecar, and optionally the indexed images
as a `save_to_disk` folder (`images/`), so that the page can show them without the original dataset.

`write_space` needs neither gradio nor the Hub; `push_space` writes the folder into a temporary directory and
uploads it in one commit. Neither imports gradio.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import SpaceCard, SpaceCardData

from .. import __version__
from ..file_io import write_atomic, write_text
from ..hub import push_folder_to_hub
from .search import (
    SPACE_IMAGES_FOLDER,
    check_index_matches_hub_model,
    describe_index_file,
    local_image_source,
    save_indexed_images,
    write_index_copy,
)

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

APP_FILE = "app.py"
SPACE_FILES = (APP_FILE, "README.md", "requirements.txt")
APP_TEMPLATE = '''"""Image search with the MeCoQ model {model}: drop an image and see its nearest neighbours.

Written by `mecoq push-app` (mecoq-hf {version}). Run it locally with `python app.py`.
"""

from pathlib import Path

from mecoq_hf.app.page import build_page, launch_page

HERE = Path(__file__).resolve().parent
demo = build_page({model!r}, HERE / {index!r}, images={images}, title={title!r})

if __name__ == "__main__":
    launch_page(demo, host=None, port=None)  # gradio's defaults, which a Space sets through its environment
'''
README_BODY = """
# {title}

Drop an image and see its nearest neighbours among the {what}, searched by their {bits}-bit MeCoQ codes
with the model [{model}](https://huggingface.co/{model}).

Written by `mecoq push-app` (mecoq-hf {version}); locally: `mecoq app {model} --index {index}`.
"""


def _check_repo_id(repo_id: str, what: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or Path(repo_id).expanduser().exists():
        hint = " (a local path: push it with `mecoq push MODEL_DIR REPO_ID` first)" if what == "model" else ""
        raise ValueError(f"The {what} must be a Hub repo id namespace/name, got {repo_id!r}{hint}.")


def _gradio_version() -> str | None:
    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        return None


def write_space(
    folder: str | os.PathLike,
    model_repo: str,
    index: str | os.PathLike,
    *,
    images: str | None = None,
    bundle_images: bool = False,
    title: str | None = None,
    bits: int | float | None = None,
) -> list[Path]:
    """Write the files of a search-page Space for `model_repo` and `index` into `folder`.

    Args:
        folder: where to write (created if missing); existing files of the same names are replaced.
        model_repo: the model's Hub repo id (`namespace/name`), as pushed by `mecoq push`.
        index: an index file written by `mecoq index build` with that model.
        images: where the Space loads the indexed images from (a Hub dataset id); default: the source
            recorded next to the index (a local path or "fashion-mnist" is not there in a Space: bundle them).
        bundle_images: save the indexed images into the Space (`images/`) and load them from there.
        title: the Space's title (default "MeCoQ image search: <model name>").
        bits: the code length, for the README text.

    Returns:
        The files written (the bundled images as their folder).

    Raises:
        ValueError: `model_repo` is not a repo id, both `images` and `bundle_images` are given, or the images
            to bundle cannot be loaded.
        FileNotFoundError: the index file does not exist.
    """
    _check_repo_id(model_repo, "model")
    if images is not None and bundle_images:
        raise ValueError("Pass either images (a source the Space loads) or bundle_images, not both.")
    index = Path(index)
    if not index.is_file():
        raise FileNotFoundError(f"Index file {index} does not exist; build it with `mecoq index build`.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title = title or f"MeCoQ image search: {model_repo.split('/')[1]}"
    written, data, images_code = [], None, repr(images)
    if bundle_images:
        data = save_indexed_images(index, images, folder / SPACE_IMAGES_FOLDER)
        written.append(folder / SPACE_IMAGES_FOLDER)
        images_code = f"str(HERE / {SPACE_IMAGES_FOLDER!r})"
    written += write_index_copy(index, folder, model=model_repo, data=data)
    app = APP_TEMPLATE.format(model=model_repo, index=index.name, images=images_code, title=title,
                              version=__version__)  # fmt: skip
    written.append(write_text(folder / APP_FILE, app))
    card = _space_card(model_repo, index.name, title, bits, describe_index_file(index).split(",")[0])
    written.append(write_atomic(folder / "README.md", lambda name: card.save(name)))
    requirements = f"mecoq-hf=={__version__}\n"
    written.append(write_text(folder / "requirements.txt", requirements))
    return written


def image_source_note(index: str | os.PathLike, images: str | None, bundle_images: bool) -> str | None:
    """A warning when the Space would look for its images where only this machine has them, else None."""
    source = None if images is not None or bundle_images else local_image_source(index)
    if source is None:
        return None
    return (
        f"the index's images come from {source!r}, which a Space does not have: its page will list results "
        "without images. Pass --bundle-images (upload them with the Space) or --images HUB_DATASET."
    )


def _space_card(
    model_repo: str, index_name: str, title: str, bits: int | float | None, what: str
) -> SpaceCard:
    data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=_gradio_version(),
        app_file=APP_FILE,
        models=[model_repo],
        tags=["mecoq", "image-retrieval", "product-quantization"],
        emoji="🔎",
        colorFrom="gray",
        colorTo="blue",
        pinned=False,
        short_description="Search images by their MeCoQ product-quantization codes",
    )
    body = README_BODY.format(title=title, what=what, bits=bits if bits is not None else "a few",
                              model=model_repo, version=__version__, index=index_name)  # fmt: skip
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}")


def push_space(
    space_id: str,
    model_repo: str,
    index: str | os.PathLike,
    *,
    images: str | None = None,
    bundle_images: bool = False,
    title: str | None = None,
    token: str | bool | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> CommitInfo:
    """Write the Space of `write_space` into a temporary folder and upload it to `space_id` in one commit.

    The index is first checked against the model repo's `codebooks.safetensors` (downloaded alone), so a
    Space is never published with an index of another model. The Space repo is created (gradio SDK) if needed.

    Raises:
        IndexModelMismatchError: the index was built with other codebooks than the model repo's.
        ValueError / FileNotFoundError: as `write_space`.
        HubUploadError: the Hub answered with an error or the connection dropped (after retries).
        huggingface_hub's `RepositoryNotFoundError` / `EntryNotFoundError`: the model repo or its codebooks
            file does not exist.
    """
    _check_repo_id(space_id, "Space")
    _check_repo_id(model_repo, "model")
    num_codebooks, codebook_size = check_index_matches_hub_model(index, model_repo, token)
    bits = num_codebooks * math.log2(codebook_size)
    with tempfile.TemporaryDirectory(prefix="mecoq-space-") as staging:
        write_space(staging, model_repo, index, images=images, bundle_images=bundle_images, title=title,
                    bits=int(bits) if bits.is_integer() else round(bits, 2))  # fmt: skip
        with warnings.catch_warnings():  # bundled images are data files in a Space on purpose
            warnings.filterwarnings("ignore", message=".*commit a data file.*space repository")
            return push_folder_to_hub(
                staging,
                space_id,
                token=token,
                private=private,
                commit_message=commit_message or f"Search page of {model_repo} with mecoq-hf",
                repo_type="space",
                space_sdk="gradio",
            )


__all__ = ["APP_FILE", "SPACE_FILES", "image_source_note", "push_space", "write_space"]
