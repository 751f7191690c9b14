"""The resumable loader a trainer iterates: epochs of batches from a :class:`SampleStream`.

Its state is (epoch, batches yielded this epoch, raw samples each worker had consumed at its last
batch); resuming hands those to the stream, which rebuilds itself and skips what was consumed.
The state also carries the bad-data counts and the unreadable shards counted so far, so that a
resumed run does not count a shard again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import torch

from ..config import ConfigError, check
from ..cpu_affinity import worker_init_fn
from .batch import Batch
from .config import DataConfig
from .counts import BAD_REASONS, BadShards, check_bad_fraction
from .pipeline import SampleStream
from .shards import expand_shards
from .tokenizer import Tokenizer

__all__ = ["ShardLoader", "build_loader"]

log = logging.getLogger("modalmoe.data")

STATE_VERSION = 1


class ShardLoader:
    """Iterable of :class:`Batch` for one dp rank; ``iter()`` continues the current epoch.

    Train: each epoch is ``epoch_samples // batch_size`` batches whatever the worker count, and the
    epoch counter advances when an epoch is read to its end. Eval: one finite pass, no shuffling.
    """

    def __init__(self, cfg: DataConfig, stream: SampleStream, *, split: Literal["train", "eval"], pin_memory: bool = False):
        self.cfg = cfg
        self.split = split
        self.pin_memory = pin_memory  # page-locked batches, so a non_blocking .to(cuda) overlaps the copy
        self.stream = stream
        self.num_workers = cfg.num_workers
        self.epoch = 0
        self.batch_in_epoch = 0
        self.raw_consumed = [0] * stream.num_streams
        self.good_samples = 0
        self._bad: Counter[str] = Counter()
        self._bad_shards = BadShards(stream.owns)

    @property
    def epoch_batches(self) -> int | None:
        return self.cfg.epoch_batches if self.split == "train" else None

    def __len__(self) -> int:
        if self.epoch_batches is None:
            raise TypeError("the eval loader is a finite pass of unknown length")
        return self.epoch_batches

    def __bool__(self) -> bool:  # truthiness must not go through the eval loader's __len__
        return True

    def bad_counts(self) -> dict[str, int]:
        """Skipped samples, and distinct unreadable shards (``bad_shard``: each counted once, on
        its owning dp rank, however many passes and epochs meet it), since the start of training."""
        return {r: self._bad[r] for r in BAD_REASONS}

    def _batches(self, limit: int | None) -> Iterator[Batch]:
        """At most ``limit`` batches from fresh workers; workers are shut down explicitly on exit,
        since leaving it to garbage collection (an exception's reference cycle) stalls for seconds."""
        kwargs: dict[str, Any] = {"prefetch_factor": self.cfg.prefetch_factor} if self.num_workers > 0 else {}
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=worker_init_fn() if self.num_workers > 0 else None,
            **kwargs,
        )
        it = iter(loader)
        try:
            yield from itertools.islice(it, limit)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __iter__(self) -> Iterator[Batch]:
        if self.split == "eval":
            yield from self._eval_pass()
            return
        if self.batch_in_epoch >= self.cfg.epoch_batches:
            self._next_epoch()
        n = self.stream.num_streams
        self.stream.epoch = self.epoch
        self.stream.worker_offset = self.batch_in_epoch % n
        self.stream.skip = list(self.raw_consumed)
        with contextlib.closing(self._batches(self.cfg.epoch_batches - self.batch_in_epoch)) as batches:
            for batch in batches:
                self._account(batch)
                self.batch_in_epoch += 1
                self.raw_consumed[batch.worker] = batch.raw_consumed
                yield batch
        self._next_epoch()

    def _eval_pass(self) -> Iterator[Batch]:
        self.stream.epoch = self.epoch
        with contextlib.closing(self._batches(None)) as batches:
            for batch in batches:
                self._account(batch)
                yield batch
        self.epoch += 1

    def _account(self, batch: Batch) -> None:
        new_shards = self._bad_shards.add(batch.bad_shards)
        batch.bad_counts = {k: n for k, n in batch.bad_counts.items() if k != "bad_shard"}
        if new_shards:
            batch.bad_counts["bad_shard"] = new_shards
        self.good_samples += batch.size
        self._bad.update(batch.bad_counts)
        check_bad_fraction(
            self.good_samples,
            self._bad,
            self.cfg.max_bad_fraction,
            self.cfg.bad_check_min_samples,
            f"{self.split} data: ",
        )

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.raw_consumed = [0] * self.stream.num_streams

    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same data order."""
        s = self.stream
        return {
            "split": self.split,
            "dp_rank": s.dp_rank,
            "dp_size": s.dp_size,
            "num_workers": self.num_workers,
            "batch_size": self.cfg.batch_size,
            "seed": self.cfg.seed,
            "resampled": self.cfg.resampled,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "num_shards": len(s.urls),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "raw_consumed": list(self.raw_consumed),
            "good_samples": self.good_samples,
            "bad_counts": dict(self._bad),
            "bad_shards": self._bad_shards.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where ``state`` was taken; if the data layout changed (worker count, dp size,
        shards, ...) the exact order cannot be rebuilt, so start the next epoch and say so."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"data loader state version {state.get('version')!r} is not {STATE_VERSION}; cannot resume"
            )
        self.good_samples = int(state["good_samples"])
        self._bad = Counter({k: int(v) for k, v in state["bad_counts"].items()})
        self._bad_shards.restore(state.get("bad_shards", ()))
        self.epoch = int(state["epoch"])
        changed = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            log.warning(
                "data layout changed since the checkpoint (%s); resuming at the start of epoch %d, "
                "not at the exact sample",
                diff,
                self.epoch + 1,
            )
            self._next_epoch()
            return
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.raw_consumed = [int(x) for x in state["raw_consumed"]]


def build_loader(
    cfg: DataConfig,
    *,
    split: Literal["train", "eval"],
    dp_rank: int,
    dp_size: int,
    tokenizer: Tokenizer | str,
    pin_memory: bool = False,
) -> ShardLoader:
    """The loader for one data-parallel rank; ``pin_memory`` when its batches go to a GPU.

    ``cfg`` is validated by the caller (a job's ``JobConfig.validate``, else ``cfg.validate()``).
    ``dp_rank``/``dp_size`` are the data-parallel coordinates (not the global rank): every
    tensor-parallel rank of a replica passes the same ``dp_rank`` and so gets the same batches.
    """
    check(split in ("train", "eval"), "split", f"must be 'train' or 'eval', got {split!r}")
    check(dp_size >= 1, "dp_size", f"must be >= 1, got {dp_size}")
    check(0 <= dp_rank < dp_size, "dp_rank", f"must lie in [0, dp_size={dp_size}), got {dp_rank}")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    field = "data.train_shards" if split == "train" else "data.eval_shards"
    patterns = cfg.train_shards if split == "train" else cfg.eval_shards
    urls = expand_shards(patterns)
    check(
        bool(urls),
        field,
        f"no shard found for {patterns!r}; list existing tar shards or build the demo set with make_demo",
    )
    stream = SampleStream(
        cfg, urls, tokenizer, train=split == "train", dp_rank=dp_rank, dp_size=dp_size, num_workers=cfg.num_workers
    )
    log.info(
        "%s loader: dp rank %d/%d, %d shard(s), %d worker(s), split %s",
        split,
        dp_rank,
        dp_size,
        len(urls),
        cfg.num_workers,
        stream.plan,
    )
    return ShardLoader(cfg, stream, split=split, pin_memory=pin_memory)
