"""The `mecoq` command line: train, encode, index, search, evaluate and share MeCoQ models.

    mecoq train --dataset fashion-mnist --output-dir runs/fmnist --image-size 64 --bits 32 --epochs 5
    mecoq evaluate runs/fmnist --output metrics.json --pr-curve pr.png --baseline pq
    mecoq index build runs/fmnist --dataset fashion-mnist --output index.safetensors
    mecoq search index.safetensors --image shoe.png --top-k 10 --grid results.png
    mecoq encode runs/fmnist --dataset ./my_images --output codes.safetensors
    mecoq push runs/fmnist user/mecoq-fmnist --metrics metrics.json

This module parses arguments, shows progress and prints results; the work is done by `training`, `encoding`,
`evaluation`, `index`, `baselines`, `feature_cache`, `visualization` and `hub`. It adds one concept of its
own: `SplitDefinition`, the recorded query / validation / database / train split of a run (`splits.json`), so
that `mecoq evaluate` rebuilds exactly the splits the model was trained and selected on.

Multi-process: `accelerate launch [launch flags] -m mecoq_hf.cli train ...` (or `$(which mecoq)` in place of
`-m mecoq_hf.cli`); see `configs/accelerate/README.md`. Bad input prints one line `mecoq <command>: error:
...` and exits with status 2; `mecoq --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset, DatasetDict

    from .encoding import EncodedDataset
    from .modeling_mecoq import MeCoQModel

SPLITS_FILE = "splits.json"
SPLITS_FORMAT = "mecoq-hf/splits"
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_FORMAT = "mecoq-hf/index-sidecar"
ENCODED_FORMAT = "mecoq-hf/encoded"
PROTOCOLS = ("random", "cifar10-i", "cifar10-ii", "flickr25k")
SECTIONS = ("model", "training", "data")
EXIT_USAGE = 2


# small helpers


def _write_atomic(path: Path, write: Any) -> Path:
    """Call `write(temp_path)`, fsync, then rename onto `path`: the file is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_name)
        with open(temp_name, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def _write_json(path: str | os.PathLike, payload: Any, indent: int | None = 2) -> Path:
    return _write_atomic(
        Path(path), lambda name: Path(name).write_text(json.dumps(payload, indent=indent) + "\n")
    )


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} {path} is not valid JSON ({error}); it was damaged or edited by hand."
        ) from error


def _fingerprint(dataset: Dataset) -> str:
    """sha256 of a split's `index` column: proves a rebuilt split holds exactly the recorded items."""
    import numpy as np

    index = np.asarray(dataset["index"] if len(dataset) else [], dtype=np.int64)
    return hashlib.sha256(index.tobytes()).hexdigest()


# data: sources and recorded splits


@dataclass
class DataSource:
    """Where images come from: a source as `data.load_image_dataset` takes it, plus a split and a row limit.

    Args:
        source: "fashion-mnist", an image folder, a `save_to_disk` folder, or a Hub dataset name. Local paths
            are stored absolute, so a recorded source still resolves from another working directory.
        split: split of a multi-split source; "train+test" concatenates splits (re-numbering `index`).
        limit: keep only the first `limit` rows (small CPU runs).
        image_column, label_column: the source's column names; label_column None (or "none"): unlabelled.
    """

    source: str
    split: str | None = None
    limit: int | None = None
    image_column: str = "image"
    label_column: str | None = "label"

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError(
                "No dataset given: pass --dataset SOURCE (fashion-mnist, a folder or a Hub name)."
            )
        if self.source != "fashion-mnist" and Path(self.source).expanduser().exists():
            self.source = str(Path(self.source).expanduser().resolve())
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of images, got {self.limit}.")
        if isinstance(self.label_column, str) and self.label_column.lower() in ("", "none", "null"):
            self.label_column = None  # unlabelled images

    @property
    def name(self) -> str:
        """A short display name: the literal, the folder name, or the Hub id."""
        return Path(self.source).name if os.path.isabs(self.source) else self.source

    def load(self) -> Dataset:
        """The images in the normal form of `mecoq_hf.data` (`image`, `label`/`labels`, `index`)."""
        from datasets import concatenate_datasets

        from .data import load_image_dataset

        names = self.split.split("+") if self.split else [None]
        try:
            parts = [
                load_image_dataset(
                    self.source, split=name, image_column=self.image_column, label_column=self.label_column
                )
                for name in names
            ]
        except ValueError as error:
            if self.label_column and "not found" in str(error) and repr(self.label_column) in str(error):
                raise ValueError(f"{error} With mecoq: --label-column none (unlabelled images).") from error
            raise
        images = parts[0]
        if len(parts) > 1:  # one numbering over the concatenation, in the order given
            images = concatenate_datasets([part.remove_columns("index") for part in parts])
            images = images.add_column("index", list(range(len(images))))
        if self.limit is not None and self.limit < len(images):
            images = images.select(range(self.limit))
        return images

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(DataSource)}


