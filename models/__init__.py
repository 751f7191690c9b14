"""The early-fusion multimodal MoE transformer: config, layers, objectives, retrieval metrics."""

from ..runtime.modality import IMAGE, TEXT
from .config import ModelConfig
from .params import count_parameters
from .retrieval import normalize_over_images, recall_at_k
from .transformer import ModelOutput, MultimodalTransformer, build_model

__all__ = [
    "IMAGE",
    "TEXT",
    "ModelConfig",
    "ModelOutput",
    "MultimodalTransformer",
    "build_model",
    "count_parameters",
    "normalize_over_images",
    "recall_at_k",
]
