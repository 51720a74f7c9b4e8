"""MeCoQ as a transformers model: timm backbone -> linear projection -> product quantizer (+ code memory).

MeCoQ: "Contrastive Quantization with Code Memory for Unsupervised Image Retrieval",
J. Wang, Z. Zeng, B. Chen, T. Dai, S.-T. Xia, AAAI 2022, https://arxiv.org/abs/2109.05205.

Reads bottom-up: output type, pre-trained base class, then `MeCoQModel`. Section numbers refer to
`docs/method.md`. This file and the modules it imports relatively form the `trust_remote_code` closure:
only torch, timm and transformers may be imported absolutely.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import CONFIG_NAME, ModelOutput, cached_file
from transformers.utils import logging as transformers_logging

from .backbones import TimmBackbone, load_backbone_weights, warn_random_backbone
from .configuration_mecoq import MeCoQConfig
from .file_access import apply_umask, check_readable
from .image_processing_mecoq import MeCoQImageProcessor
from .losses import LossBreakdown, assignment_entropy, codeword_diversity, debiased_contrastive_loss
from .memory import CodeMemory
from .quantization import CODEBOOKS_FILE, ProductQuantizer, random_unit_codebooks, save_codebooks
from .weights_checksum import add_weights_checksum, verify_weights_checksum

WEIGHTS_FILE = "model.safetensors"


@dataclass
class MeCoQModelOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned with two views):
        Total training loss: contrastive + entropy_weight * entropy
        + codeword_reg_weight * codeword_diversity.
    contrastive_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Debiased contrastive loss between the soft reconstructions of the two views (and memory negatives).
    entropy (`torch.FloatTensor` of shape `()`, *optional*):
        Mean entropy of the soft assignments of both views, in nats.
    codeword_diversity (`torch.FloatTensor` of shape `()`, *optional*):
        Mean inner product of codewords within each codebook (1 = collapsed, ~0 = spread out).
    embeddings (`torch.FloatTensor` of shape `(batch_size, embedding_dim)`):
        Projected embeddings z of the first view; the query side of asymmetric search.
    quantized (`torch.FloatTensor` of shape `(batch_size, embedding_dim)`):
        Soft reconstruction of the first view (concatenated convex combinations of codewords).
    assignments (`torch.FloatTensor` of shape `(batch_size, num_codebooks, codebook_size)`):
        Soft assignment probabilities of the first view (what the code memory stores).
    codes (`torch.Tensor` of shape `(batch_size, num_codebooks)`):
        Hard codes of the first view (uint8 when codebook_size <= 256).
    quantized_2 (`torch.FloatTensor` of shape `(batch_size, embedding_dim)`, *optional*):
        Soft reconstruction of the second view.
    assignments_2 (`torch.FloatTensor` of shape `(batch_size, num_codebooks, codebook_size)`, *optional*):
        Soft assignments of the second view.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, embedding_dim)`):
        The embeddings again, under the name `pipeline("image-feature-extraction", pool=True)` reads.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    entropy: torch.FloatTensor | None = None
    codeword_diversity: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None
    assignments: torch.FloatTensor | None = None
    codes: torch.Tensor | None = None
    quantized_2: torch.FloatTensor | None = None
    assignments_2: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None


class MeCoQPreTrainedModel(PreTrainedModel):
    """Base class: weight initialisation of MeCoQ's own modules and the checkpoint conventions."""

    config: MeCoQConfig
    config_class = MeCoQConfig
    base_model_prefix = "mecoq"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    # The code memory is training state: saved with `accelerator.save_state`, never in released weights.
    _keys_to_ignore_on_save = ["memory.codes", "memory.filled", "memory.pointer"]
    _keys_to_ignore_on_load_missing = [r"memory\..*"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise only the modules MeCoQ owns; the timm backbone keeps its own (or loaded) weights."""
        if isinstance(module, ProductQuantizer):
            # Xavier-uniform directions on (M, K, D) at unit norm (docs/method.md §2.3); `init.copy_` leaves
            # codebooks loaded from a checkpoint untouched.
            init.copy_(module.codebooks, random_unit_codebooks(module.codebooks))
        elif isinstance(module, CodeMemory):
            init.zeros_(module.codes)
            init.zeros_(module.filled)
            init.zeros_(module.pointer)
        elif isinstance(module, nn.Linear) and module is getattr(self, "projection", None):
            # PyTorch's default Linear initialisation, as in the reference transform layer
            # (docs/method.md §2.2).
            init.kaiming_uniform_(module.weight, a=5**0.5)
            bound = 1 / module.in_features**0.5
            init.uniform_(module.bias, -bound, bound)


class MeCoQModel(MeCoQPreTrainedModel):
    """MeCoQ: a timm backbone, a linear projection to `embedding_dim`, a product quantizer and a code memory.

    - `forward(pixel_values, pixel_values_2)` with two augmented views returns the training loss and its
      terms.
    - `embed` gives query embeddings for asymmetric search, `encode` hard codes for the index, `decode`
      vectors.
    - Mixed precision: the backbone follows the ambient `torch.autocast`; the projection, the quantizer and
      the loss always run in float32 with autocast disabled (bf16 matmuls there flip hard codes and distort
      the loss and its gradients).
    - With trainable codebooks, call `renormalize_codebooks_()` after every optimizer step.

    Example:

    ```python
    >>> import torch
    >>> from mecoq_hf import MeCoQConfig, MeCoQModel
    >>> config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32,
    ...                      embedding_dim=16, num_codebooks=2, codebook_size=16)
    >>> model = MeCoQModel(config).eval()
    >>> images = torch.randn(4, 3, 32, 32)
    >>> model.encode(images).shape
    torch.Size([4, 2])
    ```
    """

    def __init__(self, config: MeCoQConfig) -> None:
        super().__init__(config)
        self.backbone = TimmBackbone(
            config.backbone,
            image_size=config.image_size,
            trainable=config.backbone_trainable,
            model_kwargs=config.backbone_kwargs,
        )
        self.projection = nn.Linear(self.backbone.num_features, config.embedding_dim)
        self.quantizer = ProductQuantizer(
            dim=config.embedding_dim,
            num_codebooks=config.num_codebooks,
            codebook_size=config.codebook_size,
            softmax_scale=config.softmax_scale,
            trainable=config.trainable_codebooks,
        )
        self.memory = CodeMemory(config.memory_size, config.num_codebooks, config.codebook_size)
        self.post_init()

    @classmethod
    def for_training(cls, config: MeCoQConfig) -> MeCoQModel:
        """A fresh model whose backbone carries the pretrained weights named by `config.backbone_weights`.

        `MeCoQModel(config)` builds the architecture only (weights then come from a checkpoint, as in
        `from_pretrained`); this is the constructor to start training from ImageNet features. A `None` source
        trains from a random backbone and is warned about loudly.
        """
        model = cls(config)
        if config.backbone_weights is None:
            warn_random_backbone(config.backbone)
        else:
            load_backbone_weights(model.backbone, config.backbone_weights)
        return model

    # inference

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, d) projected embeddings z (the query side of asymmetric search).

        The backbone runs under the ambient autocast, the projection in the model's precision (float32).
        """
        return self.project(self.backbone(pixel_values))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) backbone features -> (B, d) embeddings z, in the projection's dtype, autocast disabled."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.projection(features.to(self.projection.weight.dtype))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, M) hard codes (uint8 when K <= 256). Call `model.eval()` first."""
        return self.quantizer.encode(self.embed(pixel_values))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, M) hard codes -> (B, d) concatenated unit-norm codewords."""
        return self.quantizer.decode(codes)

    def normalized_codebooks(self) -> torch.Tensor:
        """(M, K, D) the L2-normalised codebooks, as used for encoding and search (and as
        `codebooks.safetensors` stores them); `quantizer.codebooks` is the raw trainable parameter."""
        return self.quantizer.normalized_codebooks()

    def codebooks(self) -> torch.Tensor:
        """Deprecated name of `normalized_codebooks()` (kept for code written against 0.1.0)."""
        warnings.warn(
            "MeCoQModel.codebooks() is renamed normalized_codebooks(); the old name will be removed.",
            FutureWarning,
            stacklevel=2,
        )
        return self.normalized_codebooks()

    @torch.no_grad()
    def renormalize_codebooks_(self) -> None:
        """Rescale every stored codeword to unit norm in place; the training loop calls it after every
        optimizer step (docs/method.md §2.3, §6). Directions, hence codes and outputs, are unchanged."""
        self.quantizer.renormalize_codebooks_()

    # training

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_values_2: torch.Tensor | None = None,
        use_memory: bool = False,
        return_dict: bool | None = None,
        features: torch.Tensor | None = None,
        features_2: torch.Tensor | None = None,
        trunk_features: torch.Tensor | None = None,
        trunk_features_2: torch.Tensor | None = None,
    ) -> MeCoQModelOutput | tuple:
        """Quantize one view, or compute the MeCoQ training loss from two augmented views.

        Args:
            pixel_values: (B, 3, H, W) images (the first view).
            pixel_values_2: (B, 3, H, W) second augmented view of the same images; enables the loss.
            use_memory: use the code memory's entries as extra negatives (the training loop turns this on
                from `config.memory_start_epoch`). The memory is updated separately (`update_memory`).
            return_dict: return a `MeCoQModelOutput` (default) or a tuple.
            features, features_2: (B, F) backbone features given instead of images. With a frozen backbone
                they can be computed once and cached, which makes head training far cheaper on a CPU.
            trunk_features, trunk_features_2: outputs of the backbone's frozen trunk
                (`backbone.forward_trunk`) given instead of images, when only the last layer groups train;
                the trainable tail runs on them (docs/method.md §6.1).

        Under `torch.autocast` only the backbone runs in reduced precision: the projection, the quantizer and
        the loss run in float32 with autocast disabled, so outputs and the loss are float32.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        features = self._features(pixel_values, features, trunk_features, "")
        second = any(view is not None for view in (pixel_values_2, features_2, trunk_features_2))
        features_2 = self._features(pixel_values_2, features_2, trunk_features_2, "_2") if second else None
        if features_2 is not None and features_2.shape != features.shape:
            raise ValueError(
                f"Both views must have the same shape, got {tuple(features.shape)} and "
                f"{tuple(features_2.shape)} after the backbone. Pass two views of the same images at the "
                "same resolution."
            )
        embeddings = self.project(features)  # (B, d)
        soft = self.quantizer(embeddings)
        output = MeCoQModelOutput(
            embeddings=embeddings,
            quantized=soft.reconstruction,
            assignments=soft.assignments,
            codes=soft.codes,
            pooler_output=embeddings,
        )
        if features_2 is not None:
            soft_2 = self.quantizer(self.project(features_2))
            losses = self.loss(
                soft.reconstruction, soft_2.reconstruction, soft.assignments, soft_2.assignments, use_memory
            )
            output.loss, output.contrastive_loss, output.entropy, output.codeword_diversity = losses
            output.quantized_2, output.assignments_2 = soft_2.reconstruction, soft_2.assignments
        return output if return_dict else output.to_tuple()

    def _features(
        self,
        pixel_values: torch.Tensor | None,
        features: torch.Tensor | None,
        trunk_features: torch.Tensor | None,
        view: str,
    ):
        """(B, F) backbone features from images, from trunk outputs, or as given (exactly one of them)."""
        if sum(value is not None for value in (pixel_values, features, trunk_features)) != 1:
            raise ValueError(
                f"Pass exactly one of `pixel_values{view}` (images), `features{view}` (backbone features) "
                f"and `trunk_features{view}` (outputs of the backbone's frozen trunk)."
            )
        name = f"features{view}"
        if pixel_values is not None:
            return self.backbone(pixel_values)
        if trunk_features is not None:
            return self.backbone.forward_tail(trunk_features)
        if features.ndim != 2 or features.shape[1] != self.backbone.num_features:
            raise ValueError(
                f"`{name}` must have shape (B, {self.backbone.num_features}) (the backbone's pooled "
                f"features), got {tuple(features.shape)}."
            )
        return features

    def loss(
        self,
        quantized: torch.Tensor,
        quantized_2: torch.Tensor,
        assignments: torch.Tensor,
        assignments_2: torch.Tensor,
        use_memory: bool = False,
    ) -> LossBreakdown:
        """MeCoQ objective (docs/method.md §4): contrastive + lambda * entropy + gamma * codeword diversity.

        Computed in float32 (or the inputs' wider dtype) with autocast disabled.
        """
        with torch.autocast(device_type=quantized.device.type, enabled=False):
            return self._loss(quantized, quantized_2, assignments, assignments_2, use_memory)

    def contrastive_term(
        self, view_1: torch.Tensor, view_2: torch.Tensor, memory_vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The debiased contrastive loss with this model's settings (docs/method.md §4) on two views' (B, d)
        vectors: their soft reconstructions in `loss`; anything else of that shape for other uses (the
        two-stage benchmark contrasts the embeddings z)."""
        config = self.config
        return debiased_contrastive_loss(
            view_1,
            view_2,
            memory_vectors,
            temperature=config.temperature,
            pos_prior=config.pos_prior,
            debias=config.loss_mode == "debias",
            reduction=config.contrastive_reduction,
            count_memory=config.debias_count_memory,
            floor=config.debias_floor,
            normalize_memory=config.normalize_memory,
        )

    def _loss(
        self,
        quantized: torch.Tensor,
        quantized_2: torch.Tensor,
        assignments: torch.Tensor,
        assignments_2: torch.Tensor,
        use_memory: bool,
    ) -> LossBreakdown:
        config = self.config
        memory_vectors = None
        if use_memory and self.memory.num_filled > 0:
            memory_vectors = self.quantizer.reconstruct_soft(self.memory.soft_codes())  # (N_M, d)
        contrastive = self.contrastive_term(quantized, quantized_2, memory_vectors)
        entropy = assignment_entropy(torch.cat([assignments, assignments_2]))
        diversity = codeword_diversity(self.quantizer.normalized_codebooks())
        total = contrastive + config.entropy_weight * entropy + config.codeword_reg_weight * diversity
        return LossBreakdown(total, contrastive, entropy, diversity)

    @torch.no_grad()
    def update_memory(self, *assignments: torch.Tensor, advance: int | None = None) -> None:
        """Enqueue soft codes (B, M, K), view by view, after the optimizer step (docs/method.md §5).

        Under DDP pass codes gathered from all processes so that every rank keeps the same memory; a block
        larger than the memory keeps its newest entries. `advance` is the nominal block size of
        `CodeMemory.enqueue` (the reference code's pointer rule), applied to every view.
        """
        for block in assignments:
            self.memory.enqueue(block, advance=advance)

    # saving and loading

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args, is_main_process: bool = True, **kwargs
    ) -> None:
        """`PreTrainedModel.save_pretrained`, plus `codebooks.safetensors` (enough to decode or search codes
        made elsewhere), `preprocessor_config.json`, and a sha256 of the weights in their safetensors
        metadata.

        Files are first written to a temporary folder beside the target and then moved in one by one with
        `os.replace`, so an interrupted save never leaves a half-written file under its final name. Every file
        gets the mode the umask asks for (0o666 & ~umask; `safetensors` alone would make them 0600). The
        temporary folders of saves that were killed (their process is gone) are removed.
        """
        if not is_main_process:
            return
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        _remove_stale_staging(save_directory)
        staging = tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=save_directory)
        try:
            with _without_transformers_bars():  # "Writing model shards" at every checkpoint says nothing
                super().save_pretrained(staging, *args, is_main_process=True, **kwargs)
            save_codebooks(os.path.join(staging, CODEBOOKS_FILE), self.normalized_codebooks())
            self.image_processor().save_pretrained(staging)
            for name in sorted(os.listdir(staging)):
                if name.endswith(".safetensors") and name != CODEBOOKS_FILE:
                    add_weights_checksum(os.path.join(staging, name))
            apply_umask(staging)
            for name in sorted(os.listdir(staging)):
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> MeCoQModel:
        """`PreTrainedModel.from_pretrained` that first refuses a truncated or altered `model.safetensors`.

        A local folder, its config or weights that this user may not read raise `PermissionError`
        ("permission denied") instead of transformers' "not a valid model identifier".
        """
        _check_local_folder(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        lookup = {key: kwargs[key] for key in _CACHED_FILE_KWARGS if key in kwargs}
        weights = cached_file(
            pretrained_model_name_or_path, WEIGHTS_FILE, _raise_exceptions_for_missing_entries=False, **lookup
        )
        if weights is not None:
            verify_weights_checksum(weights)
            config = kwargs.get("config")
            if not isinstance(config, MeCoQConfig):
                path = cached_file(
                    pretrained_model_name_or_path,
                    CONFIG_NAME,
                    _raise_exceptions_for_missing_entries=False,
                    **lookup,
                )
                config = MeCoQConfig.from_json_file(path) if path is not None else None
            if config is not None:
                _check_config_fits_weights(config, weights)
        with _without_transformers_bars():  # nor does "Loading weights" (the Hub's download bars stay)
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def image_processor(self) -> MeCoQImageProcessor:
        """The evaluation preprocessing of this model's backbone at its configured resolution."""
        return MeCoQImageProcessor(self.backbone.data_config)


# saving and loading

_STAGING_PREFIX = ".saving-"  # + "<pid>-<random>": the temporary folder of a save in progress


def _remove_stale_staging(save_directory: str) -> None:
    """Remove the `.saving-*` folders of saves whose process is gone (killed mid-save)."""
    for name in os.listdir(save_directory):
        path = os.path.join(save_directory, name)
        if name.startswith(_STAGING_PREFIX) and os.path.isdir(path) and not _writer_alive(name):
            shutil.rmtree(path, ignore_errors=True)


def _writer_alive(staging_name: str) -> bool:
    pid = staging_name[len(_STAGING_PREFIX) :].split("-")[0]
    if not pid.isdigit():  # the name of an older version: no process id, so no save of this version
        return False
    if os.name != "posix":  # no signal 0 to probe with: leave it
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _check_config_fits_weights(config: MeCoQConfig, weights: str) -> None:
    """Name the config.json key that disagrees with the weights, before transformers' shape-mismatch report.

    Raises:
        ValueError: `num_codebooks`, `codebook_size` or `embedding_dim` differ from the stored tensors.
    """
    shapes = _tensor_shapes(weights)
    codebooks, projection = shapes.get("quantizer.codebooks"), shapes.get("projection.weight")
    stored = {}
    if codebooks is not None and len(codebooks) == 3:
        stored.update(num_codebooks=codebooks[0], codebook_size=codebooks[1])
        stored["embedding_dim"] = codebooks[0] * codebooks[2]
    if projection is not None and len(projection) == 2:
        stored["embedding_dim"] = projection[0]
    wrong = {key: value for key, value in stored.items() if getattr(config, key) != value}
    if wrong:
        said = ", ".join(f"{key}={getattr(config, key)}" for key in wrong)
        held = ", ".join(f"{key}={value}" for key, value in wrong.items())
        raise ValueError(
            f"{CONFIG_NAME} and {os.path.basename(weights)} of {os.path.dirname(weights)} disagree: the "
            f"config says {said}, the weights hold {held} (quantizer.codebooks {tuple(codebooks or ())}, "
            f"projection.weight {tuple(projection or ())}). The config was edited or comes from another "
            f"model: set {held} in {CONFIG_NAME}, or use the config saved with these weights."
        )


def _tensor_shapes(weights: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from the header of a safetensors file (the data is not read)."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as file:
        return {name: list(file.get_slice(name).get_shape()) for name in file.keys()}


_CACHED_FILE_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


@contextlib.contextmanager
def _without_transformers_bars() -> Iterator[None]:
    """Hide the tqdm bars transformers draws itself (`transformers.utils.logging.tqdm`: writing shards,
    loading weights) for the duration of the block; huggingface_hub's download bars are not among them."""
    set_tqdm_hook = getattr(transformers_logging, "set_tqdm_hook", None)  # transformers >= 5
    if set_tqdm_hook is None:
        yield
        return
    previous = set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        set_tqdm_hook(previous)


def _check_local_folder(source: str | os.PathLike, subfolder: str) -> None:
    """Raise "permission denied" for a local model folder (or its config) this user may not read.

    transformers checks folders with `os.path.isdir`, which is False for an unreadable one, and would then
    look the path up on the Hub. A source that does not exist locally is left to transformers (a Hub id).
    """
    try:
        os.stat(source)
    except PermissionError:
        pass  # something is there: `check_readable` says what cannot be read
    except (OSError, ValueError, TypeError):
        return
    folder = check_readable(source, "Model folder")
    config = folder / subfolder / CONFIG_NAME
    if folder.is_dir() and os.path.lexists(config):
        check_readable(config, "Model config")


__all__ = ["MeCoQModel", "MeCoQModelOutput", "MeCoQPreTrainedModel"]
