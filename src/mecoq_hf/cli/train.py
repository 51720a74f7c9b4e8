"""`mecoq train`: flags -> run settings -> recorded splits -> `training.train_on_splits` -> a model folder."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .common import DATA_FLAGS, _data_options, _given, _report_skipped, _say, _split_options, _subparser

if TYPE_CHECKING:
    from ..training import RunSettings

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


def settings_from_flags(args: argparse.Namespace) -> RunSettings:
    """The run settings of parsed `mecoq train` arguments: preset < --config file < flags < --set."""
    from ..training import resolve_run_settings

    overrides = {section: _given(args, flags) for section, flags in TRAIN_FLAGS.items()}
    if args.resume:
        overrides["training"]["resume"] = True
    if args.no_progress:
        overrides["training"]["progress_bar"] = False
    return resolve_run_settings(args.preset, args.config, overrides, args.set or (), args.bits)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import RunFolder, build_accelerator, train_on_splits

    config, training_args, definition = settings_from_flags(args)
    accelerator = build_accelerator(training_args)
    run = RunFolder(training_args.output_dir)
    splits = run.record_splits(definition, accelerator, resume=training_args.resume)
    _report_skipped(accelerator, definition.skipped_images)  # also recorded in splits.json
    _say(accelerator, f"Data: {definition.describe(splits)}.")
    _say(
        accelerator,
        f"Model: {config.backbone}, {config.bits} bits (M={config.num_codebooks} x K="
        f"{config.codebook_size}, d={config.embedding_dim}); {accelerator.num_processes} process(es).",
    )
    result = train_on_splits(config, training_args, splits, accelerator=accelerator)
    selected = (
        f"best validation mAP@{training_args.top_k} {result.best_metric:.4f} at epoch {result.best_epoch}"
        if result.best_metric is not None
        else "no validation mAP was computed: the last model is kept"
    )
    _say(accelerator, f"Trained model saved to {run.path} ({selected}).\nNext: mecoq evaluate {run.path}")
    return 0


def _train_parser(commands: Any) -> None:
    parser = _subparser(
        commands,
        "train",
        cmd_train,
        "train a MeCoQ model",
        (
            "Train MeCoQ on a dataset split into query / validation / database / train; the output folder\n"
            "becomes a model folder (config.json, model.safetensors, codebooks.safetensors, splits.json,\n"
            "run_record.json). Settings: preset < --config file (sections model:, training:, data:) < flags\n"
            "< --set.\n\n"
            "Multi-process: accelerate launch --config_file configs/accelerate/cpu_2_processes.yaml \\\n"
            "    -m mecoq_hf.cli train ..."
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
        "--bits",
        type=int,
        help="code length: M = bits / log2(K) codebooks (K = 256: bits / 8; keeps D = d / M)",
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
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars: print one line per phase (caching views, validation features, training, "
        "each validation) with its duration when it ends",
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any setting, e.g. model.temperature=0.3, training.weight_decay=1e-3, data.per_class=false "
        "(repeatable; the section may be omitted when the key is unambiguous)",
    )
    _data_options(parser, required=False)
    _split_options(parser)


__all__ = ["cmd_train", "settings_from_flags"]
