"""The folder of a training run: a model folder plus the records of how the model was made.

`RunFolder` is the one owner of those records; nothing else knows their names or formats:

- `splits.json`: the data source and split protocol with each split's size and fingerprint
  (`SplitDefinition.record`) plus a one-line description, so evaluation rebuilds exactly these splits;
- `training_args.json`: every `TrainingArguments` value;
- `log.jsonl`: one JSON object per line, `{"event": "step", ...}` or `{"event": "epoch", ...}`;
- `run_record.json`: what a model card needs (config, arguments with their defaults and the names of the
  plumbing ones, data facts, the selected model's validation mAP, history, library versions);
- `metrics.json`: an `EvaluationReport` (`mecoq evaluate --output`), merged into the card's results.

The model files themselves (`config.json`, `model.safetensors`, ...) are `save_pretrained`'s, and the
checkpoints are `training.checkpoints`'. Writes are atomic (`file_io`); call them on the main process only.
One run writes a folder at a time: `writer_lock()` (`.mecoq-train.lock`, held by `train` and by `mecoq train`
from the split record to the saved model) refuses a second run into the same folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.splits import SplitDefinition
from ..file_io import read_json, write_json
from ..writer_lock import WriterLock, WriterLocked
from .arguments import TrainingArguments
from .checkpoints import TrainerState, list_checkpoints

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset, DatasetDict

    from ..models.mecoq.configuration_mecoq import MeCoQConfig

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
LOCK_FILE = ".mecoq-train.lock"
TRAINING_ARGS_FILE = "training_args.json"
LOG_FILE = "log.jsonl"
RUN_RECORD_FILE = "run_record.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
BASELINE_TITLES = {"pq": "faiss PQ"}  # baseline key in metrics.json -> its name in tables and plots


@dataclass
class EvaluationReport:
    """mAP@K of a model on a query / database split, next to its baselines: the content of `metrics.json`.

    Args:
        metrics (`dict`): the model's results, `{"map@K": value}`.
        top_k (`int`, *optional*): K of mAP@K.
        distance (`str`, *optional*): "asymmetric" or "symmetric" scoring of the database codes.
        bits (`int`, *optional*): the model's code length.
        model (`str`, *optional*): the evaluated model folder or Hub id.
        dataset (`dict`, *optional*): the evaluation data (name, source, protocol, query_split,
            database_split, num_queries, num_database, distance, relevance), as model cards read it.
        baselines (`dict`, *optional*): baseline key (e.g. "pq") -> its `{"map@K": value}` and how it was
            made.
        curves (`dict`, *optional*): plot title -> (precision, recall) curves, when computed; never written.
    """

    metrics: dict[str, float]
    top_k: int | None = None
    distance: str | None = None
    bits: int | None = None
    model: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def metric(self) -> str:
        """The metric's key, e.g. "map@1000"."""
        return f"map@{self.top_k}"

    def scores(self) -> dict[str, float]:
        """Method name -> mAP@K: "MeCoQ" first, then each baseline ("faiss PQ")."""
        scores = {"MeCoQ": self.metrics[self.metric]}
        for name, values in self.baselines.items():
            scores[BASELINE_TITLES.get(name, name)] = values[self.metric]
        return scores

    def to_dict(self) -> dict[str, Any]:
        """The JSON content of `metrics.json` (without the curves)."""
        payload = {
            "model": self.model,
            "dataset": self.dataset,
            "top_k": self.top_k,
            "distance": self.distance,
            "bits": self.bits,
            "metrics": self.metrics,
        }
        if self.baselines:
            payload["baselines"] = self.baselines
        return payload

    @classmethod
    def from_dict(cls, payload: Any, where: str = "metrics") -> EvaluationReport:
        """A report from `to_dict()` content; only `metrics` is required (a hand-written file may hold only
        that)."""
        if not isinstance(payload, dict) or not isinstance(payload.get("metrics"), dict):
            raise TypeError(f"{where} is not a `mecoq evaluate --output` file (no 'metrics' mapping).")
        names = {item.name for item in dataclasses.fields(cls)} - {"curves"}
        return cls(**{key: value for key, value in payload.items() if key in names and value is not None})


class TrainingRunLocked(WriterLocked):
    """Another process is training into the same output folder."""


