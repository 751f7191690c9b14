"""Bad-data accounting: why samples and shards were skipped, and when to stop trusting the data.

Web-scale shards always contain some broken samples; skipping them silently hides a broken data
set, and crashing on them kills week-long jobs. So every skip is counted by reason, the counts
travel with the batches out of the dataloader workers, and a mostly-broken stream raises.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence

__all__ = ["BAD_REASONS", "SAMPLE_REASONS", "BadDataError", "SampleCounter", "ShardErrors", "check_bad_fraction"]

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
    """Per-stream tallies kept inside one dataloader worker; ``take_delta`` ships them with a batch."""

    def __init__(self) -> None:
        self.good = 0
        self.bad: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()
        self.raw = 0
        self.muted = False

    def count_bad(self, reason: str) -> None:
        if not self.muted:
            self.bad[reason] += 1

    def take_delta(self) -> dict[str, int]:
        delta = {r: self.bad[r] - self._sent[r] for r in BAD_REASONS if self.bad[r] != self._sent[r]}
        self._sent = Counter(self.bad)
        return delta


class ShardErrors:
    """webdataset ``handler=`` hooks that count each unreadable shard once and keep the stream going.

    A truncated tar raises twice (inside the member read, then in the header loop), so errors are
    attributed to the shard being read and counted once per opening. A stream whose shards are all
    unreadable would otherwise loop forever, so a long run of failures with no sample raises.
    """

    def __init__(self, counter: SampleCounter, urls: Sequence[str]):
        self.counter = counter
        self.current: str | None = None
        self.opened = 0
        self._counted_opening = -1
        self.failures_in_row = 0
        self.max_failures_in_row = 2 * len(urls) + 2

    def begin_shard(self, url: str) -> None:
        self.current = url
        self.opened += 1

    def saw_sample(self) -> None:
        self.failures_in_row = 0

    def _record(self, url: str | None, exn: Exception) -> bool:
        self.counter.count_bad("bad_shard")
        self.failures_in_row += 1
        if not self.counter.muted:
            log.warning("skipping unreadable shard %s: %s: %s", url, type(exn).__name__, str(exn)[:200])
        if self.failures_in_row >= self.max_failures_in_row:
            raise BadDataError(
                f"{self.failures_in_row} shard openings in a row failed without yielding a sample (last: {url}); "
                "are the shard paths and the tar files valid?"
            ) from exn
        return True

    def on_open(self, exn: Exception) -> bool:
        """Handler for opening a url (missing file, failing pipe command)."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str)), None)
        return self._record(url, exn)

    def on_read(self, exn: Exception) -> bool:
        """Handler for reading and grouping tar members; counts once per shard opening."""
        if self._counted_opening == self.opened:
            return True
        self._counted_opening = self.opened
        return self._record(self.current, exn)
