"""Shard lists: turn the user's patterns (braces, globs, ``pipe:`` and remote URLs) into one url list.

Local patterns are checked against the disk up front so that a typo fails at config time with the
pattern named, not as an empty epoch an hour into a job.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from webdataset.shardlists import expand_urls

from ..config import ConfigError

__all__ = ["is_local", "expand_shards", "check_shards", "closing_streams"]

log = logging.getLogger("modalmoe.data")

_GLOB_CHARS = set("*?[")


def is_local(url: str) -> bool:
    """Whether ``url`` names a file on this machine (plain path or ``file:``), not a pipe or remote."""
    if url.startswith("file:"):
        return True
    return not url.startswith("pipe:") and "://" not in url


def _local_path(url: str) -> str:
    if url.startswith("file://"):
        return url[len("file://") :]
    if url.startswith("file:"):
        return url[len("file:") :]
    return url


def _expand_one(pattern: str) -> list[str]:
    urls: list[str] = []
    for url in expand_urls(pattern):
        if is_local(url) and _GLOB_CHARS & set(url):
            urls.extend(sorted(glob.glob(os.path.expanduser(_local_path(url)))))
        else:
            urls.append(os.path.expanduser(url) if is_local(url) else url)
    return urls


def expand_shards(patterns: str | Sequence[str], *, drop_missing: bool = True) -> list[str]:
    """Expand brace patterns (``train-{000000..000031}.tar``), ``::`` lists and globs, in order.

    Local shards that do not exist are dropped with a warning (img2dataset output often has gaps);
    ``pipe:`` and remote urls are kept as they are.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        for url in _expand_one(pattern):
            if drop_missing and is_local(url) and not os.path.isfile(_local_path(url)):
                missing.append(url)
            else:
                urls.append(url)
    if missing:
        log.warning("%d shard(s) listed but not on disk, skipped (first: %s)", len(missing), missing[0])
    return urls


def check_shards(patterns: Sequence[str], field: str) -> None:
    """Raise ConfigError for any local pattern that matches no existing file."""
    for pattern in patterns:
        local = [u for u in expand_urls(pattern) if is_local(u)]
        if not local:
            continue
        if not any(os.path.isfile(_local_path(u)) for u in _expand_one(pattern) if is_local(u)):
            raise ConfigError(
                f"config field `{field}`: pattern {pattern!r} matches no existing file (it expands to "
                f"{len(local)} path(s), first {local[0]!r}); fix the path or brace range, e.g. "
                "'shards/train-{000000..000031}.tar', or build the demo set with make_demo"
            )


def _close(stream: Any) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except Exception as exn:  # a pipe cut short exits with SIGPIPE; the shard error was already handled
        log.debug("closing shard stream %s: %r", stream, exn)


def closing_streams(sources: Iterable[dict]) -> Iterator[dict]:
    """Pass opened shards (``{"url", "stream"}``) through, closing each once the tar reader asks for
    the next one or stops; webdataset leaves that to the garbage collector, which keeps pipes open."""
    stream = None
    try:
        for source in sources:
            _close(stream)
            stream = source.get("stream")
            yield source
    finally:
        _close(stream)
