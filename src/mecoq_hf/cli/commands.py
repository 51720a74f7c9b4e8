"""The `mecoq` command line: train, encode, index, search, evaluate and share MeCoQ models.

    mecoq train --dataset fashion-mnist --output-dir runs/fmnist --image-size 64 --bits 32 --epochs 5
    mecoq evaluate runs/fmnist --output metrics.json --pr-curve pr.png --baseline pq
    mecoq index build runs/fmnist --dataset fashion-mnist --output index.safetensors
    mecoq search index.safetensors --image shoe.png --top-k 10 --grid results.png
    mecoq encode runs/fmnist --dataset ./my_images --output codes.safetensors
    mecoq push runs/fmnist user/mecoq-fmnist --metrics metrics.json

This module parses arguments, resolves the train settings (preset < config file < flags < --set), shows
progress and prints results; the work is done by `training`, `splits` (the recorded `splits.json` of a run),
`data`, `encoding`, `evaluation`, `index` (and its sidecar), `baselines`, `visualization` and `hub`.

Multi-process: `accelerate launch [launch flags] -m mecoq_hf.cli train ...` (or `$(which mecoq)` in place of
`-m mecoq_hf.cli`); see `configs/accelerate/README.md`. Bad input prints one line `mecoq <command>: error:
...` and exits with status 2; `mecoq --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.sources import DataSource
from ..data.splits import PROTOCOLS, SPLITS_FILE, SplitDefinition
from ..file_io import read_json, write_atomic, write_json

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset, DatasetDict

    from ..models.mecoq.configuration_mecoq import MeCoQConfig
    from ..models.mecoq.modeling_mecoq import MeCoQModel
    from ..retrieval.evaluation import RetrievalResult
    from ..training.trainer import TrainingArguments

SECTIONS = ("model", "training", "data")
EXIT_USAGE = 2
Handler = Callable[[argparse.Namespace], int]  # a command: parsed arguments -> exit status


# configuration: files, flags and --set


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


# commands


def _say(accelerator: Accelerator | None, message: str) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(message, flush=True)


def _finish(accelerator: Accelerator) -> None:
    """Let every process reach the end, then tear the process group down (avoids an abort at exit)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _accelerator() -> Accelerator:
    """The Accelerator of the current launch (one process under plain `mecoq`), built as for training so
    that several processes on a CPU-only machine are joined over gloo; it logs nothing and saves no state."""
    from ..training.trainer import TrainingArguments, build_accelerator

    return build_accelerator(TrainingArguments(output_dir=os.getcwd(), report_to=[]))


def _model_and_images(args: argparse.Namespace) -> tuple[MeCoQModel, DataSource, Accelerator, Dataset]:
    """The model, the data source of the data flags, the launch's Accelerator and the source's images."""
    from ..hub import load_model

    model = load_model(args.model)
    data = DataSource(
        args.dataset, args.split, args.limit, args.image_column or "image", args.label_column or "label"
    )
    accelerator = _accelerator()
    with accelerator.main_process_first():
        return model, data, accelerator, data.load()


def _encoding_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "show_progress_bar": not args.no_progress,
    }


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.trainer import build_accelerator, list_checkpoints, train

    config, training_args, definition = resolve_train_settings(args)
    output_dir = Path(training_args.output_dir)
    if not training_args.resume and list_checkpoints(output_dir):
        raise ValueError(
            f"{output_dir} already holds a training run (checkpoints/). Pass --resume to continue "
            "it, or choose another --output-dir."
        )
    accelerator = build_accelerator(training_args)
    with accelerator.main_process_first():
        splits = definition.build()
    if training_args.resume and (output_dir / SPLITS_FILE).is_file():
        _, record = SplitDefinition.read(output_dir / SPLITS_FILE)
        fix = "Resume with the data options of the first run, or train into a new --output-dir."
        definition.check_against(splits, record, fix)
    if accelerator.is_main_process:
        definition.save(splits, output_dir)
    _say(accelerator, f"Data: {definition.describe(splits)}.")
    _say(
        accelerator,
        f"Model: {config.backbone}, {config.bits} bits (M={config.num_codebooks} x K="
        f"{config.codebook_size}, d={config.embedding_dim}); {accelerator.num_processes} process(es).",
    )
    validation = splits["validation"] if len(splits["validation"]) else None
    database = splits["database"] if validation is not None else None
    result = train(config, training_args, splits["train"], validation, database, accelerator=accelerator)
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
    record = read_json(path, "Run record")
    dataset = record.setdefault("dataset", {})
    dataset.update(name=definition.name, train_split="train", protocol=definition.describe(splits))
    if definition.hub_id:
        dataset["id"] = definition.hub_id
    if definition.source == "fashion-mnist":
        dataset["license"] = "mit"  # Zalando Research's Fashion-MNIST
    write_json(path, record)


