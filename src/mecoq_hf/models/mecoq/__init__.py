"""MeCoQ as a transformers model: the files that `trust_remote_code` checkpoints carry.

Every module here imports only torch, timm, transformers (plus numpy, PIL, safetensors, which they depend
on) and its siblings, with relative `from .x import Y` imports, so `save_pretrained` can copy them next to
the weights.
"""

from .configuration_mecoq import PRESETS, MeCoQConfig
from .image_processing_mecoq import MeCoQImageProcessor
from .modeling_mecoq import MeCoQModel, MeCoQModelOutput, MeCoQPreTrainedModel
from .quantization import ProductQuantizer, load_codebooks, save_codebooks

__all__ = [
    "PRESETS",
    "MeCoQConfig",
    "MeCoQImageProcessor",
    "MeCoQModel",
    "MeCoQModelOutput",
    "MeCoQPreTrainedModel",
    "ProductQuantizer",
    "load_codebooks",
    "save_codebooks",
]
