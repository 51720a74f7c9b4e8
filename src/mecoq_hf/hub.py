"""Sharing MeCoQ through the Hugging Face Hub: models, codebooks, code indexes, and the model card.

- `push_model_to_hub` publishes a saved model folder (weights, `codebooks.safetensors`, preprocessing, the
  `trust_remote_code` files) together with its model card in ONE commit, so a repo never shows weights
  without their card or codebooks from another revision. Only the model's own files go (`model_files`):
  a training run's checkpoints, feature cache, logs and indexes stay local unless named with `include`.
- `download_codebooks` fetches only `codebooks.safetensors`: enough to decode or search codes made elsewhere.
- `push_index_to_hub` / `load_index_from_hub` move a `CodeIndex` file through a dataset (or model) repo.
- `load_model` opens a saved model from a local folder or a Hub id, ready for encoding (float32, eval mode).
- The model card comes from `model_card.build_model_card` (a training run record -> `ModelCard`).

Uploads go through `HfApi.create_commit` with the operations listed here rather than `upload_folder`: with
`hf_xet` installed, `upload_folder` may split a large folder over several commits, and a model must land in
one. Failed uploads raise `HubUploadError` after huggingface_hub's own retries; nothing is written locally.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from .file_io import read_json
from .model_card import build_model_card
from .models.loading import load_model
from .models.mecoq.quantization import CODEBOOKS_FILE, load_codebooks

try:  # huggingface_hub >= 2 speaks HTTP through httpx2, 1.x through httpx
    from httpx2 import HTTPError as _TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import HTTPError as _TransportError

if TYPE_CHECKING:
    import torch
    from huggingface_hub import CommitInfo

    from .models.mecoq.modeling_mecoq import MeCoQModel
    from .retrieval.index import CodeIndex

INDEX_FILE = "index.safetensors"
REPO_TYPES = ("model", "dataset", "space")
# Never uploaded from a folder: VCS data, huggingface_hub's local metadata, Python bytecode.
SKIPPED_PARTS = {".git", ".cache", "__pycache__"}
# Required in a folder published as a model (`MeCoQModel.save_pretrained` writes all of them).
MODEL_FILES = ("config.json", CODEBOOKS_FILE, "preprocessor_config.json")
CARD_FILE = "README.md"


class HubUploadError(OSError):
    """An upload to the Hub failed (HTTP error or dropped connection) after huggingface_hub's retries."""


# helper functions


def _check_repo_type(repo_type: str) -> None:
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}.")


def _folder_operations(folder: Path) -> list[CommitOperationAdd]:
    """One `CommitOperationAdd` per file under `folder` (sorted), skipping `SKIPPED_PARTS` and `*.pyc`."""
    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not SKIPPED_PARTS.intersection(relative.parts) and path.suffix != ".pyc":
            operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=str(path)))
    return operations


def _commit(
    operations: list[CommitOperationAdd],
    repo_id: str,
    *,
    what: str,
    token: str | bool | None,
    private: bool,
    repo_type: str,
    revision: str | None,
    commit_message: str,
    commit_description: str | None = None,
    space_sdk: str = "gradio",
) -> CommitInfo:
    """Create the repo (exist_ok; a Space with `space_sdk`) and the branch if needed, then commit
    `operations` at once."""
    api = HfApi()
    sdk = {"space_sdk": space_sdk} if repo_type == "space" else {}  # create_repo needs one for a Space
    try:
        api.create_repo(repo_id, token=token, private=private, repo_type=repo_type, exist_ok=True, **sdk)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, token=token, repo_type=repo_type, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            repo_type=repo_type,
            revision=revision,
        )
    except (HfHubHTTPError, _TransportError) as error:
        raise HubUploadError(
            f"Could not push {what} to the {repo_type} repo {repo_id!r} at {api.endpoint}: "
            f"{type(error).__name__}: {str(error).strip()}. (huggingface_hub retries transient errors.) "
            "Local files were not changed. Check the connection, HF_ENDPOINT and the token's write access, "
            "then run the same call again: files that already reached the Hub are not uploaded twice."
        ) from error