class RunFolder:
    """The records of one training run in `path` (see the module docstring for the files).

    Args:
        path: the run's folder (`TrainingArguments.output_dir`), which is also its model folder.

    Example:
        >>> run = RunFolder("runs/fmnist")
        >>> splits = run.record_splits(SplitDefinition(source="fashion-mnist", limit=400, num_query=20))
        >>> # train(config, args, splits["train"], ...) writes training_args.json, log.jsonl, run_record.json
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def writer_lock(self, accelerator: Accelerator | None = None) -> contextlib.AbstractContextManager:
        """The folder's writer lock (a context manager; nests within one process), taken by the main process
        only: the other ranks of a multi-process run write nothing here.

        Raises:
            TrainingRunLocked: on entering it, when another process is training into this folder.
        """
        busy = (
            f"Another training run (pid {{pid}}) is writing {self.path}: wait for it to finish, or train "
            "into another output folder (--output-dir). Two runs in one folder would mix their checkpoints "
            "and model files."
        )
        if accelerator is not None and not accelerator.is_main_process:
            return contextlib.nullcontext()
        return WriterLock(self.path / LOCK_FILE, busy, TrainingRunLocked)

    # splits

    def record_splits(
        self, definition: SplitDefinition, accelerator: Accelerator | None = None, *, resume: bool = False
    ) -> DatasetDict:
        """Build the splits of `definition` and record them in `splits.json`, before training on them.

        Args:
            definition: the data source and split protocol.
            accelerator: build on the main process first (the others then read the `datasets` cache); only
                the main process writes.
            resume: the run continues from its checkpoints: the rebuilt splits must equal the recorded ones.

        Raises:
            ValueError: the folder already holds a run and `resume` is False, or (resuming) the data changed.
        """
        if not resume and list_checkpoints(self.path):
            raise ValueError(
                f"{self.path} already holds a training run (checkpoints/). Resume it (resume=True; mecoq "
                "train --resume), or choose another output folder (--output-dir)."
            )
        splits = self._build(definition, accelerator)
        recorded = self.recorded_splits() if resume else None
        if recorded is not None:
            fix = "Resume with the data settings of the first run, or train into a new output folder."
            definition.check_against(splits, recorded[1], fix)
        if accelerator is None or accelerator.is_main_process:
            write_json(
                self.path / SPLITS_FILE,
                {**definition.record(splits), "description": definition.describe(splits)},
            )
        return splits

    def recorded_splits(self) -> tuple[SplitDefinition, dict[str, Any]] | None:
        """(definition, full record) from `splits.json`, or None when the folder has none."""
        path = self.path / SPLITS_FILE
        return SplitDefinition.read(path) if path.is_file() else None

    def evaluation_splits(
        self, overrides: dict[str, Any] | None = None, accelerator: Accelerator | None = None
    ) -> tuple[SplitDefinition, DatasetDict]:
        """The splits to evaluate the run's model on, as (definition, splits).

        Without `overrides` these are the recorded splits, rebuilt and checked against their fingerprints.
        Data settings in `overrides` (`SplitDefinition` fields) change the recorded definition (the result is
        then not checked); a folder without `splits.json` needs at least `overrides["source"]`.

        Raises:
            ValueError: no record and no source, or the rebuilt splits differ from the recorded ones.
        """
        overrides = dict(overrides or {})
        recorded = self.recorded_splits()
        if recorded is None:
            if "source" not in overrides:
                raise ValueError(
                    f"{self.path} has no {SPLITS_FILE} (it was not trained with `mecoq train`): give the "
                    "data to evaluate on (mecoq evaluate: --dataset SOURCE and the split sizes, e.g. "
                    "--num-query N)."
                )
            definition = SplitDefinition(**{"num_validation": 0, **overrides})
            return definition, self._build(definition, accelerator)
        definition, record = recorded
        if overrides:
            definition = SplitDefinition(**{**dataclasses.asdict(definition), **overrides})
            return definition, self._build(definition, accelerator)
        splits = self._build(definition, accelerator)
        fix = (
            f"Restore the recorded data (see {SPLITS_FILE}), or pass split options to evaluate on new splits."
        )
        definition.check_against(splits, record, fix)
        return definition, splits

    @staticmethod
    def _build(definition: SplitDefinition, accelerator: Accelerator | None) -> DatasetDict:
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            return definition.build()

    # training arguments and log

    def write_training_args(self, args: TrainingArguments) -> Path:
        """Record every training argument in `training_args.json`."""
        return write_json(self.path / TRAINING_ARGS_FILE, args.to_dict())

    def recorded_training_args(self) -> dict[str, Any] | None:
        """The recorded training arguments (a dict), or None when the folder has none."""
        path = self.path / TRAINING_ARGS_FILE
        return read_json(path, "Training arguments") if path.is_file() else None

    def map_k(self) -> int | None:
        """K of the mAP@K the run selected its model by, else `TrainingArguments`' default."""
        return (self.recorded_training_args() or {}).get("top_k") or TrainingArguments.top_k

    def append_log(self, event: str, values: dict[str, Any]) -> None:
        """Append `{"event": event, **values}` as one line of `log.jsonl`.

        Every line is strict JSON: a NaN or infinite number is written as null (JSON has no NaN).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_finite_or_null({"event": event, **values}), allow_nan=False)
        with open(self.path / LOG_FILE, "a") as file:
            file.write(line + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        """Every record of `log.jsonl`, oldest first (empty when there is no log).

        A last line cut short (the run was killed while writing it) is left out.
        """
        path = self.path / LOG_FILE
        if not path.is_file():
            return []
        text = path.read_text()
        lines = [line for line in text.splitlines() if line.strip()]
        if lines and not text.endswith("\n"):
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                lines.pop()
        return [json.loads(line) for line in lines]

    # run record

    def write_run_record(
        self,
        config: MeCoQConfig,
        args: TrainingArguments,
        state: TrainerState,
        train_dataset: Dataset,
        *,
        num_processes: int,
        finished: bool,
    ) -> Path:
        """Record the run for its model card (read by `model_card.build_model_card`).

        The data facts (name, Hub id, licence, the source's split and row limit, the protocol and the split
        sizes) come from `splits.json` when its train split is the one trained on; otherwise only the number
        of training images is known.
        """
        record = {
            "config": config.to_dict(),
            "config_changes": config.to_diff_dict(),
            "training_args": args.to_dict(),
            "training_args_defaults": TrainingArguments(output_dir=args.output_dir).to_dict(),
            "training_args_plumbing": sorted(TrainingArguments.plumbing_names()),
            "dataset": self._dataset_facts(train_dataset),
            "metrics": {
                "best_validation_map": state.best_metric,
                "best_epoch": state.best_epoch,
                "top_k": args.top_k,
                "epochs_run": state.epoch,
                "steps": state.global_step,
            },
            "history": state.history,
            "finished": finished,
            "num_processes": num_processes,
            "versions": _library_versions(),
        }
        return write_json(self.path / RUN_RECORD_FILE, record)

    def read_run_record(self) -> dict[str, Any] | None:
        """The run record, or None when the folder has none (e.g. a model trained elsewhere)."""
        path = self.path / RUN_RECORD_FILE
        return read_json(path, "Run record") if path.is_file() else None

    def _dataset_facts(self, train_dataset: Dataset) -> dict[str, Any]:
        facts = {
            "train_size": len(train_dataset),
            "info": getattr(train_dataset.info, "description", "") or "",
        }
        recorded = self.recorded_splits()
        if recorded is None:
            return facts
        definition, record = recorded
        if (record.get("sizes") or {}).get("train") != len(train_dataset):
            logger.warning(
                "%s does not describe the training images: their source is not recorded.", SPLITS_FILE
            )
            return facts
        facts.update(name=definition.name, split_sizes=record.get("sizes"))
        from_database = definition.train_from_database if definition.protocol == "random" else None
        optional = {
            "train_split": definition.split,  # the source's split that the run's splits were drawn from
            "limit": definition.limit,
            "train_from_database": from_database,
            "protocol": record.get("description"),
            "id": definition.hub_id,
            "license": definition.license,
        }
        facts.update({key: value for key, value in optional.items() if value is not None})
        return facts

    # evaluation

    def write_metrics(self, report: EvaluationReport, path: str | os.PathLike | None = None) -> Path:
        """Write `report` to `path` (default: `metrics.json` in the folder)."""
        return write_json(path or self.path / METRICS_FILE, report.to_dict())

    def read_metrics(self, path: str | os.PathLike | None = None) -> EvaluationReport:
        """The report in `path` (default: `metrics.json` in the folder)."""
        path = Path(path or self.path / METRICS_FILE)
        if not path.is_file():
            raise FileNotFoundError(
                f"Metrics file {path} does not exist (write it with mecoq evaluate --output)."
            )
        return EvaluationReport.from_dict(read_json(path, "Metrics file"), where=str(path))

    def card_record(self, metrics: str | os.PathLike | None = None) -> dict[str, Any] | None:
        """The run record with an evaluation report (`metrics`) merged in, as `build_model_card` takes it:
        its results and data, and its baselines under their names in tables (`baselines`: "faiss PQ" -> ...).

        Without a run record the model's `config.json` stands in for it. None when there is neither a run
        record nor a report (a card then has nothing to say beyond the folder's own README).
        """
        record = self.read_run_record()
        if record is not None and "training_args_plumbing" not in record:  # recorded before it was listed
            record["training_args_plumbing"] = sorted(TrainingArguments.plumbing_names())
        if metrics is None:
            return record
        report = self.read_metrics(metrics)
        record = dict(record or {"config": read_json(self.path / CONFIG_FILE, "Model config")})
        record["metrics"] = {**(record.get("metrics") or {}), **report.metrics}
        record["eval_datasets"] = {**(record.get("eval_datasets") or {}), "": report.dataset}
        if report.baselines:  # compared with the model on the report's data, under their names in tables
            record["baselines"] = {
                BASELINE_TITLES.get(key, key): value for key, value in report.baselines.items()
            }
        return record


def _finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float (in nested dicts and lists too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import timm
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }


__all__ = ["EvaluationReport", "RunFolder", "TrainingRunLocked"]