@dataclass
class SplitDefinition(DataSource):
    """A data source plus how it splits into query / validation / database / train (`mecoq_hf.splits`).

    `mecoq train` records it in `<output_dir>/splits.json` together with each split's size and a fingerprint
    of its `index` column; `mecoq evaluate` rebuilds the splits from it and checks the fingerprints.

    Args:
        protocol: "random" (`retrieval_splits`), "cifar10-i" / "cifar10-ii" (`cifar10_protocol_splits`, fixed
            1,000 queries per class; use split "train+test" for the merged 60k images) or "flickr25k".
        num_query, num_validation, num_train: split sizes (num_train None: train = the whole database).
        seed: seed of the split draw (the paper uses 2021).
        per_class, train_from_database: as in `retrieval_splits`.
    """

    protocol: str = "random"
    num_query: int = 1000
    num_validation: int = 1000
    num_train: int | None = None
    seed: int = 2021
    per_class: bool = True
    train_from_database: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}.")

    def build(self) -> DatasetDict:
        """Load the images and split them: a `DatasetDict` with query, validation, database and train."""
        from .splits import cifar10_protocol_splits, flickr25k_splits, retrieval_splits

        images = self.load()
        if self.protocol in ("cifar10-i", "cifar10-ii"):
            protocol = "I" if self.protocol == "cifar10-i" else "II"
            return cifar10_protocol_splits(
                images, protocol, seed=self.seed, num_validation=self.num_validation
            )
        if self.protocol == "flickr25k":
            return flickr25k_splits(
                images,
                seed=self.seed,
                num_query=self.num_query,
                num_train=self.num_train or 5000,
                num_validation=self.num_validation,
            )
        return retrieval_splits(
            images,
            num_query=self.num_query,
            num_validation=self.num_validation,
            num_train=self.num_train,
            seed=self.seed,
            per_class=self.per_class,
            train_from_database=self.train_from_database,
        )

    def describe(self, splits: DatasetDict) -> str:
        sizes = ", ".join(
            f"{len(splits[name])} {name}" for name in ("query", "validation", "database", "train")
        )
        return f"{self.name}: {self.protocol} splits (seed {self.seed}): {sizes}"

    def record(self, splits: DatasetDict) -> dict[str, Any]:
        """The `splits.json` content: this definition, the split sizes and their fingerprints."""
        return {
            "format": SPLITS_FORMAT,
            "version": 1,
            "definition": dataclasses.asdict(self),
            "sizes": {name: len(split) for name, split in splits.items()},
            "fingerprints": {name: _fingerprint(split) for name, split in splits.items()},
        }

    def save(self, splits: DatasetDict, folder: str | os.PathLike) -> Path:
        """Write `record(splits)` to `<folder>/splits.json` (atomically); call it on the main process only."""
        return _write_json(Path(folder) / SPLITS_FILE, self.record(splits))

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple[SplitDefinition, dict[str, Any]]:
        """(definition, full record) from a `splits.json` written by `mecoq train`."""
        path = Path(path)
        record = _read_json(path, "Split record")
        if not isinstance(record, dict) or record.get("format") != SPLITS_FORMAT:
            raise ValueError(f"{path} is not a mecoq split record (format {SPLITS_FORMAT!r} expected).")
        definition = record.get("definition") or {}
        _check_keys("data", definition, {field.name for field in dataclasses.fields(cls)})
        return cls(**definition), record

    def check_against(self, splits: DatasetDict, record: dict[str, Any], fix: str) -> None:
        """Raise (with `fix` as advice) if the rebuilt splits differ from the recorded ones."""
        for name, expected in (record.get("fingerprints") or {}).items():
            if name in splits and _fingerprint(splits[name]) != expected:
                raise ValueError(
                    f"The {name} split built from {self.source!r} differs from the one recorded in {SPLITS_FILE}: "
                    f"the data or the split options changed since. {fix}"
                )


# configuration: files, flags and --set


def _field_types(section: str) -> dict[str, str]:
    """Field name -> annotation text of the settings a config section accepts."""
    from transformers import PreTrainedConfig

    from .configuration_mecoq import MeCoQConfig
    from .training import TrainingArguments

    if section == "model":
        base = {field.name for field in dataclasses.fields(PreTrainedConfig)}
        fields = [field for field in dataclasses.fields(MeCoQConfig) if field.name not in base]
    else:
        fields = dataclasses.fields(TrainingArguments if section == "training" else SplitDefinition)
    return {field.name: str(field.type) for field in fields}


def _check_keys(section: str, settings: dict[str, Any], known: set[str]) -> None:
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = (
                f" Did you mean {close[0]!r}?"
                if close
                else f" Known {section} settings: {', '.join(sorted(known))}."
            )
            raise ValueError(f"Unknown {section} setting {key!r}.{hint}")


def _coerce(value: Any, annotation: str) -> Any:
    """Strings from YAML/--set into the field's number type ("1e-3" is a string in YAML 1.1)."""
    if not isinstance(value, str):
        return value
    for kind, convert in (("float", float), ("int", int)):
        if kind in annotation:
            try:
                return convert(value)
            except ValueError:
                continue
    return value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A `.json`/`.yaml` run config: optional `preset:` plus `model:`, `training:` and `data:` sections."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    if path.suffix.lower() == ".json":
        content = _read_json(path, "Config file")
    elif path.suffix.lower() in (".yaml", ".yml"):
        content = yaml.safe_load(path.read_text())
    else:
        raise ValueError(f"Config file {path} must end in .json, .yaml or .yml, got {path.suffix!r}.")
    content = {} if content is None else content
    if not isinstance(content, dict):
        raise TypeError(
            f"Config file {path} must hold a mapping with sections {SECTIONS} (and optionally preset)."
        )
    _check_keys("top-level", content, {"preset", *SECTIONS})
    for section in SECTIONS:
        if not isinstance(content.get(section) or {}, dict):
            raise TypeError(
                f"Section {section!r} of {path} must be a mapping of settings, got {content[section]!r}."
            )
    return content


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """`--set [section.]key=value` -> (section, key, value); the value is parsed as YAML (numbers, true, null)."""
    import yaml

    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise ValueError(f"--set expects key=value (e.g. --set model.temperature=0.3), got {text!r}.")
    section, _, name = key.strip().rpartition(".")
    if section and section not in SECTIONS:
        raise ValueError(f"--set {text!r}: unknown section {section!r}; use one of {SECTIONS}.")
    if not section:
        owners = [candidate for candidate in SECTIONS if name in _field_types(candidate)]
        if len(owners) > 1:
            raise ValueError(
                f"--set {text!r}: {name!r} exists in {owners}; write e.g. {owners[0]}.{name}=..."
            )
        if not owners:
            known = {field for candidate in SECTIONS for field in _field_types(candidate)}
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else " See `mecoq train --help`."
            raise ValueError(f"--set {text!r}: {name!r} is not a model, training or data setting.{hint}")
        section = owners[0]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, name, value


