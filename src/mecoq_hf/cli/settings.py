"""Run settings of `mecoq train`: preset < --config file < flags < --set, resolved into the three config objects."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.splits import SplitDefinition
from ..file_io import read_json

if TYPE_CHECKING:
    from ..models.mecoq.configuration_mecoq import MeCoQConfig
    from ..training.trainer import TrainingArguments

SECTIONS = ("model", "training", "data")


def _field_types(section: str) -> dict[str, str]:
    """Field name -> annotation text of the settings a config section accepts."""
    from transformers import PreTrainedConfig

    from ..models.mecoq.configuration_mecoq import MeCoQConfig
    from ..training.trainer import TrainingArguments

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
        content = read_json(path, "Config file")
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
    from ..models.mecoq.configuration_mecoq import MeCoQConfig

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


DATA_FLAGS = {  # data setting -> flag (`mecoq train` and `mecoq evaluate`)
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
}


TRAIN_FLAGS = {  # section -> {setting -> flag} of `mecoq train`
    "model": {"image_size": "image_size", "num_codebooks": "num_codebooks", "embedding_dim": "embedding_dim"},
    "training": {
        "output_dir": "output_dir",
        "num_epochs": "epochs",
        "batch_size": "batch_size",
        "learning_rate": "learning_rate",
        "seed": "seed",
        "max_steps": "max_steps",
        "mixed_precision": "mixed_precision",
    },
    "data": DATA_FLAGS,
}


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """setting -> value of the flags (setting -> flag name) that were given; None means not given."""
    return {key: getattr(args, flag) for key, flag in flags.items() if getattr(args, flag) is not None}


def _flag_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The train flags that were given, by section (flags left at None do not override the file)."""
    settings = {section: _given(args, flags) for section, flags in TRAIN_FLAGS.items()}
    if args.resume:
        settings["training"]["resume"] = True
    if args.no_progress:
        settings["training"]["progress_bar"] = False
    return settings


def resolve_train_settings(
    args: argparse.Namespace,
) -> tuple[MeCoQConfig, TrainingArguments, SplitDefinition]:
    """(MeCoQConfig, TrainingArguments, SplitDefinition): preset < config file < flags < --set."""
    from ..models.mecoq.configuration_mecoq import PRESETS, MeCoQConfig
    from ..training.trainer import TrainingArguments

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
