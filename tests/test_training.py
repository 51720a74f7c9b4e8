"""The training loop (`training.trainer`): bad input, exact resume, model selection, a real 2-process run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tiny_runs import TINY_MODEL

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.splits import SplitDefinition
from mecoq_hf.data.transforms import build_train_transform
from mecoq_hf.feature_cache import compute_view_features
from mecoq_hf.retrieval.evaluation import evaluate_model
from mecoq_hf.training import RunFolder, TrainingArguments, train, train_on_splits
from mecoq_hf.training.checkpoints import list_checkpoints
from mecoq_hf.training.optimization import learning_rate_factor

TINY = {**TINY_MODEL, "memory_size": 16, "memory_start_epoch": 1}


@pytest.fixture(scope="module")
def fashion_images():
    return load_fashion_mnist("test", limit=48)


def tiny_args(tmp_path: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        num_epochs=2,
        batch_size=8,
        learning_rate=0.05,
        log_every_steps=1,
        progress_bar=False,
        report_to=[],
        seed=0,
        deterministic=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def test_bad_inputs_are_refused(tmp_path, fashion_images):
    with pytest.raises(ValueError, match="training dataset is empty"):
        train(MeCoQConfig(**TINY), tiny_args(tmp_path), fashion_images.select([]))
    with pytest.raises(ValueError, match="or neither"):
        train(MeCoQConfig(**TINY), tiny_args(tmp_path), fashion_images, validation_queries=fashion_images)
    with pytest.raises(ValueError, match="image_size=16 is too small for 'test_efficientnet'"):
        train(MeCoQConfig(**{**TINY, "image_size": 16}), tiny_args(tmp_path), fashion_images)
    with pytest.raises(ValueError, match="cached_views=4 needs a frozen backbone or a frozen trunk"):
        train(
            MeCoQConfig(**{**TINY, "backbone_trainable": "all"}),
            tiny_args(tmp_path, cached_views=4),
            fashion_images,
        )
    with pytest.raises(ValueError, match="no 'image' column|image"):
        train(MeCoQConfig(**TINY), tiny_args(tmp_path), fashion_images.remove_columns("image"))


def _final_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(folder)[-1] / "model.safetensors"))


@pytest.mark.parametrize(
    "cached_views, trainable", [(0, "frozen"), (4, "frozen"), (4, 1)], ids=["images", "features", "tail"]
)
def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, fashion_images, cached_views, trainable):
    warnings.simplefilter("ignore")
    config = MeCoQConfig(**{**TINY, "backbone_trainable": trainable})
    common = dict(checkpoint_every_steps=2, cached_views=cached_views)
    train(config, tiny_args(tmp_path / "straight", **common), fashion_images)
    # Stop after 3 of the 12 steps (mid-epoch), leaving a half-written checkpoint folder as a crash would.
    interrupted = tmp_path / "interrupted"
    train(config, tiny_args(interrupted, max_steps=3, **common), fashion_images)
    assert [p.name for p in list_checkpoints(interrupted)] == ["step_2", "step_3"]
    (interrupted / "checkpoints" / ".tmp-step_4").mkdir()
    result = train(config, tiny_args(interrupted, resume=True, **common), fashion_images)
    straight, resumed = _final_state(tmp_path / "straight"), _final_state(interrupted)
    assert straight.keys() == resumed.keys() and "memory.codes" in straight
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert result.model.memory.num_filled == 16
    assert json.loads((interrupted / "run_record.json").read_text())["finished"] is True
    reloaded = MeCoQModel.from_pretrained(interrupted)
    assert torch.equal(reloaded.projection.weight, straight["projection.weight"])
    # The resumed schedule continues at step 4 with the straight run's learning rates (log every step).
    learning_rates = [
        {record["step"]: record["lr"] for record in RunFolder(folder).read_log() if record["event"] == "step"}
        for folder in (tmp_path / "straight", interrupted)
    ]
    assert learning_rates[0] == learning_rates[1] and len(learning_rates[0]) == 12


def test_the_log_shows_the_learning_rate_each_step_trained_with(tmp_path, fashion_images):
    """Step s of 12 (6 per epoch, 1 warm-up epoch) trains at learning_rate_factor(s - 1) x the peak; the log
    must show that rate, not the next step's (the scheduler has already stepped when the step is logged)."""
    warnings.simplefilter("ignore")
    args = tiny_args(tmp_path, num_epochs=2, warmup_epochs=1.0, warmup_start_lr=0.01)
    train(MeCoQConfig(**TINY), args, fashion_images)
    logged = {r["step"]: r["lr"] for r in RunFolder(tmp_path).read_log() if r["event"] == "step"}
    expected = {
        step: args.learning_rate
        * learning_rate_factor(step - 1, 12, 6, args.learning_rate, args.warmup_start_lr, args.final_lr)
        for step in range(1, 13)
    }
    assert logged == pytest.approx(expected, rel=1e-12)
    assert logged[1] == pytest.approx(0.01)


