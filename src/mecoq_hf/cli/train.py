"""`mecoq train`: flags -> run settings -> recorded splits -> `training.train_on_splits` -> a model folder.

Without a GPU, a run whose backbone (or the trunk before its trainable last layer groups) is frozen trains on
cached augmented views unless `--cached-views` (or `training.cached_views`) says otherwise, and says so; a run
that must take the slow path is told how long it will take and what is faster.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import TYPE_CHECKING, Any

from .common import DATA_FLAGS, _data_options, _given, _report_skipped, _say, _split_options, _subparser

if TYPE_CHECKING:
    from ..training import RunSettings

# What `mecoq train` uses unless a preset, the config file or a flag says otherwise (below the preset):
# the last backbone layer group trains with the head, at the head's learning rate. Chosen on the validation
# split of the quality benchmark (BENCHMARKS.md, "Choosing the CLI's defaults"): +3 to +4 validation mAP
# points over the frozen backbone at 32 bits, on the cached trunk outputs that keep it practical on a CPU.
# The Python API keeps `MeCoQConfig`'s and `TrainingArguments`' own defaults (frozen backbone).
CLI_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"backbone_trainable": 1},
    "training": {"backbone_lr_scale": 1.0},
}
# Cached views per training image on a machine without a GPU when nothing sets `cached_views`.
CPU_CACHED_VIEWS = 8

TRAIN_FLAGS = {  # section -> {setting -> flag} of `mecoq train`
    "model": {
        "image_size": "image_size",
        "num_codebooks": "num_codebooks",
        "embedding_dim": "embedding_dim",
        "backbone_trainable": "backbone_trainable",
    },
    "training": {
        "output_dir": "output_dir",
        "num_epochs": "epochs",
        "batch_size": "batch_size",
        "learning_rate": "learning_rate",
        "seed": "seed",
        "max_steps": "max_steps",
        "mixed_precision": "mixed_precision",
        "cached_views": "cached_views",
    },
    "data": DATA_FLAGS,
}


def _resolver(args: argparse.Namespace):
    """resolve_run_settings of the parsed flags, waiting for its `defaults`."""
    from ..training import resolve_run_settings

    overrides = {section: _given(args, flags) for section, flags in TRAIN_FLAGS.items()}
    if args.resume:
        overrides["training"]["resume"] = True
    if args.no_progress:
        overrides["training"]["progress_bar"] = False
    return functools.partial(
        resolve_run_settings, args.preset, args.config, overrides, args.set or (), args.bits
    )


def settings_from_flags(args: argparse.Namespace) -> RunSettings:
    """The run settings of parsed `mecoq train` arguments: CLI defaults < preset < --config file < flags <
    --set."""
    return _resolver(args)(defaults=CLI_DEFAULTS)


def _cpu_training_path(
    args: argparse.Namespace, settings: RunSettings, train_size: int
) -> tuple[RunSettings, str]:
    """Without a GPU: cached views when nothing set `cached_views` and the backbone or its trunk is frozen
    (returned with the line that says so); else the settings and, for the slow path, its expected time."""
    import torch

    config, training, _ = settings
    if torch.cuda.is_available() or training.cached_views:
        return settings, ""
    defaults = {**CLI_DEFAULTS, "training": {**CLI_DEFAULTS["training"], "cached_views": CPU_CACHED_VIEWS}}
    cached = _resolver(args)(defaults=defaults)
    chosen_by_user = cached.training.cached_views != CPU_CACHED_VIEWS
    if _can_cache_views(config) and not chosen_by_user:
        return cached, (
            f"No GPU: training on {CPU_CACHED_VIEWS} cached augmented views per image (the frozen "
            f"{'backbone' if config.backbone_trainable == 'frozen' else 'trunk'} runs once per view instead "
            "of every step). For fresh augmentations every step pass --cached-views 0 (much slower)."
        )
    return settings, _slow_path_estimate(config, training, train_size, can_cache=_can_cache_views(config))


def _can_cache_views(config) -> bool:
    """True when the backbone is frozen, or its trainable last layer groups follow a frozen trunk that can be
    cut off (the architecture is built on the meta device: no memory, no weights)."""
    import torch

    from ..models.mecoq.backbones import TimmBackbone

    with torch.device("meta"):
        backbone = TimmBackbone(
            config.backbone,
            image_size=config.image_size,
            trainable=config.backbone_trainable,
            model_kwargs=config.backbone_kwargs,
        )
    return not backbone.is_trainable or backbone.has_frozen_trunk


def _slow_path_estimate(config, training, train_size: int, *, can_cache: bool) -> str:
    """The expected training time on fresh augmentations, from a timed forward pass of the backbone on this
    CPU (a backward costs about twice a forward; two views per image), and what is faster."""
    import torch

    from ..models.mecoq.backbones import TimmBackbone

    backbone = TimmBackbone(config.backbone, image_size=config.image_size, trainable="frozen",
                            model_kwargs=config.backbone_kwargs).eval()  # fmt: skip
    size = backbone.data_config["input_size"][-1]
    images = torch.zeros(4, 3, size, size)
    with torch.no_grad():
        backbone(images)  # warm-up
        started = time.perf_counter()
        backbone(images)
    per_image = (time.perf_counter() - started) / len(images)
    trains = config.backbone_trainable != "frozen"
    seconds = training.num_epochs * train_size * 2 * per_image * (3 if trains else 1)
    faster = (f"--cached-views {CPU_CACHED_VIEWS}" if can_cache else
              f"--set model.backbone_trainable=2 --cached-views {CPU_CACHED_VIEWS} (only the last two layer "
              "groups train, on cached outputs of the frozen trunk)")  # fmt: skip
    return (
        f"No GPU: training on fresh augmentations every step, the backbone runs {1 / per_image:.0f} images/s "
        f"forward here, so {training.num_epochs} epochs of {train_size} images take about "
        f"{_duration(seconds)} (at most; early stopping may end sooner). Faster: {faster}, or a GPU."
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{math.ceil(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import RunFolder, build_accelerator

    settings = settings_from_flags(args)
    accelerator = build_accelerator(settings.training)
    run = RunFolder(settings.training.output_dir)
    with run.writer_lock(accelerator):  # one run per folder, from the split record to the saved model
        result, training_args = _record_splits_and_train(args, settings, run, accelerator)
    selected = (
        f"best validation mAP@{training_args.top_k} {result.best_metric:.4f} at epoch {result.best_epoch}"
        if result.best_metric is not None
        else "no validation mAP was computed: the last model is kept"
    )
    _say(accelerator, f"Trained model saved to {run.path} ({selected}).\nNext: mecoq evaluate {run.path}")
    return 0


def _record_splits_and_train(args: argparse.Namespace, settings: Any, run: Any, accelerator: Any) -> tuple:
    """(TrainingResult, TrainingArguments) of the run, after saying what it trains on and how."""
    from ..training import describe_run_settings, train_on_splits

    splits = run.record_splits(settings.data, accelerator, resume=settings.training.resume)
    _report_skipped(accelerator, settings.data.skipped_images)  # also recorded in splits.json
    settings, note = _cpu_training_path(args, settings, len(splits["train"]))
    config, training_args, definition = settings
    _say(accelerator, describe_run_settings(settings, args.preset))
    if note:
        _say(accelerator, note)
    _say(accelerator, f"Data: {definition.describe(splits)}.")
    _say(
        accelerator,
        f"Model: {config.backbone}, {config.bits} bits (M={config.num_codebooks} x K="
        f"{config.codebook_size}, d={config.embedding_dim}); {accelerator.num_processes} process(es).",
    )
    return train_on_splits(config, training_args, splits, accelerator=accelerator), training_args


def _trainable_groups(text: str) -> str | int:
    """--backbone-trainable: 'frozen', 'all' or a number of last layer groups."""
    if text in ("frozen", "all"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"expected 'frozen', 'all' or a number of layer groups >= 1, got {text!r}"
    )


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
    model.add_argument(
        "--backbone-trainable",
        type=_trainable_groups,
        metavar="{frozen,all,N}",
        help="backbone layers that train: the last N layer groups, 'frozen' or 'all' (default: 1, at the "
        "head's learning rate; a reference-script preset sets its own)",
    )
    run = parser.add_argument_group("training")
    run.add_argument("--epochs", type=int, metavar="N", help="maximum number of epochs")
    run.add_argument("--batch-size", type=int, metavar="B", help="images per process per step")
    run.add_argument("--learning-rate", type=float, metavar="LR", help="peak learning rate")
    run.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (resumable)")
    run.add_argument(
        "--cached-views",
        type=int,
        metavar="V",
        help=f"augmented views per training image computed once with the frozen backbone (or trunk); 0: "
        f"fresh augmentations every step (default without a GPU: {CPU_CACHED_VIEWS} when the backbone or its "
        "trunk is frozen, else 0)",
    )
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
