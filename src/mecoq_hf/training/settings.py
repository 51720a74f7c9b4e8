"""Run settings: a preset < a config file < overrides < `key=value` assignments, resolved into config objects.

A run has three sections of settings: `model` (`MeCoQConfig` fields), `training` (`TrainingArguments`) and
`data` (`SplitDefinition`). `resolve_run_settings` layers them as plain dicts, in this order:

0. `defaults` of the caller (e.g. `mecoq train`'s own defaults), below everything else;
1. a named preset, given directly or as `preset:` in the file: its `MeCoQConfig` settings and, for a
   reference-script preset, the training arguments of that run (`training.presets`);
2. a `.json`/`.yaml` config file with optional `model:`, `training:` and `data:` sections;
3. `overrides`, by section (what `mecoq train`'s flags set), and `bits` (M = bits / log2(K) codebooks);
4. `assignments`, `[section.]key=value` strings parsed as YAML (`mecoq train --set`).

Keys are checked against the fields of their section (with a suggestion for a misspelt one); numbers written
as strings (YAML 1.1 reads `5e-2` as a string) become numbers. Defaults are the config objects' own.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..data.splits import SplitDefinition
from ..file_io import read_json
from ..models.mecoq.configuration_mecoq import MeCoQConfig, num_codebooks_for_bits
from .arguments import TrainingArguments, _is_kind
from .presets import training_preset_settings

SECTIONS = ("model", "training", "data")


class RunSettings(NamedTuple):
    """The resolved settings of a run."""

    config: MeCoQConfig
    training: TrainingArguments
    data: SplitDefinition


def _field_types(section: str) -> dict[str, str]:
    """Field name -> annotation text of the settings a section accepts."""
    from transformers import PreTrainedConfig

    if section == "model":
        base = {item.name for item in dataclasses.fields(PreTrainedConfig)}
        fields = [item for item in dataclasses.fields(MeCoQConfig) if item.name not in base]
    else:
        fields = dataclasses.fields(TrainingArguments if section == "training" else SplitDefinition)
    return {item.name: _annotation_text(item.type) for item in fields}


def _annotation_text(annotation: Any) -> str:
    """ "int", "float | int", "str | None": a class by its name (`MeCoQConfig` has no string annotations)."""
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _check_keys(section: str, settings: Mapping[str, Any], known: set[str]) -> None:
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = (
                f" Did you mean {close[0]!r}?"
                if close
                else f" Known {section} settings: {', '.join(sorted(known))}."
            )
            raise ValueError(f"Unknown {section} setting {key!r}.{hint}")


def _coerce(section: str, key: str, value: Any, annotation: str) -> Any:
    """A setting as its field's type: numbers written as strings become numbers ("1e-3" is a string in YAML
    1.1); a value that cannot be one, or a NaN or infinite float, is refused naming the setting.

    Raises:
        ValueError: e.g. `training.cached_views=abc`, `training.learning_rate=nan`.
    """
    kinds = annotation.split(" | ")
    if isinstance(value, str) and "str" not in kinds:
        for kind, convert in (("float", float), ("int", int)):
            if kind in kinds:
                try:
                    value = convert(value)
                    break
                except ValueError:
                    continue
    number = {"float": "a number", "int": "a whole number", "bool": "true or false"}.get(kinds[0])
    if number is not None and not (value is None and "None" in kinds or _is_kind(value, kinds[0])):
        raise ValueError(
            f"{section}.{key} must be {number}, got {value!r} (check the config file, the flags and --set)."
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(
            f"{section}.{key} must be a finite number, got {value} (check the config file, the flags and "
            "--set)."
        )
    return value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A `.json`/`.yaml` run config: optional `preset:` plus `model:`, `training:` and `data:` sections.

    Raises:
        FileNotFoundError, ValueError, TypeError: a missing file, a wrong suffix, invalid YAML or JSON, an
            unknown top-level key, or a section that is not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    if path.suffix.lower() == ".json":
        content = read_json(path, "Config file")
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            with open(path, encoding="utf-8") as stream:  # marks in the error then name the file
                content = yaml.safe_load(stream)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ValueError(f"Config file {path} is not valid YAML: {error}") from error
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
    """`[section.]key=value` -> (section, key, value); the value is parsed as YAML (numbers, true, null).

    The section may be left out when exactly one section has the key.
    """
    import yaml

    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise ValueError(f"--set expects key=value (e.g. --set model.temperature=0.3), got {text!r}.")
    section, _, name = key.strip().rpartition(".")
    if section and section not in SECTIONS:
        raise ValueError(f"--set {text!r}: unknown section {section!r}; use one of {SECTIONS}.")
    if not section:
        section = _section_of(name, text)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, name, value


def _section_of(name: str, text: str) -> str:
    owners = [candidate for candidate in SECTIONS if name in _field_types(candidate)]
    if len(owners) > 1:
        raise ValueError(f"--set {text!r}: {name!r} exists in {owners}; write e.g. {owners[0]}.{name}=...")
    if not owners:
        known = {item for candidate in SECTIONS for item in _field_types(candidate)}
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else " See `mecoq train --help`."
        raise ValueError(f"--set {text!r}: {name!r} is not a model, training or data setting.{hint}")
    return owners[0]


def _apply_bits(model: dict[str, Any], bits: int, keep_embedding_dim: bool) -> None:
    """M = bits / log2(K); d follows so that the sub-vector width D = d / M of the settings so far stays,
    unless `keep_embedding_dim` (d was given next to the bits)."""
    num_codebooks = num_codebooks_for_bits(bits, model.get("codebook_size", MeCoQConfig.codebook_size))
    if not keep_embedding_dim:
        width = model.get("embedding_dim", MeCoQConfig.embedding_dim)
        subvector_dim = width // model.get("num_codebooks", MeCoQConfig.num_codebooks)
        model["embedding_dim"] = num_codebooks * subvector_dim
    model["num_codebooks"] = num_codebooks


def resolve_run_settings(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    assignments: Sequence[str] = (),
    bits: int | None = None,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> RunSettings:
    """The settings of a run from `defaults` < a preset < `config_file` < `overrides` (and `bits`) <
    `assignments`.

    Args:
        preset: a preset name (`MeCoQConfig` settings plus, for a reference-script row, its training
            arguments); beats the file's `preset:`.
        config_file: a `.json`/`.yaml` file (see `read_config_file`).
        overrides: section -> settings, e.g. `{"training": {"num_epochs": 5}, "data": {"source": "x"}}`.
        assignments: `[section.]key=value` strings, applied last.
        defaults: section -> settings below everything else (what `mecoq train` chooses by itself).
        bits: code length; sets M = bits / log2(K) and keeps the sub-vector width D = d / M, unless
            `overrides["model"]` sets `embedding_dim`.

    Returns:
        `RunSettings(config, training, data)`. `training.mixed_precision` defaults to the precision of
        `accelerate launch --mixed_precision` when that is fp16 or bf16.

    Raises:
        ValueError, TypeError: unknown presets, sections or keys, bad values, or no output folder or source.
    """
    file = read_config_file(config_file) if config_file is not None else {}
    preset = preset or file.get("preset")
    sections = {section: dict(file.get(section) or {}) for section in SECTIONS}
    _check_sections(defaults or {})
    _check_sections(overrides or {})
    layers = {section: dict((defaults or {}).get(section) or {}) for section in SECTIONS}
    if preset:
        layers["model"].update(MeCoQConfig.preset_settings(preset))
        layers["training"].update(training_preset_settings(preset))
    sections = {section: {**layers[section], **sections[section]} for section in SECTIONS}
    for section, values in (overrides or {}).items():
        sections[section].update(values)
    if bits is not None:
        _apply_bits(sections["model"], bits, "embedding_dim" in ((overrides or {}).get("model") or {}))
    for assignment in assignments:
        section, key, value = parse_assignment(assignment)
        sections[section][key] = value
    for section, values in sections.items():
        types = _field_types(section)
        _check_keys(section, values, set(types))
        sections[section] = {key: _coerce(section, key, value, types[key]) for key, value in values.items()}
    _share_bad_image_policy(sections)
    _require(sections)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by `accelerate launch`
    if "mixed_precision" not in sections["training"] and launcher_precision in ("fp16", "bf16"):
        sections["training"]["mixed_precision"] = launcher_precision
    return RunSettings(
        MeCoQConfig(**sections["model"]),
        TrainingArguments(**sections["training"]),
        SplitDefinition(**sections["data"]),
    )


def _share_bad_image_policy(sections: dict[str, dict[str, Any]]) -> None:
    """`on_bad_image` is one choice, whether set for loading (data) or for the training loader (training)."""
    given = {
        sections[name]["on_bad_image"] for name in ("training", "data") if "on_bad_image" in sections[name]
    }
    if len(given) > 1:
        raise ValueError(
            f"training.on_bad_image and data.on_bad_image differ ({sorted(given)}): set one of them, or "
            "use mecoq train --on-bad-image raise|skip."
        )
    if given:
        sections["training"]["on_bad_image"] = sections["data"]["on_bad_image"] = given.pop()


_ALWAYS_SHOWN = ("learning_rate", "batch_size", "num_epochs", "weight_decay", "top_k", "cached_views")


def describe_run_settings(settings: RunSettings, preset: str | None = None) -> str:
    """The resolved settings of a run, a few lines to show when it starts: the model settings that differ
    from `MeCoQConfig()`, the main training arguments and every other one that differs from its default."""
    config, training, data = settings
    model_defaults = MeCoQConfig()
    model = {
        name: getattr(config, name)
        for name in _field_types("model")  # MeCoQConfig's own fields, in declaration order
        if getattr(config, name) != getattr(model_defaults, name)
    }
    training_defaults = TrainingArguments(output_dir=training.output_dir)
    plumbing = TrainingArguments.plumbing_names()
    run = {key: value for key, value in training.to_dict().items() if key in _ALWAYS_SHOWN or (
           key not in plumbing and value != getattr(training_defaults, key))}  # fmt: skip

    def listed(values: dict[str, Any]) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in values.items()) or "the defaults"

    header = f"Settings (preset {preset}" if preset else "Settings (no preset"
    return (
        f"{header}; model: what differs from the defaults):\n  model: {listed(model)}\n"
        f"  training: {listed(run)}\n  output: {training.output_dir}"
    )


def _check_sections(layer: Mapping[str, Any]) -> None:
    for section in layer:
        if section not in SECTIONS:
            raise ValueError(f"Unknown settings section {section!r}; use one of {SECTIONS}.")


def _require(sections: dict[str, dict[str, Any]]) -> None:
    if "output_dir" not in sections["training"]:
        raise ValueError("No output folder: set training.output_dir (mecoq train: --output-dir DIR).")
    if "source" not in sections["data"]:
        raise ValueError("No dataset: set data.source (mecoq train: --dataset SOURCE).")


__all__ = [
    "SECTIONS",
    "RunSettings",
    "describe_run_settings",
    "parse_assignment",
    "read_config_file",
    "resolve_run_settings",
]
