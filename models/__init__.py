"""The early-fusion multimodal MoE transformer: config, layers, objectives, retrieval metrics."""

from .config import IMAGE, TEXT, ModelConfig
from .params import count_parameters
from .presets import list_presets, load_model_config, preset_path
from .retrieval import normalize_over_images, recall_at_k
from .transformer import ModelOutput, MultimodalTransformer

__all__ = [
    "IMAGE",
    "TEXT",
    "ModelConfig",
    "ModelOutput",
    "MultimodalTransformer",
    "count_parameters",
    "list_presets",
    "load_model_config",
    "normalize_over_images",
    "preset_path",
    "recall_at_k",
]