def test_validation_selects_the_best_epoch_and_writes_a_model_folder(tmp_path, fashion_images):
    warnings.simplefilter("ignore")
    queries, database = (
        load_fashion_mnist("train", limit=20),
        load_fashion_mnist("train", limit=120).select(range(20, 120)),
    )
    result = train(
        MeCoQConfig(**TINY), tiny_args(tmp_path, num_epochs=3, top_k=50), fashion_images, queries, database
    )
    scores = [record["validation_map"] for record in result.history]
    assert len(scores) == 3 and result.best_metric == pytest.approx(max(scores))
    assert result.best_epoch == scores.index(max(scores))
    assert result.model.memory.num_filled == 16  # reloading the best weights keeps the trained memory
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "codebooks.safetensors", "preprocessor_config.json",
            "training_args.json", "run_record.json", "log.jsonl"} <= files  # fmt: skip
    record = json.loads((tmp_path / "run_record.json").read_text())
    assert record["metrics"]["best_validation_map"] == pytest.approx(result.best_metric)
    assert record["training_args_defaults"]["num_epochs"] == 50 and record["training_args"]["num_epochs"] == 3
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"loss", "contrastive", "entropy", "lr", "images_per_second"} <= steps[0].keys()


@pytest.mark.slow
def test_two_process_accelerate_run_keeps_ranks_identical(tmp_path):
    script = Path(__file__).parent / "scripts" / "train_two_processes.py"
    # No ACCELERATE_USE_CPU: `build_accelerator` must join CPU processes over gloo by itself.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
        str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["num_processes"] == 2 for rank in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["memory_sum"] == ranks[1]["memory_sum"] and ranks[0]["memory_filled"] == 32
    # 3 epochs x 2 views x 92 real codes entered the 32 slots, not the 4 duplicates even_batches padded.
    assert ranks[0]["memory_pointer"] == ranks[1]["memory_pointer"] == (3 * 2 * 92) % 32
    steps = [
        json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"step"' in line
    ]
    losses = [record["loss"] for record in steps if record.get("event") == "step" and record["epoch"] == 0]
    assert losses[-1] < losses[0]
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob(".saving-*"))


def test_bf16_mixed_precision_trains_on_the_cpu(tmp_path, fashion_images):
    from accelerate.state import AcceleratorState

    warnings.simplefilter("ignore")
    # Accelerate keeps one process-wide state: earlier tests' fp32 Accelerators must not fix the precision.
    AcceleratorState._reset_state(reset_partial_state=True)
    config = MeCoQConfig(**{**TINY, "memory_start_epoch": 0})
    result = train(config, tiny_args(tmp_path, num_epochs=1, mixed_precision="bf16"), fashion_images)
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in steps if record["event"] == "step"]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert result.model.memory.codes.dtype == torch.float32 and result.model.memory.num_filled == 16
    assert result.model.projection.weight.dtype == torch.float32  # master weights stay fp32
    AcceleratorState._reset_state(reset_partial_state=True)


def test_train_on_recorded_splits_records_the_data_it_trained_on(tmp_path):
    warnings.simplefilter("ignore")
    definition = SplitDefinition(
        source="fashion-mnist", split="test", limit=60, num_query=6, num_validation=0, num_train=24, seed=0
    )
    run = RunFolder(tmp_path)
    splits = run.record_splits(definition)
    result = train_on_splits(MeCoQConfig(**TINY), tiny_args(tmp_path, num_epochs=1), splits)
    assert result.best_metric is None  # an empty validation split: the last model is kept
    assert (tmp_path / "model.safetensors").is_file()
    dataset = run.read_run_record()["dataset"]
    assert dataset == {
        "train_size": 24,
        "info": "",
        "name": "fashion-mnist",
        "train_split": "test",  # the source's split the training images come from
        "limit": 60,
        "split_sizes": {"query": 6, "validation": 0, "database": 54, "train": 24},
        "train_from_database": True,
        "protocol": definition.describe(splits),
        "license": "mit",  # the data source's licence, from the table next to load_fashion_mnist
    }
    assert [record["step"] for record in run.read_log() if record["event"] == "step"] == [1, 2, 3]
    assert run.recorded_training_args() == tiny_args(tmp_path, num_epochs=1).to_dict()


def _step_records(folder: Path) -> list[dict]:
    return [record for record in RunFolder(folder).read_log() if record["event"] == "step"]


def test_codewords_stay_unit_norm_and_each_group_gets_its_learning_rate_scale(tmp_path, fashion_images):
    # Trainable codebooks drift off unit norm under SGD unless renormalised after every step (§2.3).
    warnings.simplefilter("ignore")
    config = MeCoQConfig(**{**TINY, "backbone_trainable": 1})
    args = tiny_args(tmp_path, cached_views=4, backbone_lr_scale=0.1, codebook_lr_scale=3.0)
    result = train(config, args, fashion_images)
    norms = result.model.quantizer.codebooks.detach().norm(dim=-1)  # (M, K)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    steps = _step_records(tmp_path)
    assert len(steps) == 12
    for record in steps:
        assert record["lr_backbone"] == pytest.approx(0.1 * record["lr"], rel=1e-12)
        assert record["lr_codebooks"] == pytest.approx(3.0 * record["lr"], rel=1e-12)
    # the schedule applies to every group: step 7 (the first after the warm-up epoch) trains at the peak
    assert steps[-1]["lr"] < steps[7]["lr"] < steps[6]["lr"] == pytest.approx(0.05, rel=1e-12)


