"""`mecoq train`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.splits import SPLITS_FILE, SplitDefinition
from ..file_io import read_json, write_json
from .common import _data_options, _say, _split_options, _subparser
from .settings import resolve_train_settings

if TYPE_CHECKING:
    from datasets import DatasetDict


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
