# ##################################################################################################
# The paper's CIFAR-10 recipe: MeCoQ on VGG-16 fc7 features (fc6 + fc7 fine-tuned), 16/32/64 bits.
#
# Settings are the reference scripts' (`cifar10-i-*` / `cifar10-ii-*` presets, docs/method.md §9): 224 px
# inputs (CIFAR's 32 px upsampled), batch 128, SGD lr 0.01 with one warm-up epoch and cosine decay, up to 50
# epochs, mAP@1000. Splits follow the CIFAR-10 protocols on the merged 60,000 images: 1,000 queries per class;
# protocol I trains on the whole 50,000-image database, protocol II on 500 images per class. Unlike the
# reference code, the checkpoint is chosen on a validation split (100 images per class held out of the
# database), never on the queries.
#
# Needs what this project's offline machines lack: ImageNet VGG-16 weights (timm's `vgg16.tv_in1k` from the
# Hub, or a local torchvision `vgg16-397923af.pth` via --vgg-weights) and CIFAR-10 (the Hub dataset
# `uoft-cs/cifar10`, or --data: an image folder with train/<class>/ and test/<class>/, or a save_to_disk
# folder with train and test splits). Offline, it stops at once with a message saying what to pass. Plan on
# a GPU: VGG-16 at 224 px is far too slow for a CPU.
#
#   python examples/train_cifar10_vgg16.py --protocol II --bits 32 --output-dir runs/cifar10-ii-32
#   accelerate launch --config_file configs/accelerate/multi_gpu.yaml examples/train_cifar10_vgg16.py \
#       --protocol I --bits 64 --data /data/cifar10 --vgg-weights /weights/vgg16-397923af.pth
# Afterwards: `mecoq evaluate runs/cifar10-ii-32 --baseline pq --pr-curve pr.png`.
# ##################################################################################################
from __future__ import annotations

import argparse
import sys

HUB_DATASET = "uoft-cs/cifar10"
TOP_K = 1000
# Weight decay beta of the reference scripts (docs/method.md §9): (protocol, bits) -> beta.
WEIGHT_DECAY = {
    ("I", 16): 1e-3,
    ("I", 32): 1e-3,
    ("I", 64): 1e-3,
    ("II", 16): 1e-2,
    ("II", 32): 5e-3,
    ("II", 64): 1e-2,
}


def offline_problems(args) -> list[str]:
    """What this run would need from the Hub while the Hub is switched off (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE)."""
    import datasets
    from huggingface_hub import constants

    if not (constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE):
        return []
    problems = []
    if args.data is None:
        problems.append(f"CIFAR-10 would come from the Hub dataset {HUB_DATASET!r}: pass --data DIR (an "
                        "image folder with train/<class>/ and test/<class>/, or a save_to_disk "
                        "folder)")  # fmt: skip
    if args.vgg_weights is None:
        problems.append("the ImageNet VGG-16 weights would come from timm's Hub checkpoint vgg16.tv_in1k: "
                        "pass --vgg-weights PATH (torchvision's vgg16-397923af.pth or a .safetensors "
                        "file)")  # fmt: skip
    return problems


def training_function(config, args):
    from mecoq_hf import MeCoQConfig
    from mecoq_hf.data.splits import SplitDefinition
    from mecoq_hf.training import RunFolder, TrainingArguments, build_accelerator, train_on_splits

    training_args = TrainingArguments(
        output_dir=args.output_dir, num_epochs=config["epochs"], batch_size=config["batch_size"],
        learning_rate=config["lr"], weight_decay=config["weight_decay"],
        backbone_lr_scale=config["backbone_lr_scale"], patience=config["patience"], top_k=TOP_K, seed=2021,
        num_workers=args.num_workers, report_to="auto", resume=args.resume,
    )  # fmt: skip
    accelerator = build_accelerator(training_args)
    # CIFAR-10 protocol splits of the merged train + test images, recorded in the run folder (splits.json)
    # for `mecoq evaluate`.
    definition = SplitDefinition(
        source=args.data or HUB_DATASET, split="train+test", image_column=args.image_column or
        ("img" if args.data is None else "image"), protocol=f"cifar10-{args.protocol.lower()}",
        num_validation=args.num_validation, seed=2021,
    )  # fmt: skip
    splits = RunFolder(args.output_dir).record_splits(definition, accelerator, resume=args.resume)
    accelerator.print(definition.describe(splits))
    model_config = MeCoQConfig.from_preset(
        f"cifar10-{args.protocol.lower()}-{args.bits}", backbone_weights=args.vgg_weights or "timm"
    )
    result = train_on_splits(model_config, training_args, splits, accelerator=accelerator)
    accelerator.print(f"Best validation mAP@{TOP_K}: {result.best_metric:.4f} (epoch {result.best_epoch}). "
                      f"Test it with: mecoq evaluate {args.output_dir}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(
        description="MeCoQ on CIFAR-10 with VGG-16 (the paper's recipe; needs a GPU)."
    )
    parser.add_argument(
        "--protocol", choices=("I", "II"), default="II", help="CIFAR-10 protocol (docs/method.md §8)"
    )
    parser.add_argument("--bits", type=int, choices=(16, 32, 64), default=32)
    parser.add_argument(
        "--data", default=None, help=f"local CIFAR-10 (default: the Hub dataset {HUB_DATASET})"
    )
    parser.add_argument(
        "--image-column", default=None, help="image column (default: img on the Hub, else image)"
    )
    parser.add_argument(
        "--vgg-weights", default=None, help="local VGG-16 ImageNet weights (default: timm's, from the Hub)"
    )
    parser.add_argument(
        "--num-validation", type=int, default=1000, help="validation images held out of the database"
    )
    parser.add_argument("--output-dir", default=None, help="default: runs/cifar10-<protocol>-<bits>")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    args = parser.parse_args()
    args.output_dir = args.output_dir or f"runs/cifar10-{args.protocol.lower()}-{args.bits}"
    problems = offline_problems(args)
    if problems:
        print(
            "error: the Hugging Face Hub is switched off, and " + "; ".join(problems) + ".", file=sys.stderr
        )
        sys.exit(2)
    config = {
        "epochs": args.epochs, "batch_size": 128, "lr": 0.01, "patience": 10,
        "weight_decay": WEIGHT_DECAY[(args.protocol, args.bits)],
        "backbone_lr_scale": 1.0,  # what the reference code ran (its scheduler reset the 1e-3 scale)
    }  # fmt: skip
    try:
        training_function(config, args)
    except (ValueError, OSError) as error:  # unreachable Hub, missing files: one clear line, not a traceback
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