def _as_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(
            f"Expected a folder to upload, got {str(path)!r}, which is not an existing directory."
        )
    return path


# folders, codebooks and indexes


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    repo_type: str = "model",
    revision: str | None = None,
    space_sdk: str = "gradio",
) -> CommitInfo:
    """Upload every file under `folder` to `repo_id` in one commit, creating the repo if needed.

    Args:
        folder: local folder; its layout is kept (`sub/x.json` lands at `sub/x.json`). `.git`, `.cache`,
            `__pycache__` and `*.pyc` are skipped.
        repo_id: `"namespace/name"`.
        token: Hub token; `None` uses the locally saved one, `False` sends none.
        private: create the repo as private (ignored when it exists).
        commit_message: first line of the commit; defaults to "Upload <folder name> with mecoq-hf".
        commit_description: body of the commit.
        repo_type: `"model"`, `"dataset"` or `"space"`.
        revision: branch to commit to (created from `main` when missing); defaults to `main`.
        space_sdk: the SDK a new Space is created with ("gradio", "streamlit", "docker" or "static");
            used only with `repo_type="space"`.

    Returns:
        huggingface_hub's `CommitInfo` (`oid` is the new commit's sha). When nothing changed, no commit is
        made and it describes the current head.

    Raises:
        ValueError: `folder` is not a directory or has no file, or `repo_type` is unknown.
        HubUploadError: the Hub answered with an error or the connection dropped (after retries).
    """
    _check_repo_type(repo_type)
    folder = _as_folder(folder)
    operations = _folder_operations(folder)
    if not operations:
        raise ValueError(f"Folder {str(folder)!r} has no file to upload.")
    return _commit(
        operations,
        repo_id,
        what=f"folder {str(folder)!r}",
        token=token,
        private=private,
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message or f"Upload {folder.name} with mecoq-hf",
        commit_description=commit_description,
        space_sdk=space_sdk,
    )


def download_codebooks(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None, repo_type: str = "model"
) -> torch.Tensor:
    """Download only `codebooks.safetensors` of a MeCoQ repo and return the (M, K, D) codebooks.

    With them, codes (N, M) made by the same model elsewhere can be decoded (`quantization.decode_codes`) or
    searched (`retrieval.index.CodeIndex(codebooks)`) without downloading the backbone.

    Raises:
        ValueError: the file is not a valid MeCoQ codebooks file or holds non-finite values.
        huggingface_hub's `EntryNotFoundError` / `RepositoryNotFoundError` / `RevisionNotFoundError`.
    """
    import torch

    path = hf_hub_download(repo_id, CODEBOOKS_FILE, revision=revision, token=token, repo_type=repo_type)
    codebooks = load_codebooks(path)  # (M, K, D), format and shape checked
    if not torch.isfinite(codebooks).all():
        raise ValueError(
            f"{CODEBOOKS_FILE} of {repo_id!r} (revision {revision or 'main'}) holds NaN or infinite values; "
            "the model that wrote it was broken. Re-save the model and push it again."
        )
    return codebooks


def push_index_to_hub(
    index_path: str | os.PathLike,
    repo_id: str,
    *,
    path_in_repo: str = INDEX_FILE,
    repo_type: str = "dataset",
    token: str | bool | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
) -> CommitInfo:
    """Upload a `CodeIndex` file (written by `CodeIndex.save`) to a dataset (default) or model repo.

    The file is opened with `CodeIndex.load` first, so a truncated or foreign file is refused before any
    upload. Returns the `CommitInfo`; raises `ValueError` for a bad file and `HubUploadError` on failure.
    """
    from .retrieval.index import CodeIndex

    _check_repo_type(repo_type)
    index_path = Path(index_path)
    if not index_path.is_file():
        raise ValueError(
            f"Index file {str(index_path)!r} does not exist. Write it with `index.save(path)` first."
        )
    CodeIndex.load(index_path)  # raises ValueError (or a subclass) when the file is not a valid index
    operation = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(index_path))
    return _commit(
        [operation],
        repo_id,
        what=f"index {str(index_path)!r}",
        token=token,
        private=private,
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message or f"Upload code index {path_in_repo} with mecoq-hf",
    )


