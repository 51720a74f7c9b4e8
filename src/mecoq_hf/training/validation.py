"""Model selection during training: mAP@K of the current model on the validation split.

The validation split is never the query (test) set (see `mecoq_hf.data.splits`).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from datasets import Dataset

from ..data.transforms import build_eval_transform
from ..encoding import EncodedDataset
from ..feature_cache import compute_features
from ..models.mecoq.modeling_mecoq import MeCoQModel
from ..retrieval.evaluation import evaluate_features


class ValidationSet:
    """Labelled validation queries and database for model selection by mAP@top_k.

    Each evaluation extracts the backbone features of both splits and scores the head on them
    (`evaluation.evaluate_features`). With a frozen backbone the features never change, so they are
    extracted once (`cache_features`) and each epoch only re-runs the projection and the quantizer.
    """

    def __init__(
        self, queries: Dataset, database: Dataset, top_k: int | None, batch_size: int, num_workers: int = 0
    ):
        self.queries, self.database, self.top_k = queries, database, top_k
        self.batch_size, self.num_workers = batch_size, num_workers
        self.features: tuple[EncodedDataset, EncodedDataset] | None = None

    def cache_features(
        self, network: MeCoQModel, accelerator: Accelerator, cache_dir: str | None = None
    ) -> None:
        self.features = self._features(network, accelerator, cache_dir)

    def _features(self, network: MeCoQModel, accelerator: Accelerator, cache_dir: str | None = None):
        transform = build_eval_transform(network.backbone.data_config)
        return tuple(
            compute_features(
                network.backbone,
                split,
                transform,
                batch_size=self.batch_size,
                accelerator=accelerator,
                show_progress_bar=False,
                cache_dir=cache_dir,
            )  # fmt: skip
            for split in (self.queries, self.database)
        )

    def mean_average_precision(self, model: torch.nn.Module, accelerator: Accelerator) -> float:
        network: MeCoQModel = accelerator.unwrap_model(model)
        features = self.features or self._features(network, accelerator)
        return evaluate_features(network, *features, top_k=self.top_k).map_at_k


__all__ = ["ValidationSet"]
