"""The data section of the training config: where the shards are and how samples become tokens.

Defaults describe the embedded demo data set (32x32 images, 8x8 patches, short captions) so that
a smoke run needs nothing but the shard and tokenizer paths. The sizes (:data:`SIZE_FIELDS`) are the
pipeline's inputs; in a training job they belong to the model and the job config hands them down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import check
from .shards import check_shards

__all__ = ["DataConfig", "CLIP_MEAN", "CLIP_STD", "SIZE_FIELDS"]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# the sizes the pipeline shares with the model: a job sets them once, under model.
SIZE_FIELDS = ("image_size", "patch_size", "max_text_len")


@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=list)
    eval_shards: list[str] = field(default_factory=list)
    tokenizer: str = ""
    image_size: int = 32
    patch_size: int = 8
    max_text_len: int = 24
    batch_size: int = 32
    num_workers: int = 2
    prefetch_factor: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False
    epoch_samples: int = 4000
    seed: int = 0
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    max_bad_fraction: float = 0.5
    bad_check_min_samples: int = 256
    pad_to_max: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    @property
    def seq_len(self) -> int:
        """Longest token stream a batch can hold: every image patch plus a full caption."""
        return self.num_patches + self.max_text_len

    @property
    def epoch_batches(self) -> int:
        return self.epoch_samples // self.batch_size

    def validate(self, check_paths: bool = True, prefix: str = "data", sizes_prefix: str = "") -> None:
        """Raise ConfigError naming the first bad field; ``check_paths`` also looks at the disk.
        ``sizes_prefix``: the section the sizes came from (a job's ``model``), named in their errors."""

        def f(name: str) -> str:
            if sizes_prefix and name in SIZE_FIELDS:
                return f"{sizes_prefix}.{name}"
            return f"{prefix}.{name}" if prefix else name

        for name in (
            "image_size",
            "patch_size",
            "max_text_len",
            "batch_size",
            "epoch_samples",
            "prefetch_factor",
            "bad_check_min_samples",
        ):
            value = getattr(self, name)
            check(value > 0, f(name), f"must be a positive integer, got {value}")
        check(
            self.num_workers >= 0,
            f("num_workers"),
            f"must be >= 0 (0 = load in the main process), got {self.num_workers}",
        )
        check(
            self.shuffle_buffer >= 0,
            f("shuffle_buffer"),
            f"must be >= 0 (0 or 1 = no sample shuffling), got {self.shuffle_buffer}",
        )
        check(
            self.image_size % self.patch_size == 0,
            f("image_size"),
            f"{self.image_size} is not divisible by patch_size {self.patch_size}; pick an image_size that is a "
            f"multiple of it (e.g. {max(1, self.image_size // self.patch_size) * self.patch_size})",
        )
        check(
            self.max_text_len >= 3,
            f("max_text_len"),
            f"must be >= 3 (bos + at least one token + eos), got {self.max_text_len}",
        )
        check(
            self.epoch_samples >= self.batch_size,
            f("epoch_samples"),
            f"{self.epoch_samples} is smaller than batch_size {self.batch_size}: an epoch would hold no batch",
        )
        check(
            0.0 <= self.max_bad_fraction <= 1.0,
            f("max_bad_fraction"),
            f"must lie in [0, 1], got {self.max_bad_fraction}",
        )
        for name in ("mean", "std"):
            value = getattr(self, name)
            check(len(value) == 3, f(name), f"needs one value per RGB channel (3), got {list(value)}")
        check(all(s > 0 for s in self.std), f("std"), f"every value must be > 0, got {list(self.std)}")
        for name in ("train_shards", "eval_shards"):
            bad = [p for p in getattr(self, name) if not (isinstance(p, str) and p.strip())]
            check(not bad, f(name), f"shard patterns must be non-empty strings, got {bad}")
        if not check_paths:
            return
        check(
            bool(self.train_shards),
            f("train_shards"),
            "is empty; list tar shards (e.g. ['data/train-{000000..000031}.tar']) or build the demo set "
            "with modalmoe.runtime.data.make_demo",
        )
        check_shards(self.train_shards, f("train_shards"))
        check_shards(self.eval_shards, f("eval_shards"))
        check(
            bool(self.tokenizer),
            f("tokenizer"),
            "is empty; point it at a sentencepiece .model file (train one with train_tokenizer)",
        )
        check(
            Path(self.tokenizer).is_file(),
            f("tokenizer"),
            f"{self.tokenizer!r} does not exist; train one from the captions with train_tokenizer "
            "(make_demo writes tokenizer.model next to the demo shards)",
        )