def load_index_from_hub(
    repo_id: str,
    filename: str = INDEX_FILE,
    *,
    repo_type: str = "dataset",
    revision: str | None = None,
    token: str | bool | None = None,
    backend: str = "native",
) -> CodeIndex:
    """Download `filename` from `repo_id` and open it with `CodeIndex.load` (format and checksum checked).

    `backend` is the index's search backend ("native", "faiss", or "ivf" for an index built with lists).
    Raises `index.IndexFormatError` (a `ValueError`) for a damaged file, and huggingface_hub's not-found
    errors for a wrong repo, file or revision.
    """
    from .retrieval.index import CodeIndex

    _check_repo_type(repo_type)
    path = hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision, token=token)
    return CodeIndex.load(path, backend=backend)


# models


def model_files(folder: str | os.PathLike, include: Sequence[str] = ()) -> list[str]:
    """The files `push_model_to_hub` uploads from a model folder (relative POSIX paths, sorted).

    These are the files `MeCoQModel.save_pretrained` writes: `config.json`, the weights (`model.safetensors`,
    or the shards its index lists), `codebooks.safetensors`, `preprocessor_config.json`, the remote-code
    modules of the config's `auto_map` and every module they import, and `README.md` (the model card) when
    present; plus what `include` names. Everything else (checkpoints, feature caches, logs, indexes, stale
    `.saving-*` folders of an interrupted save) stays local.

    Args:
        folder: a saved model folder (see `push_model_to_hub`).
        include: extra files to upload, as paths or glob patterns relative to `folder` (e.g. "metrics.json");
            a folder includes the files under it.

    Raises:
        ValueError: the folder is not a saved MeCoQ model, or an `include` pattern matches no file or points
            outside the folder.
    """
    folder = _as_folder(folder)
    config = _check_model_folder(folder)
    names = {*MODEL_FILES, *_weight_files(folder)}
    names.update(_remote_code_files(folder, config))
    if (folder / CARD_FILE).is_file():
        names.add(CARD_FILE)
    for pattern in include:
        names.update(_included(folder, pattern))
    return sorted(names)


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or not index.is_file():
        return ["model.safetensors"]
    shards = set((read_json(index, "Weights index").get("weight_map") or {}).values())
    missing = sorted(name for name in shards if not (folder / name).is_file())
    if missing:
        raise ValueError(f"{index} lists weight files that are missing: {', '.join(missing)}.")
    return [index.name, *sorted(shards)]


def _remote_code_files(folder: Path, config: dict[str, Any]) -> set[str]:
    """The `auto_map` modules of config.json and preprocessor_config.json and their relative imports."""
    from transformers.dynamic_module_utils import get_relative_import_files

    auto_map = dict(config.get("auto_map") or {})
    auto_map.update(
        read_json(folder / "preprocessor_config.json", "Preprocessor config").get("auto_map") or {}
    )
    files = set()
    for reference in auto_map.values():
        for item in reference if isinstance(reference, list) else [reference]:
            module = folder / f"{str(item).split('--')[-1].rsplit('.', 1)[0]}.py"
            if module.is_file():
                files.add(module.name)
                files.update(Path(path).name for path in get_relative_import_files(module))
    return files


def _included(folder: Path, pattern: str) -> set[str]:
    root = folder.resolve()
    matches = sorted(folder.glob(pattern)) if pattern else []
    files = [path for match in matches for path in ([match] if match.is_file() else sorted(match.rglob("*")))]
    found = set()
    for path in files:
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"--include {pattern!r} points outside the model folder {folder}.")
        relative = path.relative_to(folder)
        if path.is_file() and not SKIPPED_PARTS.intersection(relative.parts) and path.suffix != ".pyc":
            found.add(relative.as_posix())
    if not found:
        raise ValueError(
            f"--include {pattern!r} matches no file in {folder}; give a path relative to the model folder "
            "(e.g. --include metrics.json)."
        )
    return found