def _apply_bits(model: dict[str, Any], preset: dict[str, Any], bits: int, keep_embedding_dim: bool) -> None:
    """M = bits / log2(K); d follows so that the sub-vector width D = d / M of the preset / file stays,
    unless --embedding-dim was given (`keep_embedding_dim`)."""
    from .configuration_mecoq import MeCoQConfig

    defaults = {
        name: MeCoQConfig.__dataclass_fields__[name].default
        for name in ("codebook_size", "embedding_dim", "num_codebooks")
    }
    settings = {**defaults, **preset, **model}
    per_codebook = math.log2(settings["codebook_size"])
    if bits < 1 or not per_codebook.is_integer() or bits % per_codebook:
        raise ValueError(
            f"--bits {bits} is not a multiple of log2(K) = {per_codebook:g} bits per codebook (K = "
            f"{settings['codebook_size']}); use e.g. 16, 32 or 64 with K = 256."
        )
    num_codebooks = bits // int(per_codebook)
    if not keep_embedding_dim:
        model["embedding_dim"] = num_codebooks * (settings["embedding_dim"] // settings["num_codebooks"])
    model["num_codebooks"] = num_codebooks


def _flag_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The train flags that were given, by section (flags left at None do not override the file)."""
    mapping = {
        "model": {
            "image_size": "image_size",
            "num_codebooks": "num_codebooks",
            "embedding_dim": "embedding_dim",
        },
        "training": {
            "output_dir": "output_dir",
            "num_epochs": "epochs",
            "batch_size": "batch_size",
            "learning_rate": "learning_rate",
            "seed": "seed",
            "max_steps": "max_steps",
            "mixed_precision": "mixed_precision",
        },
        "data": {
            "source": "dataset",
            "split": "split",
            "limit": "limit",
            "image_column": "image_column",
            "label_column": "label_column",
            "protocol": "protocol",
            "num_train": "train_size",
            "num_query": "num_query",
            "num_validation": "num_validation",
            "seed": "seed",
        },
    }
    settings = {
        section: {key: getattr(args, flag) for key, flag in pairs.items() if getattr(args, flag) is not None}
        for section, pairs in mapping.items()
    }
    if args.resume:
        settings["training"]["resume"] = True
    if args.no_progress:
        settings["training"]["progress_bar"] = False
    return settings


def resolve_train_settings(args: argparse.Namespace) -> tuple[Any, Any, SplitDefinition]:
    """(MeCoQConfig, TrainingArguments, SplitDefinition): preset < config file < flags < --set."""
    from .configuration_mecoq import PRESETS, MeCoQConfig
    from .training import TrainingArguments

    file = read_config_file(args.config) if args.config else {}
    preset = args.preset or file.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}. Available presets: {', '.join(sorted(PRESETS))}.")
    preset_settings = PRESETS.get(preset, {})
    sections = {section: dict(file.get(section) or {}) for section in SECTIONS}
    for section, values in _flag_settings(args).items():
        sections[section].update(values)
    if args.bits is not None:
        _apply_bits(sections["model"], preset_settings, args.bits, args.embedding_dim is not None)
    for assignment in args.set or []:
        section, key, value = parse_assignment(assignment)
        sections[section][key] = value
    for section, values in sections.items():
        types = _field_types(section)
        _check_keys(section, values, set(types))
        sections[section] = {key: _coerce(value, types[key]) for key, value in values.items()}
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by `accelerate launch`
    if "mixed_precision" not in sections["training"] and launcher_precision in ("fp16", "bf16"):
        sections["training"]["mixed_precision"] = launcher_precision
    if "output_dir" not in sections["training"]:
        raise ValueError(
            "No output folder: pass --output-dir DIR (or training.output_dir in the config file)."
        )
    if "source" not in sections["data"]:
        raise ValueError("No dataset: pass --dataset SOURCE (or data.source in the config file).")
    config = MeCoQConfig(**{**preset_settings, **sections["model"]})
    return config, TrainingArguments(**sections["training"]), SplitDefinition(**sections["data"])


# models, loaders and encoding


def _use_cpu_for_several_processes() -> None:
    """Several processes and no GPU: make Accelerate join them over gloo on the CPU. Without this,
    `accelerate launch --multi_gpu` on a CPU-only machine starts processes that never synchronise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")


def _accelerator() -> Accelerator:
    """The Accelerator of the current launch (one process under plain `mecoq`)."""
    from accelerate import Accelerator

    _use_cpu_for_several_processes()
    return Accelerator()


def _finish(accelerator: Accelerator) -> None:
    """Let every process reach the end, then tear the process group down (avoids an abort at exit)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def load_model(model: str | os.PathLike) -> MeCoQModel:
    """A saved MeCoQ model from a folder (or a Hub id), in float32 and eval mode."""
    from .modeling_mecoq import MeCoQModel

    folder = Path(model).expanduser()
    if folder.is_dir():
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ValueError(
                f"{folder} has no config.json: it is not a saved MeCoQ model folder. Pass the --output-dir of "
                "`mecoq train` or a folder written by `MeCoQModel.save_pretrained`."
            )
        model_type = _read_json(config_path, "Model config").get("model_type")
        if model_type != "mecoq":
            raise ValueError(f"{config_path} has model_type {model_type!r}, expected 'mecoq'.")
        return MeCoQModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    if folder.exists() or str(model).startswith(("/", ".", "~")) or str(model).count("/") != 1:
        raise FileNotFoundError(
            f"Model folder {folder} does not exist (expected a folder or a Hub id org/name)."
        )
    try:
        return MeCoQModel.from_pretrained(str(model), dtype=torch.float32).eval()
    except OSError as error:  # transformers' "not found / offline" errors for Hub ids
        raise ValueError(
            f"{str(model)!r} is neither a local model folder nor a loadable Hub model: {error}"
        ) from error


def _encode(
    model: Any,
    images: Dataset,
    accelerator: Accelerator,
    method: str,
    args: argparse.Namespace,
) -> EncodedDataset:
    """Run `model.<method>` over `images` with the model's evaluation transform, batched and gathered."""
    from .data import make_eval_dataloader
    from .encoding import encode_dataset
    from .transforms import build_eval_transform

    transform = build_eval_transform(model.backbone.data_config)
    loader = make_eval_dataloader(images, transform, args.batch_size, args.num_workers)
    model.to(accelerator.device)
    return encode_dataset(model, loader, accelerator, method=method, show_progress_bar=not args.no_progress)


# commands


def _say(accelerator: Accelerator | None, message: str) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(message, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from .training import build_accelerator, list_checkpoints, train

    config, training_args, definition = resolve_train_settings(args)
    output_dir = Path(training_args.output_dir)
    if not training_args.resume and list_checkpoints(output_dir):
        raise ValueError(
            f"{output_dir} already holds a training run (checkpoints/). Pass --resume to continue "
            "it, or choose another --output-dir."
        )
    _use_cpu_for_several_processes()
    accelerator = build_accelerator(training_args)
    with accelerator.main_process_first():
        splits = definition.build()
    splits_path = output_dir / SPLITS_FILE
    if training_args.resume and splits_path.is_file():
        fix = "Resume with the data options of the first run, or train into a new --output-dir."
        definition.check_against(splits, _read_json(splits_path, "Split record"), fix)
    if accelerator.is_main_process:
        definition.save(splits, output_dir)
    _say(accelerator, f"Data: {definition.describe(splits)}.")
    _say(
        accelerator,
        f"Model: {config.backbone}, {config.bits} bits (M={config.num_codebooks} x K="
        f"{config.codebook_size}, d={config.embedding_dim}); {accelerator.num_processes} process(es).",
    )
    validation = splits["validation"] if len(splits["validation"]) else None
    result = train(
        config,
        training_args,
        splits["train"],
        validation,
        splits["database"] if validation is not None else None,
        accelerator=accelerator,
    )
    if accelerator.is_main_process:
        _annotate_run_record(output_dir, definition, splits)
        selected = (
            f"best validation mAP@{training_args.top_k} {result.best_metric:.4f} at epoch {result.best_epoch}"
            if result.best_metric is not None
            else "no validation mAP was computed: the last model is kept"
        )
        _say(
            accelerator,
            f"Trained model saved to {output_dir} ({selected}).\nNext: mecoq evaluate {output_dir}",
        )
    return 0


def _annotate_run_record(output_dir: Path, definition: SplitDefinition, splits: DatasetDict) -> None:
    """Add the data description to `run_record.json`, for the model card."""
    path = output_dir / "run_record.json"
    if not path.is_file():
        return
    record = _read_json(path, "Run record")
    record.setdefault("dataset", {}).update(
        {
            "name": definition.name,
            **({"id": definition.source} if _is_hub_name(definition.source) else {}),
            "train_split": "train",
            "protocol": definition.describe(splits),
        }
    )
    _write_json(path, record)


def _is_hub_name(source: str) -> bool:
    return source != "fashion-mnist" and not os.path.isabs(source)


def cmd_encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    model = load_model(args.model)
    data = _data_source(args)
    accelerator = _accelerator()
    with accelerator.main_process_first():
        images = data.load()
    encoded = _encode(model, images, accelerator, "embed" if args.embeddings else "encode", args)
    tensors = {"codes": encoded.outputs}
    if args.embeddings:  # one pass: codes are the hard quantization of the embeddings (as `model.encode`)
        with torch.no_grad():
            codes = [
                model.quantizer.encode(chunk.to(accelerator.device)).cpu()
                for chunk in encoded.outputs.split(4096)
            ]
        tensors = {"codes": torch.cat(codes), "embeddings": encoded.outputs.float()}
    tensors["ids"] = encoded.ids if encoded.ids is not None else torch.arange(len(images))
    if encoded.labels is not None:
        tensors["labels"] = encoded.labels
    metadata = {
        "format": ENCODED_FORMAT,
        "model": str(args.model),
        "data": json.dumps(data.to_dict()),
        "num_codebooks": str(model.config.num_codebooks),
        "codebook_size": str(model.config.codebook_size),
    }
    if accelerator.is_main_process:
        contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
        _write_atomic(Path(args.output), lambda name: save_file(contiguous, name, metadata=metadata))
    shape = tuple(tensors["codes"].shape)
    _finish(accelerator)
    _say(accelerator, f"Encoded {shape[0]} images of {data.name} into {shape[1]}-byte codes: {args.output}")
    return 0


def _data_source(args: argparse.Namespace) -> DataSource:
    return DataSource(
        args.dataset, args.split, args.limit, args.image_column or "image", args.label_column or "label"
    )


def sidecar_path(index_path: str | os.PathLike) -> Path:
    """`index.safetensors` -> `index.meta.json`: the labels, paths and data source of an index's items."""
    return Path(index_path).with_suffix(SIDECAR_SUFFIX)


def cmd_index_build(args: argparse.Namespace) -> int:
    from .index import CodeIndex

    model = load_model(args.model)
    data = _data_source(args)
    accelerator = _accelerator()
    with accelerator.main_process_first():
        images = data.load()
    encoded = _encode(model, images, accelerator, "encode", args)
    index = CodeIndex(
        model.codebooks(),
        distance=args.distance or model.config.distance,
        normalize_query_subvectors=model.config.normalize_query_subvectors,
    )
    index.add(encoded.outputs, ids=encoded.ids)
    if accelerator.is_main_process:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        index.save(args.output)
        _write_json(sidecar_path(args.output), _sidecar(args.model, data, images, encoded), indent=None)
    _finish(accelerator)
    _say(
        accelerator,
        f"Indexed {index.ntotal} images of {data.name} ({index.distance} search): {args.output} "
        f"(+ {sidecar_path(args.output).name})",
    )
    return 0


def _sidecar(model: str, data: DataSource, images: Dataset, encoded: EncodedDataset) -> dict[str, Any]:
    from datasets import ClassLabel, Image

    label_feature = images.features.get("label")
    raw = images.select_columns(["image"]).cast_column("image", Image(decode=False)).with_format("arrow")[:]
    paths = raw["image"].combine_chunks().field("path").to_pylist()
    model_path = Path(model).expanduser()
    return {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "model": str(model_path.resolve()) if model_path.is_dir() else str(model),
        "data": data.to_dict(),
        "class_names": label_feature.names if isinstance(label_feature, ClassLabel) else None,
        "ids": encoded.ids.tolist() if encoded.ids is not None else list(range(len(images))),
        "labels": encoded.labels.tolist() if encoded.labels is not None else None,
        "paths": paths if any(paths) else None,
    }


def _read_sidecar(index_path: str | os.PathLike) -> dict[str, Any] | None:
    path = sidecar_path(index_path)
    if not path.is_file():
        return None
    sidecar = _read_json(path, "Index sidecar")
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path} is not a mecoq index sidecar (format {SIDECAR_FORMAT!r} expected).")
    return sidecar


def _open_image(path: str | os.PathLike) -> Any:
    import PIL.Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Query image {path} does not exist.")
    try:
        image = PIL.Image.open(path)
        image.load()
    except (OSError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read the query image {path}: {error}") from error
    return image


def _label_text(label: Any, class_names: list[str] | None) -> str:
    if isinstance(label, list):  # multi-hot
        return ",".join(class_names[i] if class_names else str(i) for i, on in enumerate(label) if on) or "-"
    return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)


def cmd_search(args: argparse.Namespace) -> int:
    from .index import CodeIndex
    from .transforms import build_eval_transform

    if not Path(args.index).is_file():
        raise FileNotFoundError(f"Index file {args.index} does not exist; build it with `mecoq index build`.")
    index = CodeIndex.load(args.index)
    sidecar = _read_sidecar(args.index)
    model_source = args.model or (sidecar or {}).get("model")
    if model_source is None:
        raise ValueError(
            f"No model: pass --model MODEL_DIR (the index has no {sidecar_path(args.index).name})."
        )
    model = load_model(model_source)
    if model.codebooks().shape != index.codebooks.shape or not torch.allclose(
        model.codebooks(), index.codebooks, atol=1e-5
    ):
        raise ValueError(
            f"{args.index} was built with other codebooks than the model {model_source}: pass the "
            "model the index was built with (mecoq index build MODEL_DIR ...)."
        )
    query_image = _open_image(args.image)
    with torch.no_grad():
        query = model.embed(build_eval_transform(model.backbone.data_config)(query_image)[None])  # (1, d)
    scores, ids = index.search(query, k=args.top_k)
    found = ids[0] >= 0
    scores, ids = scores[0][found].tolist(), ids[0][found].tolist()
    labels = _labels_of(ids, sidecar)
    paths = dict(zip(sidecar["ids"], sidecar["paths"])) if sidecar and sidecar.get("paths") else {}
    print(f"Top {len(ids)} of {index.ntotal} for {args.image} ({index.distance} scores):")
    print(f"{'rank':>4}  {'id':>8}  {'score':>9}  label" + ("  path" if paths else ""))
    for rank, (item, score) in enumerate(zip(ids, scores), start=1):
        label = labels[rank - 1] if labels else "-"
        print(f"{rank:>4}  {item:>8}  {score:>9.4f}  {label}" + (f"  {paths.get(item)}" if paths else ""))
    if args.grid:
        if sidecar is None:
            raise ValueError(
                f"--grid needs the database images, recorded in {sidecar_path(args.index).name} by "
                "`mecoq index build`; it is missing."
            )
        from .visualization import save_retrieval_grid

        results = _images_by_id(DataSource(**sidecar["data"]), ids)
        save_retrieval_grid(query_image, results, scores, labels, args.grid)
        print(f"Grid written to {args.grid}")
    return 0


def _labels_of(ids: list[int], sidecar: dict[str, Any] | None) -> list[str] | None:
    if not sidecar or sidecar.get("labels") is None:
        return None
    by_id = dict(zip(sidecar["ids"], sidecar["labels"]))
    return [_label_text(by_id[item], sidecar.get("class_names")) if item in by_id else "-" for item in ids]


def _images_by_id(data: DataSource, ids: list[int]) -> list[Any]:
    """The images of `ids` (values of the `index` column), reloaded from the recorded source."""
    images = data.load()
    positions = {int(item): row for row, item in enumerate(images["index"])}
    missing = [item for item in ids if item not in positions]
    if missing:
        raise ValueError(
            f"Ids {missing[:5]} are no longer in {data.source!r}: the dataset changed after indexing."
        )
    return [images[positions[item]]["image"] for item in ids]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_codes, precision_recall_curve, score_codes

    model = load_model(args.model)
    definition, record = _evaluation_splits(args)
    accelerator = _accelerator()
    with accelerator.main_process_first():
        splits = definition.build()
    if record is not None:
        fix = (
            f"Restore the recorded data (see {SPLITS_FILE}), or pass split options to evaluate on new splits."
        )
        definition.check_against(splits, record, fix)
    queries = _encode(model, splits["query"], accelerator, "embed", args)
    database = _encode(model, splits["database"], accelerator, "encode", args)
    for encoded, side in ((queries, "query"), (database, "database")):
        if encoded.labels is None:
            raise ValueError(
                f"The {side} split of {definition.name} has no labels: mAP needs a label column."
            )
    config = model.config
    distance = args.distance or config.distance
    top_k = min(_evaluation_top_k(args), len(splits["database"]))
    scoring = (queries.outputs, database.outputs, model.codebooks().cpu())
    results = {
        "MeCoQ": evaluate_codes(
            *scoring, queries.labels, database.labels, top_k, distance, config.normalize_query_subvectors
        )
    }
    curves = {}
    if args.pr_curve:
        scores = score_codes(*scoring, distance, config.normalize_query_subvectors)
        curves[f"MeCoQ ({config.bits} bits)"] = precision_recall_curve(
            scores, queries.labels, database.labels
        )
    baseline = (
        _pq_evaluation(model, splits, accelerator, args, queries.labels, database.labels, top_k, curves)
        if args.baseline == "pq"
        else None
    )
    if baseline is not None:
        results["faiss PQ"] = baseline["map"]
    _report_evaluation(
        accelerator, args, definition, splits, config, distance, top_k, results, baseline, curves
    )
    _finish(accelerator)
    return 0


def _evaluation_splits(args: argparse.Namespace) -> tuple[SplitDefinition, dict[str, Any] | None]:
    """The recorded splits of the model folder, or new ones from the split options (then not checked)."""
    overrides = {
        "source": args.dataset,
        "split": args.split,
        "limit": args.limit,
        "protocol": args.protocol,
        "num_query": args.num_query,
        "num_validation": args.num_validation,
        "num_train": args.train_size,
        "seed": args.seed,
        "image_column": args.image_column,
        "label_column": args.label_column,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    recorded = Path(args.model) / SPLITS_FILE
    if recorded.is_file():
        definition, record = SplitDefinition.read(recorded)
        if not overrides:
            return definition, record
        print(f"Note: split options given; the splits differ from the ones recorded in {recorded}.")
        return SplitDefinition(**{**dataclasses.asdict(definition), **overrides}), None
    if "source" not in overrides:
        raise ValueError(
            f"{args.model} has no {SPLITS_FILE} (it was not trained with `mecoq train`): pass "
            "--dataset SOURCE and the split sizes (--num-query N)."
        )
    return SplitDefinition(**{"num_validation": 0, **overrides}), None


def _evaluation_top_k(args: argparse.Namespace) -> int:
    if args.top_k is not None:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}.")
        return args.top_k
    training_args = Path(args.model) / "training_args.json"
    recorded = (
        _read_json(training_args, "Training arguments").get("top_k") if training_args.is_file() else None
    )
    return int(recorded or 1000)


def _pq_evaluation(
    model: MeCoQModel,
    splits: DatasetDict,
    accelerator: Accelerator,
    args: argparse.Namespace,
    query_labels: torch.Tensor,
    database_labels: torch.Tensor,
    top_k: int,
    curves: dict[str, Any],
) -> dict[str, Any]:
    """mAP@top_k of faiss PQ (`baselines.PQ`: same M, K = 256, asymmetric inner product on L2-normalised
    features) on the frozen backbone's features, trained on the train split."""
    from .baselines import PQ
    from .evaluation import mean_average_precision, precision_recall_curve
    from .feature_cache import compute_features
    from .modeling_mecoq import MeCoQModel
    from .transforms import build_eval_transform

    backbone = model.backbone
    if model.config.backbone_trainable != "frozen":  # fine-tuned: the baseline uses the pretrained weights
        _say(accelerator, f"PQ baseline: loading the pretrained backbone ({model.config.backbone_weights}).")
        backbone = MeCoQModel.for_training(model.config).backbone
    backbone.to(accelerator.device)
    transform = build_eval_transform(model.backbone.data_config)
    features = {
        name: compute_features(backbone, splits[name], transform, batch_size=args.batch_size,
                               accelerator=accelerator, show_progress_bar=not args.no_progress).outputs
        for name in ("train", "query", "database")
    }  # fmt: skip
    if len(features["train"]) < 256:
        raise ValueError(
            f"The PQ baseline learns K = 256 codewords per sub-space and needs >= 256 training images, got "
            f"{len(features['train'])}. Use a larger training split (--train-size) with --baseline pq."
        )
    pq = PQ(bits=8 * model.config.num_codebooks).fit(features["train"])
    scores = pq.scores(features["query"], pq.encode(features["database"]))  # lazy (Q, N)
    if args.pr_curve:
        curves[f"faiss PQ ({pq.bits} bits)"] = precision_recall_curve(scores, query_labels, database_labels)
    return {
        "map": mean_average_precision(scores, query_labels, database_labels, top_k),
        "num_train": len(splits["train"]),
        "feature_dim": int(features["train"].shape[1]),
        "method": f"faiss IndexPQ(M={pq.num_codebooks}, 8 bits, METRIC_INNER_PRODUCT) on L2-normalised "
        "frozen backbone features (mecoq_hf.baselines.PQ), asymmetric search",
    }


def _report_evaluation(
    accelerator: Accelerator,
    args: argparse.Namespace,
    definition: SplitDefinition,
    splits: DatasetDict,
    config: Any,
    distance: str,
    top_k: int,
    results: dict[str, float],
    baseline: dict[str, Any] | None,
    curves: dict[str, Any],
) -> None:
    """Print the mAP table; write the metrics JSON and the PR-curve PNG (main process only)."""
    if not accelerator.is_main_process:
        return
    num_queries, num_database = len(splits["query"]), len(splits["database"])
    print(
        f"mAP@{top_k}: {num_queries} queries vs {num_database} database items of {definition.name}, "
        f"{distance}, {config.bits} bits (M={config.num_codebooks}, K={config.codebook_size})"
    )
    for method, value in results.items():
        print(f"  {method:<10} {value:.4f}")
    if args.output:
        dataset = {
            "name": definition.name,
            "source": definition.source,
            "protocol": definition.describe(splits),
            "query_split": "query",
            "database_split": "database",
            "num_queries": num_queries,
            "num_database": num_database,
            "distance": distance,
            "relevance": "same class" if "label" in splits["query"].column_names else "shares a label",
        }
        payload = {
            "model": str(args.model),
            "dataset": dataset,
            "top_k": top_k,
            "distance": distance,
            "bits": config.bits,
            "metrics": {f"map@{top_k}": results["MeCoQ"]},
        }
        if baseline is not None:
            payload["baselines"] = {
                "pq": {f"map@{top_k}": baseline["map"], **{k: v for k, v in baseline.items() if k != "map"}}
            }
        _write_json(args.output, payload)
        print(f"Metrics written to {args.output}")
    if curves:
        from .visualization import plot_pr_curve

        plot_pr_curve(curves, args.pr_curve, title=f"Precision-recall, {definition.name}")
        print(f"Precision-recall curve written to {args.pr_curve}")


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_model_to_hub

    folder = Path(args.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist.")
    record_path = folder / "run_record.json"
    run_record = _read_json(record_path, "Run record") if record_path.is_file() else None
    if args.metrics:
        run_record = _with_evaluation(run_record, folder, Path(args.metrics))
    commit = push_model_to_hub(
        folder,
        args.repo_id,
        run_record=run_record,
        token=args.token,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(f"Pushed {folder} to {args.repo_id}: {commit.commit_url}")
    return 0


def _with_evaluation(run_record: dict[str, Any] | None, folder: Path, metrics_path: Path) -> dict[str, Any]:
    """Merge a `mecoq evaluate --output` file into the run record, so the card reports the test mAP."""
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"Metrics file {metrics_path} does not exist (write it with mecoq evaluate --output)."
        )
    evaluation = _read_json(metrics_path, "Metrics file")
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("metrics"), dict):
        raise TypeError(f"{metrics_path} is not a `mecoq evaluate --output` file (no 'metrics' mapping).")
    record = dict(run_record or {"config": _read_json(folder / "config.json", "Model config")})
    record["metrics"] = {**(record.get("metrics") or {}), **evaluation["metrics"]}
    record["eval_datasets"] = {**(record.get("eval_datasets") or {}), "": evaluation.get("dataset") or {}}
    return record


def cmd_push_index(args: argparse.Namespace) -> int:
    from .hub import push_index_to_hub

    commit = push_index_to_hub(
        args.index,
        args.repo_id,
        path_in_repo=args.path_in_repo or Path(args.index).name,
        repo_type=args.repo_type,
        token=args.token,
        private=args.private,
    )
    print(f"Pushed {args.index} to the {args.repo_type} repo {args.repo_id}: {commit.commit_url}")
    return 0


# the parser


def _data_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        required=required,
        metavar="SOURCE",
        help="fashion-mnist, an image folder (<root>/<class>/<images>), a save_to_disk folder, or a "
        "Hub dataset name (where the Hub is reachable)",
    )
    group.add_argument("--split", help="split of a multi-split source (e.g. test; train+test concatenates)")
    group.add_argument("--limit", type=int, metavar="N", help="use only the first N images of the source")
    group.add_argument("--image-column", help="image column of the source (default: image)")
    group.add_argument(
        "--label-column", help="label column (default: label, or labels; none: unlabelled images)"
    )


