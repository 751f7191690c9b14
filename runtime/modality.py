"""The modality id every token carries (``Batch.modality``, the model's modality embedding, the
router's per-modality statistics), defined here once."""

__all__ = ["IMAGE", "TEXT", "MODALITY_NAMES", "NUM_MODALITIES"]

IMAGE, TEXT = 0, 1
MODALITY_NAMES = ("image", "text")  # indexed by id
NUM_MODALITIES = len(MODALITY_NAMES)