def push_model_to_hub(
    model_or_folder: MeCoQModel | str | os.PathLike,
    repo_id: str,
    *,
    run_record: dict[str, Any] | str | os.PathLike | None = None,
    card: ModelCard | None = None,
    token: str | bool | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    include: Sequence[str] = (),
) -> CommitInfo:
    """Publish a MeCoQ model with its model card in one commit.

    Args:
        model_or_folder: a `MeCoQModel` (saved with `save_pretrained` into a temporary folder that is removed
            afterwards) or a folder it was saved to (read only; nothing is written into it).
        repo_id: `"namespace/name"`.
        run_record: the training run record (dict or JSON path) to build the card from.
        card: a ready `ModelCard`; takes precedence over `run_record`.
        token / private / commit_message / revision: as in `push_folder_to_hub`.
        include: files of the folder to upload besides the model's own (`model_files` lists what goes).

    The card is, in order of precedence: `card`, one built from `run_record`, the folder's own `README.md`,
    or one built from `config.json` alone (architecture facts; unknown training facts as HTML comments).

    Raises:
        ValueError: the folder lacks `config.json`, weights or `codebooks.safetensors`, or is not MeCoQ's.
        HubUploadError: the upload failed after huggingface_hub's retries.
    """
    if isinstance(model_or_folder, (str, os.PathLike)):
        files = model_files(model_or_folder, include)
        return _push_model_folder(
            Path(model_or_folder), files, repo_id, run_record, card, token, private, commit_message, revision
        )
    if not hasattr(model_or_folder, "save_pretrained"):
        raise TypeError(f"Expected a MeCoQModel or a folder path, got {type(model_or_folder).__name__}.")
    with tempfile.TemporaryDirectory(prefix="mecoq-push-") as staging:
        model_or_folder.save_pretrained(staging)
        files = model_files(staging, include)
        return _push_model_folder(
            Path(staging), files, repo_id, run_record, card, token, private, commit_message, revision
        )


def _push_model_folder(
    folder: Path,
    files: list[str],
    repo_id: str,
    run_record: dict[str, Any] | str | os.PathLike | None,
    card: ModelCard | None,
    token: str | bool | None,
    private: bool,
    commit_message: str | None,
    revision: str | None,
) -> CommitInfo:
    config = _check_model_folder(folder)
    if card is None and run_record is not None:
        card = build_model_card(run_record, repo_id=repo_id)
    if card is None and CARD_FILE not in files:
        card = build_model_card({"config": config}, repo_id=repo_id)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in files
        if card is None or name != CARD_FILE
    ]
    if card is not None:
        operations.append(
            CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card).encode("utf-8"))
        )
    return _commit(
        operations,
        repo_id,
        what="MeCoQ model",
        token=token,
        private=private,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload MeCoQ model with mecoq-hf",
    )


def _check_model_folder(folder: Path) -> dict[str, Any]:
    """Check that `folder` holds a saved MeCoQ model and return its config dict."""
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    has_weights = any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )
    if missing or not has_weights:
        missing += [] if has_weights else ["model.safetensors"]
        raise ValueError(
            f"{str(folder)!r} is not a saved MeCoQ model: missing {', '.join(missing)}. "
            "Save the model with `model.save_pretrained(folder)` (it writes all of them), then push that "
            "folder."
        )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "mecoq":
        raise ValueError(
            f"{str(folder / 'config.json')!r} has model_type {config.get('model_type')!r}, expected 'mecoq'. "
            "Use `push_folder_to_hub` for other folders."
        )
    return config


__all__ = [
    "HubUploadError",
    "download_codebooks",
    "load_index_from_hub",
    "load_model",
    "model_files",
    "push_folder_to_hub",
    "push_index_to_hub",
    "push_model_to_hub",
]
