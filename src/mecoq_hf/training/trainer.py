"""Training MeCoQ with Accelerate: one CPU, one GPU or many processes (docs/method.md §5-§6).

The loop follows the shape of accelerate's examples: seed, build, one `prepare` call, then per step
forward two views -> loss -> backward -> SGD step -> per-iteration learning rate -> enqueue the gathered soft
codes into the code memory. After each evaluation epoch the validation split (never the query set) picks
the best model, with patience. Checkpoints (`training.checkpoints`) are complete or absent; `resume=True`
continues from the newest one.

The output folder is a ready model folder (`MeCoQModel.from_pretrained(output_dir)`) holding the best model,
its codebooks and preprocessor config, and the run's records (`training.run_folder.RunFolder`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, is_tensorboard_available, set_seed
from datasets import Dataset, DatasetDict

from ..data.loaders import make_train_dataloader
from ..data.transforms import build_train_transform
from ..encoding import module_mode, non_finite_parameter
from ..feature_cache import CachedViewPairs, compute_eval_features, compute_view_features
from ..models.mecoq.configuration_mecoq import MeCoQConfig
from ..models.mecoq.modeling_mecoq import MeCoQModel
from ..progress import format_duration, phase, show_mode
from .arguments import TrainingArguments
from .checkpoints import TrainerState, list_checkpoints, load_latest_checkpoint, save_checkpoint
from .optimization import build_optimizer, build_scheduler
from .run_folder import RunFolder
from .validation import ValidationSet, channels_last_on_cpu


@dataclass
class TrainingResult:
    """What `train` returns: the trained (best) model and where its folder is."""

    model: MeCoQModel
    output_dir: Path
    best_metric: float | None
    best_epoch: int | None
    history: list[dict[str, Any]]
    stopped_early: bool


def build_accelerator(args: TrainingArguments) -> Accelerator:
    """An Accelerator with a seedable sampler (so resumed epochs replay the same order) and trackers.

    Several processes on a machine without CUDA (`accelerate launch --multi_gpu --num_processes 2` on a CPU)
    are joined over gloo on the CPU; otherwise accelerate would start processes that never synchronise.
    """
    report_to = args.report_to
    if report_to == "auto":
        report_to = ["tensorboard"] if is_tensorboard_available() else []
    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=several_cpu_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to or None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def train(
    config: MeCoQConfig,
    args: TrainingArguments,
    train_dataset: Dataset,
    validation_queries: Dataset | None = None,
    validation_database: Dataset | None = None,
    accelerator: Accelerator | None = None,
) -> TrainingResult:
    """Train MeCoQ on `train_dataset` (an `image` column; labels are not used) and write a model folder.

    Args:
        config: the model configuration (backbone weights are loaded as `config.backbone_weights` says).
        args: optimisation and run settings.
        train_dataset: unlabelled training images.
        validation_queries, validation_database: labelled splits for model selection (mAP@args.top_k). Keep
            them apart from the final query set. Without them the last epoch's model is kept.
        accelerator: an existing Accelerator (else one is built from `args`).

    Returns:
        A `TrainingResult` with the selected model (the best validation epoch's, or the last).

    Raises:
        ValueError: an empty training set, only one of the validation splits, or settings that do not fit.
        TrainingRunLocked: another process is training into `args.output_dir`.
        FloatingPointError: the loss became NaN or infinite.
    """
    if len(train_dataset) == 0:
        raise ValueError("The training dataset is empty: pass at least one image (check the split sizes).")
    if (validation_queries is None) != (validation_database is None):
        raise ValueError("Pass both validation_queries and validation_database, or neither.")
    accelerator = accelerator or build_accelerator(args)
    with RunFolder(args.output_dir).writer_lock(accelerator):
        loop = _TrainingLoop(config, args, accelerator)
        loop.prepare(train_dataset, validation_queries, validation_database)
        with loop.progress:
            for epoch in range(loop.state.epoch, args.num_epochs):
                if not loop.train_epoch(epoch) or loop.end_epoch(epoch):
                    break
        return loop.finish(train_dataset)


def train_on_splits(
    config: MeCoQConfig, args: TrainingArguments, splits: DatasetDict, accelerator: Accelerator | None = None
) -> TrainingResult:
    """`train` on `splits["train"]` (e.g. from `RunFolder.record_splits`), selecting the model by the
    validation split against the database split unless the validation split is empty."""
    validation = splits["validation"] if len(splits["validation"]) else None
    database = splits["database"] if validation is not None else None
    return train(config, args, splits["train"], validation, database, accelerator=accelerator)


# A trained weight this large means the run diverged (they start within a few units of 0).
DIVERGED_WEIGHT = 1e6


class _TrainingLoop:
    """The state of one `train` call and its steps: prepare, train an epoch, end an epoch, finish."""

    def __init__(self, config: MeCoQConfig, args: TrainingArguments, accelerator: Accelerator) -> None:
        self.config, self.args, self.accelerator = config, args, accelerator
        self.run = RunFolder(args.output_dir)
        self.is_main = accelerator.is_main_process
        if self.is_main:
            self.run.path.mkdir(parents=True, exist_ok=True)
        set_seed(args.seed, deterministic=args.deterministic)
        self.memory_enabled = config.memory_start_epoch is not None and config.memory_size > 0
        self.stopped_early = self.reached_max_steps = False

    # setting up

    def prepare(self, train_dataset: Dataset, queries: Dataset | None, database: Dataset | None) -> None:
        """Build model, loader, validation set, optimizer and schedule; resume; record the arguments."""
        args, accelerator = self.args, self.accelerator
        model = MeCoQModel.for_training(self.config).to(accelerator.device)
        self.validation = None
        if queries is not None:
            self.validation = ValidationSet(queries, database, args.top_k, args.batch_size, args.num_workers,
                                            progress=args.progress_bar)  # fmt: skip
        accelerator.print(_describe_training_path(model, args))
        loader = _train_dataloader(model, args, train_dataset, accelerator)
        if self.validation is not None:  # a frozen backbone or trunk: its features are computed once
            self.validation.cache_features(model, accelerator, args.feature_cache_dir, args.cache_dtype)
        resuming = args.resume and bool(list_checkpoints(self.run.path))
        if args.codebook_init == "kmeans" and not resuming:
            _init_codebooks_by_kmeans(model, args, loader, train_dataset, accelerator)
        optimizer = build_optimizer(model, args)
        self.model, self.optimizer, self.loader = accelerator.prepare(model, optimizer, loader)
        self.network: MeCoQModel = accelerator.unwrap_model(self.model)
        restored = load_latest_checkpoint(accelerator, self.run.path) if args.resume else None
        self.state = restored or TrainerState()
        if _codewords_off_unit_norm(self.network):  # a checkpoint written before they were kept at unit norm
            self.network.renormalize_codebooks_()
        steps_per_epoch = math.ceil(len(self.loader) / args.gradient_accumulation_steps)
        self.scheduler = build_scheduler(self.optimizer, args, steps_per_epoch, self.state.global_step)
        if self.is_main:
            self.run.write_training_args(args)
        self._start_trackers()
        total = steps_per_epoch * args.num_epochs
        show = show_mode(args.progress_bar, self.is_main)
        self.progress = phase("training", min(total, args.max_steps or total), unit="steps", show=show,
                              initial=self.state.global_step)  # fmt: skip
        self.started = self.last_step_time = time.perf_counter()

    def _start_trackers(self) -> None:
        model_settings = {f"model.{k}": v for k, v in self.config.to_diff_dict().items()}
        settings = {**self.args.to_dict(), **model_settings}
        scalars = {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))}
        self.accelerator.init_trackers("mecoq", config=scalars)

    # one epoch

    def train_epoch(self, epoch: int) -> bool:
        """Train one epoch (or its rest, when resumed mid-epoch); False when `max_steps` stopped it."""
        self.loader.set_epoch(epoch)
        skipped = self.state.batches_in_epoch
        batches = self.accelerator.skip_first_batches(self.loader, skipped) if skipped else self.loader
        use_memory = self.memory_enabled and epoch >= self.config.memory_start_epoch
        self.model.train()
        for batch in batches:
            output = self._forward_backward(batch, epoch, use_memory)
            self.state.batches_in_epoch += 1
            if self.accelerator.sync_gradients and not self._after_optimizer_step(output, epoch):
                return False
        self.state.epoch, self.state.batches_in_epoch = epoch + 1, 0
        return True

    def _forward_backward(self, batch: dict[str, torch.Tensor], epoch: int, use_memory: bool) -> Any:
        """One micro-batch: loss, backward, optimizer and schedule step, then the code-memory update."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            output = self.model(
                **_channels_last_trunk(batch), use_memory=use_memory
            )  # two image views, or two cached feature views
            if not torch.isfinite(output.loss):
                self._stop_on_non_finite_loss(output.loss.item(), epoch)
            accelerator.backward(output.loss)
            self.step_rates = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.scheduler.step()
                self.network.renormalize_codebooks_()  # unit codewords, as the reference (§2.3)
            self.optimizer.zero_grad()
        if self.memory_enabled:
            # Every process's codes, without the duplicates `even_batches` pads a short last batch with.
            codes = accelerator.gather_for_metrics(
                {"view_1": output.assignments.detach(), "view_2": output.assignments_2.detach()}
            )  # (P * B, M, K) each
            advance = (
                self.args.batch_size * accelerator.num_processes
                if self.args.memory_pointer == "nominal"
                else None
            )
            self.network.update_memory(codes["view_1"], codes["view_2"], advance=advance)
        return output

    def _stop_on_non_finite_loss(self, loss: float, epoch: int) -> None:
        """Log and raise `FloatingPointError` naming the step, its learning rate and the likely cause."""
        step, lr = self.state.global_step + 1, self.scheduler.get_last_lr()[0]
        broken = non_finite_parameter(self.network)
        name, size = _largest_weight(self.network)
        if broken is not None or size > DIVERGED_WEIGHT:
            what = f"were already NaN or infinite ({broken})" if broken else f"grew to {size:.3g} ({name})"
            cause = (
                f"the weights {what}: the learning rate is too high. Lower --learning-rate "
                "(training.learning_rate)"
            )
        else:
            cause = (
                "the weights are finite, so the loss itself overflowed. Raise model.temperature, lower "
                "model.softmax_scale (--set model.KEY=VALUE) or train without --mixed-precision"
            )
        self._fail(
            step,
            f"Training stopped: the loss became {loss} at step {step} (epoch {epoch}, learning rate "
            f"{lr:.3g}); {cause}, then resume from a checkpoint (--resume) or start over.",
        )

    def _check_weights(self, saving: str) -> None:
        """Refuse to save `saving` (a checkpoint or the model) from weights that hold NaN or infinity."""
        broken = non_finite_parameter(self.network)
        if broken is not None:
            step = self.state.global_step
            self._fail(
                step,
                f"Training stopped at step {step}: the weights ({broken}) became NaN or infinite, so "
                f"{saving} was not saved. The learning rate is too high: lower --learning-rate "
                "(training.learning_rate), then resume from an earlier checkpoint (--resume) or start over.",
            )

    def _fail(self, step: int, message: str) -> None:
        if self.is_main:
            self.run.append_log("error", {"step": step, "message": message})
        raise FloatingPointError(message)

    def _after_optimizer_step(self, output: Any, epoch: int) -> bool:
        """Count and log the step and checkpoint when due; False once `max_steps` is reached."""
        args, state = self.args, self.state
        state.global_step += 1
        now = time.perf_counter()  # images/s include data loading and augmentation
        images = args.batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes
        self._log_step(output, epoch, images / (now - self.last_step_time))
        self.last_step_time = now
        self.reached_max_steps = args.max_steps is not None and state.global_step >= args.max_steps
        due = args.checkpoint_every_steps and state.global_step % args.checkpoint_every_steps == 0
        if self.reached_max_steps or due:
            self._check_weights("the checkpoint")
            save_checkpoint(self.accelerator, self.run.path, state, args.keep_checkpoints)
        return not self.reached_max_steps

    def _log_step(self, output: Any, epoch: int, images_per_second: float) -> None:
        rates = self.step_rates  # those the step trained with (the scheduler has stepped since)
        lr = rates["head"]
        values = {
            "loss": output.loss.item(),
            "contrastive": output.contrastive_loss.item(),
            "entropy": output.entropy.item(),
            "codeword_diversity": output.codeword_diversity.item(),
            "lr": lr,
            **{f"lr_{name}": rate for name, rate in rates.items() if name != "head"},
            "images_per_second": images_per_second,
        }
        self.progress.set_postfix(
            loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}"
        )
        self.progress.update(1)
        step = self.state.global_step
        if step % self.args.log_every_steps == 0 or step == 1:
            self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)
            if self.is_main:
                self.run.append_log("step", {"epoch": epoch, "step": step, **values})

    # the end of an epoch

    def end_epoch(self, epoch: int) -> bool:
        """Validate when due, record the epoch and checkpoint; True when patience ran out."""
        self._check_weights("the epoch's checkpoint")
        state = self.state
        record = {
            "epoch": epoch,
            "step": state.global_step,
            "seconds": round(time.perf_counter() - self.started, 2),
        }
        if self.validation is not None and (epoch + 1) % self.args.eval_every_epochs == 0:
            record["validation_map"] = self._validate(epoch)
        state.history.append(record)
        if self.is_main:
            self.run.append_log("epoch", record)
        save_checkpoint(self.accelerator, self.run.path, state, self.args.keep_checkpoints)
        if self.stopped_early:
            self.progress.write(f"Stopping early: no improvement in {self.args.patience} evaluations.")
        return self.stopped_early

    def _validate(self, epoch: int) -> float:
        """Validation mAP; a better model is saved as the run's model folder."""
        state, args = self.state, self.args
        started = time.perf_counter()
        score = self.validation.mean_average_precision(self.model, self.accelerator)
        if state.best_metric is None or score > state.best_metric + 1e-6:
            state.best_metric, state.best_epoch, state.evaluations_without_improvement = score, epoch, 0
            self.network.save_pretrained(self.run.path, is_main_process=self.is_main)
        else:
            state.evaluations_without_improvement += 1
        self.progress.write(
            f"epoch {epoch}: validation mAP@{args.top_k} {score:.4f} "
            f"(best {state.best_metric:.4f} at epoch {state.best_epoch}) in "
            f"{format_duration(time.perf_counter() - started)}"
        )
        self.accelerator.log({"validation/map": score}, step=state.global_step)
        self.stopped_early = (
            args.patience is not None and state.evaluations_without_improvement >= args.patience
        )
        return score

    # the end of the run

    def finish(self, train_dataset: Dataset) -> TrainingResult:
        """Save the model (when nothing was selected), write the run record, return the selected model."""
        state, accelerator = self.state, self.accelerator
        finished = not self.reached_max_steps
        if state.best_metric is None:  # no validation split: the last model is the result
            self._check_weights("the model")
            self.network.save_pretrained(self.run.path, is_main_process=self.is_main)
        if self.is_main:
            self.run.write_run_record(self.config, self.args, state, train_dataset,
                                      num_processes=accelerator.num_processes, finished=finished)  # fmt: skip
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if state.best_metric is not None and finished:  # hand back the selected model, not the last one
            best = MeCoQModel.from_pretrained(self.run.path, dtype=torch.float32)
            weights = {k: v for k, v in best.state_dict().items() if not k.startswith("memory.")}
            self.network.load_state_dict(weights, strict=False)  # the code memory stays as trained
        return TrainingResult(
            self.network,
            self.run.path,
            state.best_metric,
            state.best_epoch,
            state.history,
            self.stopped_early,
        )


