"""Model selection during training: mAP@K of the current model on the validation split.

The validation split is never the query (test) set (see `mecoq_hf.data.splits`). The scoring is the package's
one evaluator, `retrieval.evaluation.RetrievalEvaluator`, under the names the training loop calls.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from datasets import Dataset

from ..encoding import EncodedDataset, module_mode
from ..models.mecoq.modeling_mecoq import MeCoQModel
from ..progress import phase, show_mode
from ..retrieval.evaluation import RetrievalEvaluator


class ValidationSet(RetrievalEvaluator):
    """Labelled validation queries and database for model selection by mAP@top_k.

    With a frozen backbone the features never change, so they are extracted once (`cache_features`) and each
    epoch only re-runs the projection and the quantizer. When only the last layer groups train, the outputs
    of the frozen trunk before them are extracted once instead, and each epoch re-runs the tail as well.

    Progress (`progress.phase`, main process only): what is extracted once is the phase "validation
    features" (a bar, or one line when it ends without `progress`); a validation run that passes images
    through the backbone (or its tail) shows a "validation" bar with `progress`.
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
        self._trunk_outputs: tuple[EncodedDataset, EncodedDataset] | None = None

    def cache_features(
        self,
        network: MeCoQModel,
        accelerator: Accelerator,
        cache_dir: str | os.PathLike | None = None,
        storage_dtype: str = "float32",
    ) -> None:
        """Extract what never changes once, optionally through a disk cache: the pooled features of a frozen
        backbone, or the outputs of the frozen trunk of a backbone whose last layer groups train. Nothing for
        a backbone that trains entirely (or cannot be cut): then every evaluation runs it in full."""
        backbone = network.backbone
        if backbone.is_trainable and not backbone.has_frozen_trunk:
            return  # nothing stays the same from one evaluation to the next
        summary = f"{len(self.queries)} queries + {len(self.database)} database images"
        show = show_mode(self.progress, accelerator.is_main_process)
        with phase("validation features", len(self.queries) + len(self.database), show=show, summary=summary):
            if not backbone.is_trainable:
                self.keep_features(backbone, accelerator, cache_dir=cache_dir)
            else:
                self._kept = None  # `features` would return the tail features of an earlier epoch
                self._trunk_outputs = self.features(
                    backbone, accelerator, cache_dir=cache_dir, trunk=True, storage_dtype=storage_dtype
                )

    def mean_average_precision(self, model: torch.nn.Module, accelerator: Accelerator) -> float:
        """mAP@top_k of the (possibly wrapped) model being trained."""
        network = accelerator.unwrap_model(model)
        runs_backbone = self._kept is None or self._trunk_outputs is not None
        show = "bar" if self.progress and runs_backbone and accelerator.is_main_process else "off"
        with phase("validation", len(self.queries) + len(self.database), show=show):
            if self._trunk_outputs is not None:  # this epoch's tail on the kept trunk outputs
                self._kept = tuple(
                    encoded._replace(outputs=_tail_features(network, encoded.outputs))
                    for encoded in self._trunk_outputs
                )
            return self.evaluate(network, accelerator).map_at_k


def channels_last_on_cpu(trunk_outputs: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) trunk outputs in channels-last layout when they are on a CPU, where the tail's
    convolutions then run about twice as fast; anything else unchanged."""
    if trunk_outputs.ndim == 4 and trunk_outputs.device.type == "cpu":
        return trunk_outputs.contiguous(memory_format=torch.channels_last)
    return trunk_outputs


@torch.no_grad()
def _tail_features(network: MeCoQModel, trunk_outputs: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """(N, F) pooled features of the backbone's tail in eval mode on (N, ...) trunk outputs, on the CPU."""
    device = network.projection.weight.device
    with module_mode(network, training=False):
        features = []
        for chunk in trunk_outputs.split(chunk_size):
            chunk = channels_last_on_cpu(chunk.to(device).float())
            features.append(network.backbone.forward_tail(chunk).cpu())
    return torch.cat(features)


__all__ = ["ValidationSet"]