def cmd_encode(args: argparse.Namespace) -> int:
    from ..encoding import encode_images, quantize_embeddings, save_encoded

    model, data, accelerator, images = _model_and_images(args)
    method = "embed" if args.embeddings else "encode"
    encoded = encode_images(model, images, accelerator, method=method, **_encoding_options(args))
    codes, embeddings = encoded.outputs, None
    if args.embeddings:  # one pass: the codes are the hard quantization of the embeddings (as `model.encode`)
        codes, embeddings = quantize_embeddings(model, encoded.outputs), encoded.outputs
    if accelerator.is_main_process:
        metadata = {
            "model": str(args.model),
            "data": json.dumps(data.to_dict()),
            "num_codebooks": str(model.config.num_codebooks),
            "codebook_size": str(model.config.codebook_size),
        }
        ids = encoded.ids if encoded.ids is not None else torch.arange(len(images))
        save_encoded(args.output, codes, ids, labels=encoded.labels, embeddings=embeddings, metadata=metadata)
    _finish(accelerator)
    _say(
        accelerator,
        f"Encoded {codes.shape[0]} images of {data.name} into {codes.shape[1]}-byte codes: {args.output}",
    )
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from ..data.sources import class_names, image_paths
    from ..encoding import encode_images
    from ..retrieval.index import CodeIndex, save_sidecar, sidecar_path

    model, data, accelerator, images = _model_and_images(args)
    encoded = encode_images(model, images, accelerator, method="encode", **_encoding_options(args))
    index = CodeIndex(
        model.codebooks(),
        distance=args.distance or model.config.distance,
        normalize_query_subvectors=model.config.normalize_query_subvectors,
    )
    index.add(encoded.outputs, ids=encoded.ids)
    if accelerator.is_main_process:
        index.save(args.output)
        labels = encoded.labels.tolist() if encoded.labels is not None else None
        save_sidecar(args.output, model=args.model, data=data.to_dict(), ids=index.ids.tolist(), labels=labels,
                     class_names=class_names(images), paths=image_paths(images))  # fmt: skip
    _finish(accelerator)
    _say(
        accelerator,
        f"Indexed {index.ntotal} images of {data.name} ({index.distance} search): {args.output} "
        f"(+ {sidecar_path(args.output).name})",
    )
    return 0


def _label_text(label: Any, class_names: list[str] | None) -> str:
    if isinstance(label, list):  # multi-hot
        return ",".join(class_names[i] if class_names else str(i) for i, on in enumerate(label) if on) or "-"
    return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)


def _labels_of(ids: list[int], sidecar: dict[str, Any] | None) -> list[str] | None:
    if not sidecar or sidecar.get("labels") is None:
        return None
    by_id = dict(zip(sidecar["ids"], sidecar["labels"]))
    return [_label_text(by_id[item], sidecar.get("class_names")) if item in by_id else "-" for item in ids]