def _largest_weight(network: torch.nn.Module) -> tuple[str, float]:
    """(name, largest |value|) over the finite entries of the trainable parameters."""
    trained = [(name, value) for name, value in network.named_parameters() if value.requires_grad]
    sizes = {name: float(value.detach().nan_to_num(0.0, 0.0, 0.0).abs().max()) for name, value in trained}
    name = max(sizes, key=sizes.get, default="")
    return name, sizes.get(name, 0.0)


def _channels_last_trunk(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with its cached trunk outputs channels-last on a CPU (`channels_last_on_cpu`)."""
    return {
        key: channels_last_on_cpu(value) if key.startswith("trunk_") else value
        for key, value in batch.items()
    }


def _codewords_off_unit_norm(network: MeCoQModel, tolerance: float = 1e-4) -> bool:
    """True when some stored codeword's norm is off 1 by more than `tolerance`. Renormalising unit codewords
    again would change their last bits, and with them an exactly resumed run."""
    norms = network.quantizer.codebooks.detach().norm(dim=-1)  # (M, K)
    return bool(((norms - 1).abs() > tolerance).any())


def _describe_training_path(model: MeCoQModel, args: TrainingArguments) -> str:
    """One line saying what trains and on what inputs (fresh augmentations, cached features or trunk)."""
    backbone = model.backbone
    if not backbone.is_trainable:
        what = "the head (projection and codebooks) on a frozen backbone"
    elif backbone.trainable == "all":
        what = "the whole backbone and the head"
    else:
        what = f"the last {backbone.trainable} backbone layer groups and the head"
    if not args.cached_views:
        inputs = "fresh augmented views every step"
    elif backbone.is_trainable:
        inputs = (
            f"{args.cached_views} cached views per image of the frozen trunk (before {backbone.tail_start})"
        )
    else:
        inputs = f"{args.cached_views} cached views per image of the backbone's pooled features"
    return f"Training {what}, on {inputs}."


def _train_dataloader(model: MeCoQModel, args: TrainingArguments, dataset: Dataset, accelerator: Accelerator):
    """Two augmented image views per item, or (cached_views) two cached views of a frozen backbone's features
    or of its frozen trunk's outputs."""
    data_config = model.backbone.data_config
    view = build_train_transform(data_config["input_size"][-1], data_config["mean"], data_config["std"])
    if not args.cached_views:
        return make_train_dataloader(
            dataset, view, args.batch_size, args.seed, args.num_workers, on_bad_image=args.on_bad_image
        )
    backbone = model.backbone
    if backbone.is_trainable and not backbone.has_frozen_trunk:
        raise ValueError(
            f"cached_views={args.cached_views} needs a frozen backbone or a frozen trunk, but "
            f"backbone_trainable is {model.config.backbone_trainable!r} for '{backbone.name}'. Set "
            "backbone_trainable='frozen' or a number N of last layer groups, or cached_views=0."
        )
    trunk = backbone.is_trainable
    show = show_mode(args.progress_bar, accelerator.is_main_process)
    summary = f"{args.cached_views} views x {len(dataset)} images"
    with phase("caching views", args.cached_views * len(dataset), show=show, summary=summary):
        features = compute_view_features(
            backbone,
            dataset,
            view,
            args.cached_views,
            seed=args.seed,
            batch_size=args.batch_size,
            accelerator=accelerator,
            trunk=trunk,
            storage_dtype=args.cache_dtype,
            show_progress_bar=args.progress_bar,
            cache_dir=args.feature_cache_dir,
            report=accelerator.print,
        )
    keys = ("trunk_features", "trunk_features_2") if trunk else ("features", "features_2")
    return torch.utils.data.DataLoader(
        CachedViewPairs(features.cpu(), seed=args.seed, keys=keys),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        num_workers=args.num_workers,
    )


@torch.no_grad()
def _init_codebooks_by_kmeans(
    model: MeCoQModel,
    args: TrainingArguments,
    loader: torch.utils.data.DataLoader,
    dataset: Dataset,
    accelerator: Accelerator,
) -> None:
    """Codebooks = spherical k-means centroids of the projected training embeddings (docs/method.md §2.3).

    The embeddings come from the first cached view of every image, or from one pass of the backbone with the
    evaluation transform; the model is in eval mode meanwhile. Every process computes the same codebooks.
    """
    size = model.config.codebook_size
    if len(dataset) < size:
        raise ValueError(
            f"codebook_init='kmeans' places {size} codewords per codebook by k-means on the training "
            f"embeddings, but the training set has only {len(dataset)} images. Use more training images or "
            "codebook_init='random'."
        )
    with module_mode(model, training=False):
        views = getattr(loader.dataset, "view_features", None)  # (N, V, ...) cached views, if any
        if views is None:
            inputs = compute_eval_features(model.backbone, [dataset], batch_size=args.batch_size,
                                           accelerator=accelerator, show_progress_bar=args.progress_bar,
                                           cache_dir=args.feature_cache_dir)[0].outputs  # fmt: skip
        else:
            inputs = views[:, 0]  # the first view of each image
        trunk_outputs = views is not None and model.backbone.is_trainable
        forward = model.backbone.forward_tail if trunk_outputs else torch.nn.Identity()
        device = model.projection.weight.device
        embeddings = torch.cat([model.project(forward(chunk.to(device).float())).cpu()
                                for chunk in inputs.split(1024)])  # fmt: skip  # (N, d)
    accelerator.print(
        f"Initialising the codebooks by spherical k-means on {len(embeddings)} projected training embeddings "
        f"({model.config.num_codebooks} x {size} codewords)."
    )
    model.quantizer.init_codebooks_from_embeddings_(embeddings, iterations=30, seed=args.seed)


__all__ = ["TrainingResult", "build_accelerator", "train", "train_on_splits"]