def _fresh_model(config: MeCoQConfig, seed: int = 0) -> MeCoQModel:
    """The model `train` starts from (it seeds, then builds the model first)."""
    set_seed(seed, deterministic=True)
    return MeCoQModel.for_training(config)


def test_kmeans_initialisation_places_the_codebooks_on_the_projected_training_views(tmp_path, fashion_images):
    warnings.simplefilter("ignore")
    config = MeCoQConfig(**TINY)
    cache = tmp_path / "cache"
    args = tiny_args(tmp_path / "run", cached_views=3, codebook_init="kmeans", codebook_lr_scale=0.0,
                     feature_cache_dir=str(cache))  # fmt: skip
    result = train(config, args, fashion_images)
    model = _fresh_model(config)
    data_config = model.backbone.data_config
    view = build_train_transform(32, data_config["mean"], data_config["std"])
    views = compute_view_features(model.backbone, fashion_images, view, 3, seed=0, batch_size=8,
                                  show_progress_bar=False, cache_dir=cache)  # fmt: skip
    with torch.no_grad():
        model.eval()
        model.quantizer.init_codebooks_from_embeddings_(model.project(views[:, 0]), iterations=30, seed=0)
    assert not torch.allclose(
        model.normalized_codebooks(), _fresh_model(config).normalized_codebooks(), atol=1e-3
    )
    assert torch.allclose(
        result.model.normalized_codebooks(), model.normalized_codebooks(), atol=1e-6
    )  # lr 0 kept them
    with torch.no_grad():
        embeddings = model.project(views[:, 0])
        used = [quantizer.encode(embeddings).unique(dim=0).shape[0]
                for quantizer in (result.model.quantizer, _fresh_model(config).quantizer)]  # fmt: skip
    assert used[0] > used[1]  # k-means codes spread the training views over more code words than random
    with pytest.raises(ValueError, match="only 12 images"):
        train(config, tiny_args(tmp_path / "few", codebook_init="kmeans"), fashion_images.select(range(12)))


def test_a_resumed_checkpoint_with_raw_norm_codewords_is_renormalised_first(tmp_path, fashion_images):
    warnings.simplefilter("ignore")
    config = MeCoQConfig(**TINY)
    common = dict(checkpoint_every_steps=3, cached_views=4)
    train(config, tiny_args(tmp_path / "straight", **common), fashion_images)
    old = tmp_path / "old"
    train(config, tiny_args(old, max_steps=3, **common), fashion_images)
    weights = list_checkpoints(old)[-1] / "model.safetensors"
    state = load_file(str(weights))
    state["quantizer.codebooks"] = state["quantizer.codebooks"] * 3.0  # as written before unit norm was kept
    save_file(state, str(weights), metadata={"format": "pt"})
    manifest_path = weights.parent / "manifest.json"  # the checkpoint stays consistent: only the norms change
    manifest = json.loads(manifest_path.read_text())
    data = weights.read_bytes()
    manifest["files"]["model.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest_path.write_text(json.dumps(manifest))
    train(config, tiny_args(old, resume=True, **common), fashion_images)
    straight, resumed = _final_state(tmp_path / "straight"), _final_state(old)
    assert torch.allclose(resumed["quantizer.codebooks"], straight["quantizer.codebooks"], atol=1e-6)
    assert torch.allclose(resumed["projection.weight"], straight["projection.weight"], atol=1e-6)


def test_a_trainable_tail_trains_on_cached_trunk_outputs_and_validates_like_a_full_evaluation(tmp_path):
    warnings.simplefilter("ignore")
    images = load_fashion_mnist("train", limit=160)
    queries, database, training_images = images.select(range(20)), images.select(range(20, 120)), images
    config = MeCoQConfig(**{**TINY, "backbone_trainable": 2})
    args = tiny_args(tmp_path, num_epochs=2, cached_views=3, top_k=50, backbone_lr_scale=1.0)
    result = train(config, args, training_images.select(range(120, 160)), queries, database)
    start = _fresh_model(config).backbone.model.state_dict()
    trained = result.model.backbone.model.state_dict()
    changed = {name for name in start if not torch.equal(start[name], trained[name])}
    tail = ("blocks.3.0.", "blocks.4.0.", "conv_head.", "bn2.")
    assert changed and all(name.startswith(tail) for name in changed)
    assert any("running_mean" in name for name in changed)  # tail BN trains in train mode
    full = evaluate_model(result.model, queries, database, top_k=50, show_progress_bar=False).map_at_k
    assert result.best_metric == pytest.approx(full, abs=5e-3)