def cmd_search(args: argparse.Namespace) -> int:
    from ..data.sources import decode_image
    from ..data.transforms import build_eval_transform
    from ..hub import load_model
    from ..retrieval.index import CodeIndex, load_sidecar, sidecar_path

    if not Path(args.index).is_file():
        raise FileNotFoundError(f"Index file {args.index} does not exist; build it with `mecoq index build`.")
    index = CodeIndex.load(args.index)
    sidecar = load_sidecar(args.index)
    model_source = args.model or (sidecar or {}).get("model")
    if model_source is None:
        raise ValueError(
            f"No model: pass --model MODEL_DIR (the index has no {sidecar_path(args.index).name})."
        )
    model = load_model(model_source)
    codebooks = model.codebooks()
    if codebooks.shape != index.codebooks.shape or not torch.allclose(codebooks, index.codebooks, atol=1e-5):
        raise ValueError(
            f"{args.index} was built with other codebooks than the model {model_source}: pass the "
            "model the index was built with (mecoq index build MODEL_DIR ...)."
        )
    image_path = Path(args.image).expanduser()
    if not image_path.is_file():
        raise FileNotFoundError(f"Query image {image_path} does not exist.")
    query_image = decode_image({"bytes": None, "path": str(image_path)}, str(image_path))
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
        from ..visualization import save_retrieval_grid

        if sidecar is None:
            raise ValueError(
                f"--grid needs the database images, recorded in {sidecar_path(args.index).name} by "
                "`mecoq index build`; it is missing."
            )
        results = DataSource(**sidecar["data"]).images_by_id(ids)
        save_retrieval_grid(query_image, results, scores, labels, args.grid)
        print(f"Grid written to {args.grid}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..hub import load_model
    from ..retrieval.baselines import evaluate_pq_baseline
    from ..retrieval.evaluation import evaluate_model

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
    if args.baseline == "pq" and len(splits["train"]) < 256:
        raise ValueError(
            f"The PQ baseline learns K = 256 codewords per sub-space and needs >= 256 training images, got "
            f"{len(splits['train'])}. Use a larger training split (--train-size) with --baseline pq."
        )
    distance = args.distance or model.config.distance
    top_k = min(_evaluation_top_k(args), len(splits["database"]))
    options = {
        "top_k": top_k,
        "pr_curve": bool(args.pr_curve),
        "accelerator": accelerator,
        "batch_size": args.batch_size,
        "show_progress_bar": not args.no_progress,
        "feature_cache_dir": args.feature_cache,
    }
    queries, database = splits["query"], splits["database"]
    mecoq = evaluate_model(
        model, queries, database, distance=distance, num_workers=args.num_workers, **options
    )
    results = {"MeCoQ": mecoq}
    if args.baseline == "pq":
        if model.config.backbone_trainable != "frozen":
            _say(
                accelerator,
                f"PQ baseline: loading the pretrained backbone ({model.config.backbone_weights}).",
            )
        results["faiss PQ"] = evaluate_pq_baseline(model, splits, **options)
    if accelerator.is_main_process:
        _report_evaluation(args, definition, splits, model.config, distance, top_k, results)
    _finish(accelerator)
    return 0


def _evaluation_splits(args: argparse.Namespace) -> tuple[SplitDefinition, dict[str, Any] | None]:
    """The recorded splits of the model folder, or new ones from the split options (then not checked)."""
    overrides = _given(args, DATA_FLAGS)
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
        read_json(training_args, "Training arguments").get("top_k") if training_args.is_file() else None
    )
    return int(recorded or 1000)


def _report_evaluation(
    args: argparse.Namespace,
    definition: SplitDefinition,
    splits: DatasetDict,
    config: MeCoQConfig,
    distance: str,
    top_k: int,
    results: dict[str, RetrievalResult],
) -> None:
    """Print the mAP table; write the metrics JSON and the PR-curve PNG."""
    num_queries, num_database = len(splits["query"]), len(splits["database"])
    print(
        f"mAP@{top_k}: {num_queries} queries vs {num_database} database items of {definition.name}, "
        f"{distance}, {config.bits} bits (M={config.num_codebooks}, K={config.codebook_size})"
    )
    for method, result in results.items():
        print(f"  {method:<10} {result.map_at_k:.4f}")
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
        metric = f"map@{top_k}"
        payload = {"model": str(args.model), "dataset": dataset, "top_k": top_k, "distance": distance,
                   "bits": config.bits, "metrics": {metric: results["MeCoQ"].map_at_k}}  # fmt: skip
        if "faiss PQ" in results:
            payload["baselines"] = {
                "pq": {metric: results["faiss PQ"].map_at_k, **results["faiss PQ"].details}
            }
        write_json(args.output, payload)
        print(f"Metrics written to {args.output}")
    if args.pr_curve:
        from ..visualization import plot_pr_curve

        bits = {
            "MeCoQ": config.bits,
            "faiss PQ": 8 * config.num_codebooks,
        }  # PQ: K = 256, one byte a codebook
        curves = {f"{method} ({bits[method]} bits)": result.pr_curve for method, result in results.items()}
        plot_pr_curve(curves, args.pr_curve, title=f"Precision-recall, {definition.name}")
        print(f"Precision-recall curve written to {args.pr_curve}")