def _split_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("splits (query / validation / database / train)")
    group.add_argument("--protocol", choices=PROTOCOLS, help="how to split (default: random, per class)")
    group.add_argument("--num-query", type=int, metavar="N", help="query (test) images (default 1000)")
    group.add_argument(
        "--num-validation",
        type=int,
        metavar="N",
        help="validation queries for model selection, disjoint from the queries (default 1000; 0: none)",
    )
    group.add_argument(
        "--train-size",
        type=int,
        metavar="N",
        help="training images, drawn from the database (default: the whole database)",
    )
    group.add_argument(
        "--seed", type=int, help="seed of the split draw (and, for train, of training; default 2021)"
    )


def _run_options(parser: argparse.ArgumentParser, batch_size: int | None = 128) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size, metavar="B", help="images per batch")
    parser.add_argument("--num-workers", type=int, default=0, metavar="N", help="DataLoader worker processes")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _debug_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the full traceback of errors instead of a one-line message",
    )


def _subparser(commands: Any, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, help=help_text, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _debug_option(parser, argparse.SUPPRESS)  # SUPPRESS: a `mecoq --debug cmd` is not reset by the subcommand
    return parser


def _train_parser(commands: Any) -> None:
    parser = _subparser(
        commands,
        "train",
        "train a MeCoQ model",
        (
            "Train MeCoQ on a dataset split into query / validation / database / train; the output folder becomes a\n"
            "model folder (config.json, model.safetensors, codebooks.safetensors, splits.json, run_record.json).\n"
            "Settings: preset < --config file (sections model:, training:, data:) < flags < --set.\n\n"
            "Multi-process: accelerate launch --config_file configs/accelerate/cpu_2_processes.yaml -m mecoq_hf.cli train ..."
        ),
    )
    parser.set_defaults(handler=cmd_train)
    parser.add_argument("--config", metavar="FILE", help="run config, .json or .yaml")
    parser.add_argument(
        "--preset",
        help="named MeCoQConfig preset: official, paper, or a reference-script row such "
        "as cifar10-i-32, flickr25k-16 (see mecoq_hf.PRESETS)",
    )
    parser.add_argument("--output-dir", metavar="DIR", help="folder of the run; becomes the model folder")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--image-size", type=int, metavar="N", help="input resolution (default: the backbone's)"
    )
    size = model.add_mutually_exclusive_group()
    size.add_argument(
        "--bits", type=int, help="code length: M = bits / 8 codebooks of K = 256 (keeps D = d / M)"
    )
    size.add_argument("--num-codebooks", type=int, metavar="M", help="number of codebooks M")
    model.add_argument("--embedding-dim", type=int, metavar="D", help="embedding width d (a multiple of M)")
    run = parser.add_argument_group("training")
    run.add_argument("--epochs", type=int, metavar="N", help="maximum number of epochs")
    run.add_argument("--batch-size", type=int, metavar="B", help="images per process per step")
    run.add_argument("--learning-rate", type=float, metavar="LR", help="peak learning rate")
    run.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (resumable)")
    run.add_argument(
        "--mixed-precision", choices=("no", "fp16", "bf16"), help="default: no, or accelerate launch's"
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --output-dir"
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any setting, e.g. model.temperature=0.3, training.weight_decay=1e-3, data.per_class=false "
        "(repeatable; the section may be omitted when the key is unambiguous)",
    )
    _data_options(parser, required=False)
    _split_options(parser)


def _evaluate_parser(commands: Any) -> None:
    parser = _subparser(
        commands,
        "evaluate",
        "mAP@K on the query split, PR curve, PQ baseline",
        (
            "mAP@K of the query split's embeddings against the database split's codes. The splits are rebuilt from\n"
            "MODEL_DIR/splits.json (checked against its fingerprints); split options build new ones instead."
        ),
    )
    parser.set_defaults(handler=cmd_evaluate)
    parser.add_argument("model", metavar="MODEL_DIR", help="a model folder written by mecoq train")
    parser.add_argument(
        "--top-k", type=int, metavar="K", help="K of mAP@K (default: the training's top_k, or 1000)"
    )
    parser.add_argument("--distance", choices=("asymmetric", "symmetric"), help="default: the model's config")
    parser.add_argument("--output", metavar="metrics.json", help="write the metrics as JSON")
    parser.add_argument("--pr-curve", metavar="pr.png", help="write a precision-recall curve PNG")
    parser.add_argument(
        "--baseline",
        choices=("pq",),
        help="also evaluate faiss PQ (same M, K = 256) on the frozen backbone features of the train split",
    )
    _data_options(parser, required=False)
    _split_options(parser)
    _run_options(parser)


def _data_command_parsers(commands: Any) -> None:
    encode = _subparser(
        commands,
        "encode",
        "encode a dataset into codes (safetensors)",
        "Hard-code every image of a dataset: codes (N, M), ids (the dataset's index column) and labels.",
    )
    encode.set_defaults(handler=cmd_encode)
    encode.add_argument("model", metavar="MODEL_DIR")
    encode.add_argument("--output", required=True, metavar="codes.safetensors")
    encode.add_argument("--embeddings", action="store_true", help="also store the embeddings (N, d)")
    _data_options(encode, required=True)
    _run_options(encode)

    index = commands.add_parser("index", help="build a searchable code index", description="Code indexes.")
    builders = index.add_subparsers(dest="index_command", metavar="{build}", required=True)
    build = _subparser(
        builders,
        "build",
        "encode a dataset into a CodeIndex",
        (
            "Encode a dataset and write a CodeIndex (ids = the dataset's index column) plus INDEX.meta.json with\n"
            "the labels, image paths and data source, which mecoq search prints and draws."
        ),
    )
    build.set_defaults(handler=cmd_index_build)
    build.add_argument("model", metavar="MODEL_DIR")
    build.add_argument("--output", required=True, metavar="index.safetensors")
    build.add_argument("--distance", choices=("asymmetric", "symmetric"), help="default: the model's config")
    _data_options(build, required=True)
    _run_options(build)

    search = _subparser(
        commands,
        "search",
        "search an index with an image",
        "Print the ranked ids, labels and scores of an image's nearest items; optionally draw a grid.",
    )
    search.set_defaults(handler=cmd_search)
    search.add_argument("index", metavar="INDEX", help="an index written by mecoq index build")
    search.add_argument("--model", metavar="MODEL_DIR", help="default: the model recorded in INDEX.meta.json")
    search.add_argument("--image", required=True, metavar="PATH", help="the query image")
    search.add_argument("--top-k", type=int, default=10, metavar="K", help="number of results (default 10)")
    search.add_argument("--grid", metavar="out.png", help="write a PNG of the query and its results")


def _hub_parsers(commands: Any) -> None:
    push = _subparser(
        commands,
        "push",
        "push a model folder to the Hub",
        "Push a model folder with its model card (built from run_record.json) in one commit.",
    )
    push.set_defaults(handler=cmd_push)
    push.add_argument("model", metavar="MODEL_DIR")
    push.add_argument("repo_id", metavar="REPO_ID", help="namespace/name")
    push.add_argument(
        "--metrics", metavar="metrics.json", help="a mecoq evaluate --output file to report on the card"
    )
    push.add_argument("--revision", help="branch (created if missing; default main)")
    push.add_argument("--commit-message")
    push_index = _subparser(
        commands,
        "push-index",
        "push an index file to the Hub",
        "Upload a CodeIndex file (checked first) to a dataset (default) or model repo.",
    )
    push_index.set_defaults(handler=cmd_push_index)
    push_index.add_argument("index", metavar="INDEX")
    push_index.add_argument("repo_id", metavar="REPO_ID")
    push_index.add_argument("--repo-type", choices=("dataset", "model"), default="dataset")
    push_index.add_argument("--path-in-repo", help="default: the file's name")
    for parser in (push, push_index):
        parser.add_argument("--token", help="Hub token (default: the saved login)")
        parser.add_argument("--private", action="store_true", help="create the repo as private")


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
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that bad input causes: printed as one line (exit status 2) unless --debug."""
    import yaml
    from huggingface_hub.errors import StrictDataclassError

    from .hub import HubUploadError

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


__all__ = [
    "SPLITS_FILE",
    "DataSource",
    "SplitDefinition",
    "build_parser",
    "load_model",
    "main",
    "parse_assignment",
    "read_config_file",
    "resolve_train_settings",
    "sidecar_path",
]


if __name__ == "__main__":
    sys.exit(main())
