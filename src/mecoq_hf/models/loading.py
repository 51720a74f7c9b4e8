"""Opening a saved MeCoQ model for inference: a local model folder or a Hub id, in float32 and eval mode.

Below every room that needs a ready model (retrieval's image index, the search page, the CLI), so none of them
has to import `hub`. `mecoq_hf.hub.load_model` is the same function.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..file_io import check_readable, read_json

if TYPE_CHECKING:
    from .mecoq.modeling_mecoq import MeCoQModel

MODEL_FOLDER_FIX = (
    "Pass the --output-dir of `mecoq train` or a folder written by `MeCoQModel.save_pretrained`."
)


def _is_local_path(text: str, path: Path) -> bool:
    """Whether `text` names a local path: it looks like one, or something (even unreadable) is there."""
    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        return True
    try:
        path.stat()
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def load_model(model: str | os.PathLike) -> MeCoQModel:
    """A saved MeCoQ model from a local folder or a Hub id (`namespace/name`), in float32 and eval mode.

    A folder must hold the `config.json` (model_type "mecoq") that `save_pretrained` and `mecoq train` write.
    A string that is not an existing path and has the form `namespace/name` is loaded from the Hub.

    Raises:
        ValueError: the folder is not a MeCoQ model folder, or the Hub id cannot be loaded.
        FileNotFoundError: the path does not exist and is not a Hub id.
        PermissionError: the folder, its config or weights may not be read by this user.
    """
    import torch

    from .mecoq.modeling_mecoq import MeCoQModel

    folder = Path(model).expanduser()
    if _is_local_path(str(model), folder):
        check_readable(folder, "Model folder", f"{MODEL_FOLDER_FIX} Or pass a Hub id org/name.")
        if not folder.is_dir():
            raise NotADirectoryError(f"Model {folder} is a file, not a folder. {MODEL_FOLDER_FIX}")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ValueError(
                f"{folder} has no config.json: it is not a saved MeCoQ model folder. {MODEL_FOLDER_FIX}"
            )
        model_type = read_json(config_path, "Model config").get("model_type")
        if model_type != "mecoq":
            raise ValueError(f"{config_path} has model_type {model_type!r}, expected 'mecoq'.")
        return MeCoQModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    try:
        return MeCoQModel.from_pretrained(str(model), dtype=torch.float32).eval()
    except OSError as error:  # transformers' "not found / offline" errors for Hub ids
        raise ValueError(
            f"{str(model)!r} is neither a local model folder nor a loadable Hub model: {error}"
        ) from error


__all__ = ["MODEL_FOLDER_FIX", "load_model"]
