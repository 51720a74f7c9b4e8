"""mecoq-hf: MeCoQ (Contrastive Quantization with Code Memory, AAAI 2022) for the Hugging Face ecosystem.

Compact image codes for unsupervised retrieval: a timm backbone, a product-quantization head trained with a
debiased contrastive loss and a code memory, hard codes of M bytes per image, and asymmetric search.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .models.mecoq import (
    PRESETS,
    MeCoQConfig,
    MeCoQImageProcessor,
    MeCoQModel,
    MeCoQModelOutput,
    MeCoQPreTrainedModel,
    ProductQuantizer,
    load_codebooks,
    save_codebooks,
)

__version__ = "0.1.0"

AutoConfig.register("mecoq", MeCoQConfig, exist_ok=True)
AutoModel.register(MeCoQConfig, MeCoQModel, exist_ok=True)
AutoImageProcessor.register(MeCoQConfig, slow_image_processor_class=MeCoQImageProcessor, exist_ok=True)
# `save_pretrained` then copies the model's source files and writes `auto_map`, so that
# `AutoModel.from_pretrained(..., trust_remote_code=True)` works where mecoq-hf is not installed.
MeCoQConfig.register_for_auto_class()
MeCoQModel.register_for_auto_class("AutoModel")
MeCoQImageProcessor.register_for_auto_class("AutoImageProcessor")

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
