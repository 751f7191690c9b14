"""Bad-data accounting: why samples and shards were skipped, and when to stop trusting the data.

Web-scale shards always contain some broken samples; skipping them silently hides a broken data
set, and crashing on them kills week-long jobs. So every skip is counted by reason, the counts
travel with the batches out of the dataloader workers, and a mostly-broken stream raises.
Unreadable shards are met again on every pass and by every worker, so they travel as urls and are
counted (:class:`BadShards`) and warned about (:func:`warn_unreadable`) once each.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = [
    "BAD_REASONS",
    "SAMPLE_REASONS",
    "BadDataError",
    "BadShards",
    "SampleCounter",
    "ShardErrors",
    "check_bad_fraction",
    "warn_unreadable",
]

log = logging.getLogger("modalmoe.data")

SAMPLE_REASONS = ("missing_image", "missing_caption", "bad_utf8", "empty_caption", "bad_image")
BAD_REASONS = (*SAMPLE_REASONS, "bad_shard")


class BadDataError(RuntimeError):
    """The data stream is mostly broken (or yields nothing usable); the message says what was seen."""


def check_bad_fraction(
    good: int, bad: Mapping[str, int], max_fraction: float, min_samples: int, where: str = ""
) -> None:
    """Raise BadDataError once ``min_samples`` were seen and too many of them were bad."""
    nbad = sum(bad.get(r, 0) for r in SAMPLE_REASONS)
    seen = good + nbad
    if seen < min_samples:
        return
    if good == 0 or nbad / seen > max_fraction:
        detail = ", ".join(f"{r}={bad[r]}" for r in BAD_REASONS if bad.get(r))
        raise BadDataError(
            f"{where}{nbad} of {seen} samples were bad ({nbad / seen:.1%} > max_bad_fraction {max_fraction:g}): "
            f"{detail or 'none'}; check the shards (are the images and .txt captions there?) or raise "
            "data.max_bad_fraction if this is expected"
        )


class SampleCounter:
    """Per-stream tallies kept inside one dataloader worker; ``take_delta`` (samples) and
    ``take_shards`` (unreadable urls, which the loader dedupes over workers and epochs) ship them
    with a batch. ``bad["bad_shard"]`` is this worker's own distinct count, for its error messages."""

    def __init__(self) -> None:
        self.good = 0
        self.bad: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()
        self.shards: dict[str, str] = {}  # unreadable url -> its error, first one seen
        self._sent_shards = 0
        self.raw = 0
        self.muted = False

    def count_bad(self, reason: str) -> None:
        if not self.muted:
            self.bad[reason] += 1

    def note_shard(self, url: str | None, error: str) -> None:
        """The url is kept even while muted (a resume skipping): the loader dedupes what it had counted."""
        if url is None or url not in self.shards:
            self.count_bad("bad_shard")
        if url is not None:
            self.shards.setdefault(url, error)

    def take_delta(self) -> dict[str, int]:
        delta = {r: self.bad[r] - self._sent[r] for r in SAMPLE_REASONS if self.bad[r] != self._sent[r]}
        self._sent = Counter(self.bad)
        return delta

    def take_shards(self) -> dict[str, str]:
        urls = list(self.shards)[self._sent_shards :]
        self._sent_shards = len(self.shards)
        return {u: self.shards[u] for u in urls}


_warned: dict[str, int] = {}  # this process's unreadable shards, in the order first met


def warn_unreadable(url: str, error: str) -> None:
    """One warning per unreadable shard per process, however many passes, workers and loaders meet it."""
    if url in _warned:
        return
    _warned[url] = len(_warned) + 1
    log.warning(
        "skipping unreadable shard %s: %s (unreadable shard %d so far in this process; each is reported once)",
        url,
        error,
        _warned[url],
    )


class BadShards:
    """The distinct unreadable shards one dp rank counts: a shard counts once for the whole run
    (every epoch and pass, restored on resume), and only on the rank ``owns`` names, so that the
    sum over the data-parallel replicas counts every shard once."""

    def __init__(self, owns: Callable[[str], bool]):
        self.owns = owns
        self.counted: set[str] = set()

    def add(self, shards: Mapping[str, str]) -> int:
        """Warn about ``shards`` (url -> error) and return how many of them are newly counted."""
        new = 0
        for url, error in shards.items():
            warn_unreadable(url, error)
            if url not in self.counted and self.owns(url):
                self.counted.add(url)
                new += 1
        return new

    def state(self) -> list[str]:
        return sorted(self.counted)

    def restore(self, urls: Iterable[str]) -> None:
        self.counted = set(urls)


class ShardErrors:
    """webdataset ``handler=`` hooks that note each unreadable shard and keep the stream going.

    A truncated tar raises twice (inside the member read, then in the header loop), so errors are
    attributed to the shard being read and counted once per opening. A stream whose shards all fail
    or are empty would otherwise loop forever (the other ranks waiting on it in a collective), so a
    long run of shard openings with no sample raises.
    """

    def __init__(self, counter: SampleCounter, urls: Sequence[str]):
        self.counter = counter
        self.current: str | None = None
        self.opened = 0
        self._counted_opening = -1
        self.fruitless_in_row = 0  # shard openings (failed or not) since the last sample
        self.max_fruitless_in_row = 2 * len(urls) + 2

    def _fruitless(self, url: str | None, exn: Exception | None = None) -> None:
        self.fruitless_in_row += 1
        if self.fruitless_in_row >= self.max_fruitless_in_row:
            raise BadDataError(
                f"{self.fruitless_in_row} shard openings in a row yielded no sample (last: {url}; unreadable or "
                "empty tars); are the shard paths and the tar files valid?"
            ) from exn

    def begin_shard(self, url: str) -> None:
        self._fruitless(url)
        self.current = url
        self.opened += 1

    def saw_sample(self) -> None:
        self.fruitless_in_row = 0

    def _record(self, url: str | None, exn: Exception) -> bool:
        error = f"{type(exn).__name__}: {str(exn)[:200]}"
        self.counter.note_shard(url, error)
        log.debug("skipping unreadable shard %s: %s", url, error)
        return True

    def on_open(self, exn: Exception) -> bool:
        """Handler for opening a url (missing file, failing pipe command)."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str)), None)
        self._record(url, exn)
        self._fruitless(url, exn)
        return True

    def on_read(self, exn: Exception) -> bool:
        """Handler for reading and grouping tar members; counts once per shard opening."""
        if self._counted_opening == self.opened:
            return True
        self._counted_opening = self.opened
        return self._record(self.current, exn)
