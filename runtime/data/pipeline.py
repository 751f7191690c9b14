"""The webdataset pipeline and the resumable loader a trainer iterates.

Every stream is a pure function of (seed, epoch, dp_rank, worker): shard order, shard resampling
and the shuffle buffer are seeded from those, never from the clock or the global rank. Hence
tensor-parallel ranks of one replica (same dp_rank) see identical batches, and a resume only has to
record how far each worker had read. The loader's state is

    (epoch, batches yielded this epoch, raw samples each worker had consumed at its last batch)

and resuming rebuilds the streams, skips the consumed raw samples *before* decoding, and rotates
worker ids so torch's round-robin over workers continues with the worker that owes the next batch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import webdataset as wds
from webdataset import tariterators
from webdataset.utils import make_seed

from ..config import ConfigError, check
from ..cpu_affinity import worker_init_fn
from .batch import Batch, collate
from .config import DataConfig
from .counts import BAD_REASONS, SampleCounter, ShardErrors, check_bad_fraction
from .decode import BadSample, ImageTransform, SampleDecoder
from .shards import closing_streams, expand_shards
from .tokenizer import Tokenizer

__all__ = ["SplitPlan", "split_plan", "SampleStream", "ShardLoader", "build_loader"]

log = logging.getLogger("modalmoe.data")

STATE_VERSION = 1


SplitUnit = Literal["shards", "samples", "seed"]


@dataclass(frozen=True)
class SplitPlan:
    """How dp ranks and workers divide the data: by shard, by every k-th sample (too few shards),
    or not at all because each stream resamples shards with its own seed."""

    dp: SplitUnit
    worker: SplitUnit


def split_plan(num_shards: int, dp_size: int, num_workers: int, resampled: bool = False) -> SplitPlan:
    """Prefer splitting shards (each stream reads only its own tars); fall back to sample slicing
    when there are fewer shards than streams, which keeps the split disjoint but reads every shard."""
    if resampled:
        return SplitPlan("seed", "seed")
    if num_shards < dp_size:
        return SplitPlan("samples", "samples")
    return SplitPlan("shards", "shards" if num_shards // dp_size >= num_workers else "samples")


def _observe(src: Iterator[dict], errors: ShardErrors) -> Iterator[dict]:
    for sample in src:
        errors.saw_sample()
        yield sample


def _track_shards(src: Iterator[dict], errors: ShardErrors) -> Iterator[dict]:
    for source in src:
        errors.begin_shard(source["url"])
        yield source


def _skip_and_count(src: Iterator[dict], counter: SampleCounter, skip: int) -> Iterator[dict]:
    """Drop the first ``skip`` samples undecoded (resume), then count what passes to the decoder.

    Skip counts are muted while skipping: they were already reported before the checkpoint.
    """
    counter.muted = skip > 0
    for sample in src:
        counter.raw += 1
        if counter.raw <= skip:
            counter.muted = counter.raw < skip
            continue
        yield sample
    counter.muted = False


class SampleStream(torch.utils.data.IterableDataset):
    """One dp rank's stream of collated batches; each dataloader worker runs its own slice of it.

    The webdataset pipeline is built inside ``__iter__`` (so inside the worker) because the worker
    id, the epoch and the resume offsets are only known there.
    """

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        tokenizer: Tokenizer,
        *,
        train: bool,
        dp_rank: int,
        dp_size: int,
        num_workers: int,
    ):
        super().__init__()
        self.cfg = cfg
        self.urls = urls
        self.tokenizer = tokenizer
        self.train = train
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_streams = max(1, num_workers)
        self.plan = split_plan(len(urls), dp_size, self.num_streams, resampled=train and cfg.resampled)
        self.epoch = 0
        self.worker_offset = 0
        self.skip: list[int] = [0] * self.num_streams

    def _worker(self) -> int:
        """This worker's logical id: the physical id rotated by the resume offset."""
        info = torch.utils.data.get_worker_info()
        physical, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != self.num_streams:
            raise RuntimeError(f"SampleStream built for {self.num_streams} workers runs in {n}")
        return (physical + self.worker_offset) % n

    def _shard_source(self, worker: int):
        cfg, epoch = self.cfg, self.epoch
        if self.train and cfg.resampled:
            return wds.ResampledShards(
                self.urls,
                seed=cfg.seed,
                worker_seed=lambda: make_seed(epoch, self.dp_rank, worker),
                deterministic=True,
            )
        if not self.train:
            return wds.SimpleShardList(self.urls)

        # Endless passes, reshuffled identically on every rank each pass; the dp/worker slices that
        # follow partition the concatenated stream, so ranks never share a shard within a pass.
        def passes() -> Iterator[dict]:
            for p in itertools.count():
                yield from wds.SimpleShardList(self.urls, seed=make_seed(cfg.seed, epoch, p))

        return passes

    def pipeline(self, worker: int, counter: SampleCounter) -> wds.DataPipeline:
        cfg, plan, n = self.cfg, self.plan, self.num_streams
        errors = ShardErrors(counter, self.urls)
        stages: list[Any] = [self._shard_source(worker)]
        if plan.dp == "shards" and self.dp_size > 1:
            stages.append(wds.slice(self.dp_rank, None, self.dp_size))
        if plan.worker == "shards" and n > 1:
            stages.append(wds.slice(worker, None, n))
        stages += [
            wds.pipelinefilter(tariterators.url_opener)(handler=errors.on_open),
            closing_streams,
            wds.pipelinefilter(_track_shards)(errors),
            wds.pipelinefilter(tariterators.tar_file_expander)(handler=errors.on_read),
            wds.pipelinefilter(tariterators.group_by_keys)(handler=errors.on_read),
            wds.pipelinefilter(_observe)(errors),
        ]
        if plan.dp == "samples" and self.dp_size * n > 1:
            stages.append(wds.slice(self.dp_rank * n + worker, None, self.dp_size * n))
        elif plan.worker == "samples" and n > 1:
            stages.append(wds.slice(worker, None, n))
        if self.train and cfg.shuffle_buffer > 1:
            seed = make_seed(cfg.seed, self.epoch, self.dp_rank, worker)
            stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, seed=seed))
        stages.append(wds.pipelinefilter(_skip_and_count)(counter, self.skip[worker]))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[Batch]:
        cfg = self.cfg
        worker = self._worker()
        counter = SampleCounter()
        decode = SampleDecoder(
            ImageTransform(cfg.image_size, cfg.patch_size, cfg.mean, cfg.std), self.tokenizer, cfg.max_text_len
        )
        pad_to = cfg.max_text_len if cfg.pad_to_max else None
        where = f"dp rank {self.dp_rank} worker {worker}: "
        pending = []
        held: Batch | None = None  # eval only: the tail's skip counts must ride on a batch
        for raw in self.pipeline(worker, counter):
            try:
                pending.append(decode(raw))
                counter.good += 1
            except BadSample as bad:
                counter.count_bad(bad.reason)
                log.debug("skipping sample from %s: %s", raw.get("__url__"), bad)
            check_bad_fraction(counter.good, counter.bad, cfg.max_bad_fraction, cfg.bad_check_min_samples, where)
            if len(pending) == cfg.batch_size:
                batch = self._batch(pending, counter, worker, pad_to)
                pending = []
                if self.train:
                    yield batch
                    continue
                if held is not None:
                    yield held
                held = batch
        if self.train:
            return
        if pending:
            if held is not None:
                yield held
            held = self._batch(pending, counter, worker, pad_to)
        if held is not None:
            for reason, n in counter.take_delta().items():
                held.bad_counts[reason] = held.bad_counts.get(reason, 0) + n
            yield held

    def _batch(self, samples: list, counter: SampleCounter, worker: int, pad_to: int | None) -> Batch:
        batch = collate(samples, self.tokenizer.pad_id, pad_to)
        batch.bad_counts = counter.take_delta()
        batch.worker = worker
        batch.raw_consumed = counter.raw
        return batch


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
        """Skipped samples/shards by reason since the start of training (restored on resume)."""
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

    ``dp_rank``/``dp_size`` are the data-parallel coordinates (not the global rank): every
    tensor-parallel rank of a replica passes the same ``dp_rank`` and so gets the same batches.
    """
    check(split in ("train", "eval"), "split", f"must be 'train' or 'eval', got {split!r}")
    check(dp_size >= 1, "dp_size", f"must be >= 1, got {dp_size}")
    check(0 <= dp_rank < dp_size, "dp_rank", f"must lie in [0, dp_size={dp_size}), got {dp_rank}")
    cfg.validate(check_paths=False)
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
