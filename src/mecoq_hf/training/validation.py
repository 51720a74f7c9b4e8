"""Model selection during training: mAP@K of the current model on the validation split.

The validation split is never the query (test) set (see `mecoq_hf.data.splits`). The scoring is the package's
one evaluator, `retrieval.evaluation.RetrievalEvaluator`, under the names the training loop calls.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from datasets import Dataset

from ..models.mecoq.modeling_mecoq import MeCoQModel
from ..progress import phase, show_mode
from ..retrieval.evaluation import RetrievalEvaluator


class ValidationSet(RetrievalEvaluator):
    """Labelled validation queries and database for model selection by mAP@top_k.

    With a frozen backbone the features never change, so they are extracted once (`cache_features`) and each
    epoch only re-runs the projection and the quantizer.

    Progress (`progress.phase`, main process only): the features extracted once are the phase "validation
    features" (a bar, or one line when it ends without `progress`); a validation run that passes images
    through the backbone shows a "validation" bar with `progress` (the training loop prints its result).
    """

    def __init__(
        self,
        queries: Dataset,
        database: Dataset,
        top_k: int | None,
        batch_size: int,
        num_workers: int = 0,
        *,
        progress: bool = False,
    ) -> None:
        super().__init__(queries, database, top_k=top_k, name="validation", batch_size=batch_size,
                         num_workers=num_workers, show_progress_bar=False)  # fmt: skip
        self.progress = progress

    def cache_features(
        self, network: MeCoQModel, accelerator: Accelerator, cache_dir: str | os.PathLike | None = None
    ) -> None:
        """Extract the validation features of the (frozen) backbone once, optionally through a disk cache."""
        summary = f"{len(self.queries)} queries + {len(self.database)} database images"
        show = show_mode(self.progress, accelerator.is_main_process)
        with phase("validation features", len(self.queries) + len(self.database), show=show, summary=summary):
            self.keep_features(network.backbone, accelerator, cache_dir=cache_dir)

    def mean_average_precision(self, model: torch.nn.Module, accelerator: Accelerator) -> float:
        """mAP@top_k of the (possibly wrapped) model being trained."""
        runs_backbone = self._kept is None
        show = "bar" if self.progress and runs_backbone and accelerator.is_main_process else "off"
        with phase("validation", len(self.queries) + len(self.database), show=show):
            return self.evaluate(accelerator.unwrap_model(model), accelerator).map_at_k


__all__ = ["ValidationSet"]
