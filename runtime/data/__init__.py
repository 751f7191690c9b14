"""Data pipeline: webdataset image+caption shards -> token-stream batches for the multimodal MoE.

Entry points for the CLI and the trainer: :func:`make_demo`, :func:`train_tokenizer`,
:func:`convert_folder`, :func:`build_loader` (with ``state_dict``/``load_state_dict``/``bad_counts``).
"""

from .batch import MODALITY_IMAGE, MODALITY_TEXT, Batch, collate
from .config import CLIP_MEAN, CLIP_STD, SIZE_FIELDS, DataConfig
from .convert import convert_folder, read_captions
from .counts import BAD_REASONS, SAMPLE_REASONS, BadDataError, check_bad_fraction
from .decode import IMAGE_EXTS, BadSample, ImageTransform, Sample, SampleDecoder, caption_ids, patchify, unpatchify
from .demo import HELDOUT_COMBOS, DemoData, Scene, SceneObject, demo_paths, make_demo, render_scene, sample_scene
from .loader import ShardLoader, build_loader
from .pipeline import SampleStream, SplitPlan, split_plan
from .shards import check_shards, expand_shards, is_local
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, check_vocab_size, iter_captions, train_tokenizer

__all__ = [
    "BAD_REASONS",
    "BOS_ID",
    "CLIP_MEAN",
    "CLIP_STD",
    "EOS_ID",
    "HELDOUT_COMBOS",
    "IMAGE_EXTS",
    "MODALITY_IMAGE",
    "MODALITY_TEXT",
    "PAD_ID",
    "SAMPLE_REASONS",
    "SIZE_FIELDS",
    "UNK_ID",
    "BadDataError",
    "BadSample",
    "Batch",
    "DataConfig",
    "DemoData",
    "ImageTransform",
    "Sample",
    "SampleDecoder",
    "SampleStream",
    "Scene",
    "SceneObject",
    "ShardLoader",
    "SplitPlan",
    "Tokenizer",
    "build_loader",
    "caption_ids",
    "check_bad_fraction",
    "check_shards",
    "check_vocab_size",
    "collate",
    "convert_folder",
    "demo_paths",
    "expand_shards",
    "is_local",
    "iter_captions",
    "make_demo",
    "patchify",
    "read_captions",
    "render_scene",
    "sample_scene",
    "split_plan",
    "train_tokenizer",
    "unpatchify",
]