def cmd_push(args: argparse.Namespace) -> int:
    from ..hub import push_model_to_hub

    folder = Path(args.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist.")
    record_path = folder / "run_record.json"
    run_record = read_json(record_path, "Run record") if record_path.is_file() else None
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


def cmd_card(args: argparse.Namespace) -> int:
    from ..model_card import build_model_card

    folder = Path(args.model)
    record_path = folder / "run_record.json"
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{record_path} does not exist: `mecoq card` needs a folder written by mecoq train."
        )
    run_record = read_json(record_path, "Run record")
    if args.metrics:
        run_record = _with_evaluation(run_record, folder, Path(args.metrics))
    output = Path(args.output) if args.output else folder / "README.md"
    card = build_model_card(run_record, repo_id=args.repo_id)
    write_atomic(output, lambda name: card.save(name))
    print(f"Model card written to {output}")
    return 0


def _with_evaluation(run_record: dict[str, Any] | None, folder: Path, metrics_path: Path) -> dict[str, Any]:
    """Merge a `mecoq evaluate --output` file into the run record, so the card reports the test mAP."""
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"Metrics file {metrics_path} does not exist (write it with mecoq evaluate --output)."
        )
    evaluation = read_json(metrics_path, "Metrics file")
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("metrics"), dict):
        raise TypeError(f"{metrics_path} is not a `mecoq evaluate --output` file (no 'metrics' mapping).")
    record = dict(run_record or {"config": read_json(folder / "config.json", "Model config")})
    record["metrics"] = {**(record.get("metrics") or {}), **evaluation["metrics"]}
    record["eval_datasets"] = {**(record.get("eval_datasets") or {}), "": evaluation.get("dataset") or {}}
    return record


def cmd_push_index(args: argparse.Namespace) -> int:
    from ..hub import push_index_to_hub

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


def _subparser(
    commands: Any, name: str, handler: Handler, help_text: str, description: str
) -> argparse.ArgumentParser:
    """The parser of one command; `main` calls `handler(args)` when it is chosen."""
    parser = commands.add_parser(
        name, help=help_text, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(handler=handler)
    _debug_option(parser, argparse.SUPPRESS)  # SUPPRESS: a `mecoq --debug cmd` is not reset by the subcommand
    return parser


def _train_parser(commands: Any) -> None:
    parser = _subparser(
        commands,
        "train",
        cmd_train,
        "train a MeCoQ model",
        (
            "Train MeCoQ on a dataset split into query / validation / database / train; the output folder becomes a\n"
            "model folder (config.json, model.safetensors, codebooks.safetensors, splits.json, run_record.json).\n"
            "Settings: preset < --config file (sections model:, training:, data:) < flags < --set.\n\n"
            "Multi-process: accelerate launch --config_file configs/accelerate/cpu_2_processes.yaml -m mecoq_hf.cli train ..."
        ),
    )
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
        cmd_evaluate,
        "mAP@K on the query split, PR curve, PQ baseline",
        (
            "mAP@K of the query split's embeddings against the database split's codes. The splits are rebuilt from\n"
            "MODEL_DIR/splits.json (checked against its fingerprints); split options build new ones instead."
        ),
    )
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
    parser.add_argument(
        "--feature-cache",
        metavar="DIR",
        help="keep the backbone features in DIR and reuse them (e.g. the training run's "
        "training.feature_cache_dir): the model and the PQ baseline then share one backbone pass",
    )
    _data_options(parser, required=False)
    _split_options(parser)
    _run_options(parser)


