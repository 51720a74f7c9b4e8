"""The two-stage counterpart of MeCoQ for `bench_quality.py`: contrastive training of the continuous
embedding z without the quantizer, then faiss PQ fitted on z at the same number of bits.

It tests the paper's claim that quantization-aware training beats compressing afterwards. Everything but the
quantizer is MeCoQ's: the same backbone (frozen, or a trainable tail on cached trunk outputs), projection,
cached views and view pairing, optimizer groups and schedule, and the same debiased contrastive loss with the
preset's settings, applied to the two views' embeddings z instead of their soft reconstructions. There is no
memory: MeCoQ's memory keeps soft codes, and z has none. Model selection is on the validation split, by the
mAP@K of the PQ codes fitted on z of the training images after each epoch, as for MeCoQ's own codes.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from datasets import Dataset

from mecoq_hf.data.transforms import build_train_transform
from mecoq_hf.feature_cache import CachedViewPairs, compute_view_features
from mecoq_hf.models.mecoq.configuration_mecoq import MeCoQConfig
from mecoq_hf.models.mecoq.modeling_mecoq import MeCoQModel
from mecoq_hf.retrieval.baselines import make_baseline
from mecoq_hf.retrieval.metrics import mean_average_precision
from mecoq_hf.training.arguments import TrainingArguments
from mecoq_hf.training.optimization import build_optimizer, build_scheduler


class TwoStage:
    """Train z contrastively, then PQ on z. `embed(name)` gives z of a split from the backbone inputs that
    `inputs[name]` holds: pooled features (frozen backbone) or trunk outputs (trainable tail)."""

    def __init__(self, config: MeCoQConfig, args: TrainingArguments, inputs: dict[str, torch.Tensor],
                 labels: dict[str, torch.Tensor], top_k: int) -> None:  # fmt: skip
        self.model = MeCoQModel.for_training(config)
        self.args, self.inputs, self.labels, self.top_k = args, inputs, labels, top_k
        self.bits = config.bits

    @torch.no_grad()
    def embed(self, name: str) -> torch.Tensor:
        model, tail = self.model, self.model.backbone.is_trainable
        was_training = model.training
        model.eval()
        try:
            chunks = []
            for chunk in self.inputs[name].split(2048):
                chunk = chunk.float()
                if tail:
                    chunk = model.backbone.forward_tail(chunk.contiguous(memory_format=torch.channels_last))
                chunks.append(model.project(chunk))
            return torch.cat(chunks)
        finally:
            model.train(was_training)

    def fit_pq(self, seed: int):
        """faiss PQ at the model's bits fitted on z of the training images."""
        return make_baseline("pq", self.bits, seed=seed).fit(self.embed("train"))

    def score(self, queries: str, seed: int) -> float:
        pq = self.fit_pq(seed)
        scores = pq.scores(self.embed(queries), pq.encode(self.embed("database")))
        return mean_average_precision(scores, self.labels[queries], self.labels["database"], self.top_k)

    def cosine(self, queries: str) -> float:
        exact = make_baseline("cosine", self.bits).fit(self.embed("train"))
        scores = exact.scores(self.embed(queries), exact.encode(self.embed("database")))
        return mean_average_precision(scores, self.labels[queries], self.labels["database"], self.top_k)

    def train(self, train_dataset: Dataset, cache_dir: str) -> dict[str, Any]:
        """The epochs, with validation-based selection and patience; the best epoch's weights are kept."""
        model, args = self.model, self.args
        tail = model.backbone.is_trainable
        torch.manual_seed(args.seed)
        data_config = model.backbone.data_config
        view = build_train_transform(data_config["input_size"][-1], data_config["mean"], data_config["std"])
        views = compute_view_features(model.backbone, train_dataset, view, args.cached_views, seed=args.seed,
                                      trunk=tail, storage_dtype=args.cache_dtype, show_progress_bar=False,
                                      cache_dir=cache_dir)  # fmt: skip
        keys = ("trunk_features", "trunk_features_2") if tail else ("features", "features_2")
        pairs = CachedViewPairs(views, seed=args.seed, keys=keys)
        loader = torch.utils.data.DataLoader(pairs, batch_size=args.batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
        optimizer = build_optimizer(model, args)
        scheduler = build_scheduler(optimizer, args, len(loader))
        best, best_epoch, best_state, waited, history = None, None, None, 0, []
        started = time.perf_counter()
        for epoch in range(args.num_epochs):
            pairs.set_epoch(epoch)
            model.train()
            for batch in loader:
                if tail:  # channels-last trunk outputs: faster convolutions on a CPU, as in train()
                    first, second = (model.backbone.forward_tail(batch[key].contiguous(
                        memory_format=torch.channels_last)) for key in keys)  # fmt: skip
                else:
                    first, second = batch[keys[0]], batch[keys[1]]
                loss = model.contrastive_term(model.project(first), model.project(second))  # on z, no memory
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            score = self.score("validation", args.seed)
            history.append({"epoch": epoch, "validation_map": round(score, 5)})
            if best is None or score > best + 1e-6:
                best, best_epoch, waited = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
                if args.patience is not None and waited >= args.patience:
                    break
        model.load_state_dict(best_state)
        return {"validation_map": round(best, 5), "best_epoch": best_epoch, "epochs_run": len(history),
                "train_seconds": time.perf_counter() - started}  # fmt: skip


__all__ = ["TwoStage"]
