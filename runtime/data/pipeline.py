"""The webdataset pipeline: one dp rank's stream of collated batches, split over dataloader workers.

Every stream is a pure function of (seed, epoch, dp_rank, worker): shard order, shard resampling
and the shuffle buffer are seeded from those, never from the clock or the global rank. Hence
tensor-parallel ranks of one replica (same dp_rank) see identical batches, and a resume only has to
record how far each worker had read (:mod:`.loader` keeps that position): the stream skips the
consumed raw samples *before* decoding, and its worker ids rotate so torch's round-robin over
workers continues with the worker that owes the next batch.

Split by shards, a dp rank always reads the same shards (``urls[dp_rank::dp_size]``), whatever the
pass or epoch, so each shard has one reader (and one rank that counts it if it is unreadable).
Shares may be uneven, but a training stream is endless passes over its share and an epoch is a
fixed number of batches on every rank, so all ranks end an epoch after the same step.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import webdataset as wds
from webdataset import tariterators
from webdataset.utils import make_seed

from .batch import Batch, collate
from .config import DataConfig
from .counts import SampleCounter, ShardErrors, check_bad_fraction
from .decode import BadSample, ImageTransform, SampleDecoder
from .shards import closing_streams
from .tokenizer import Tokenizer

__all__ = ["SplitPlan", "split_plan", "SampleStream"]

log = logging.getLogger("modalmoe.data")


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
    # the smallest rank's share decides whether its workers can split shards too
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
        self._index = {u: i for i, u in enumerate(urls)}

    def owns(self, url: str) -> bool:
        """Whether this dp rank counts ``url`` as bad: every shard has one owner, the rank that reads
        it when splitting by shards (``index % dp_size``), so the counts sum over ranks without repeats.
        A url not in the list (a pipe's error) counts where it was met."""
        i = self._index.get(url)
        return i is None or i % self.dp_size == self.dp_rank

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
        mine = self.urls[self.dp_rank :: self.dp_size] if self.plan.dp == "shards" else self.urls
        if not self.train:
            return wds.SimpleShardList(mine)

        # Endless passes over this rank's shards, reshuffled each pass (identically on every rank when
        # ranks split samples); the worker slices that follow partition the concatenated stream.
        def passes() -> Iterator[dict]:
            for p in itertools.count():
                yield from wds.SimpleShardList(mine, seed=make_seed(cfg.seed, epoch, p))

        return passes

    def pipeline(self, worker: int, counter: SampleCounter) -> wds.DataPipeline:
        cfg, plan, n = self.cfg, self.plan, self.num_streams
        errors = ShardErrors(counter, self.urls)
        stages: list[Any] = [self._shard_source(worker)]
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
            held.bad_shards.update(counter.take_shards())
            yield held

    def _batch(self, samples: list, counter: SampleCounter, worker: int, pad_to: int | None) -> Batch:
        batch = collate(samples, self.tokenizer.pad_id, pad_to)
        batch.bad_counts = counter.take_delta()
        batch.bad_shards = counter.take_shards()
        batch.worker = worker
        batch.raw_consumed = counter.raw
        return batch