def _encoding_parser(
    commands: Any, name: str, handler: Handler, help_text: str, description: str, output: str
) -> argparse.ArgumentParser:
    """A command that runs MODEL_DIR over a dataset and writes `--output`."""
    parser = _subparser(commands, name, handler, help_text, description)
    parser.add_argument("model", metavar="MODEL_DIR")
    parser.add_argument("--output", required=True, metavar=output)
    _data_options(parser, required=True)
    _run_options(parser)
    return parser


def _data_command_parsers(commands: Any) -> None:
    encode = _encoding_parser(
        commands,
        "encode",
        cmd_encode,
        "encode a dataset into codes (safetensors)",
        "Hard-code every image of a dataset: codes (N, M), ids (the dataset's index column) and labels.",
        "codes.safetensors",
    )
    encode.add_argument("--embeddings", action="store_true", help="also store the embeddings (N, d)")

    index = commands.add_parser("index", help="build a searchable code index", description="Code indexes.")
    builders = index.add_subparsers(dest="index_command", metavar="{build}", required=True)
    build = _encoding_parser(
        builders,
        "build",
        cmd_index_build,
        "encode a dataset into a CodeIndex",
        (
            "Encode a dataset and write a CodeIndex (ids = the dataset's index column) plus INDEX.meta.json with\n"
            "the labels, image paths and data source, which mecoq search prints and draws."
        ),
        "index.safetensors",
    )
    build.add_argument("--distance", choices=("asymmetric", "symmetric"), help="default: the model's config")

    search = _subparser(
        commands,
        "search",
        cmd_search,
        "search an index with an image",
        "Print the ranked ids, labels and scores of an image's nearest items; optionally draw a grid.",
    )
    search.add_argument("index", metavar="INDEX", help="an index written by mecoq index build")
    search.add_argument("--model", metavar="MODEL_DIR", help="default: the model recorded in INDEX.meta.json")
    search.add_argument("--image", required=True, metavar="PATH", help="the query image")
    search.add_argument("--top-k", type=int, default=10, metavar="K", help="number of results (default 10)")
    search.add_argument("--grid", metavar="out.png", help="write a PNG of the query and its results")


def _hub_parsers(commands: Any) -> None:
    push = _subparser(
        commands,
        "push",
        cmd_push,
        "push a model folder to the Hub",
        "Push a model folder with its model card (built from run_record.json) in one commit.",
    )
    push.add_argument("model", metavar="MODEL_DIR")
    push.add_argument("repo_id", metavar="REPO_ID", help="namespace/name")
    push.add_argument(
        "--metrics", metavar="metrics.json", help="a mecoq evaluate --output file to report on the card"
    )
    push.add_argument("--revision", help="branch (created if missing; default main)")
    push.add_argument("--commit-message")
    card = _subparser(
        commands,
        "card",
        cmd_card,
        "write the model card of a model folder",
        "Render the model card (what MeCoQ is, backbone and weights licence, bits, hyperparameters, mAP results\n"
        "as model-index entries) from run_record.json, by default into MODEL_DIR/README.md.",
    )
    card.add_argument("model", metavar="MODEL_DIR")
    card.add_argument(
        "--metrics", metavar="metrics.json", help="a mecoq evaluate --output file to report on the card"
    )
    card.add_argument(
        "--repo-id", metavar="REPO_ID", help="the repo the card will live in (for its usage snippet)"
    )
    card.add_argument("--output", metavar="FILE", help="default: MODEL_DIR/README.md")
    push_index = _subparser(
        commands,
        "push-index",
        cmd_push_index,
        "push an index file to the Hub",
        "Upload a CodeIndex file (checked first) to a dataset (default) or model repo.",
    )
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

    from ..hub import HubUploadError

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


__all__ = ["build_parser", "main", "parse_assignment", "read_config_file", "resolve_train_settings"]


if __name__ == "__main__":
    sys.exit(main())
