"""Turn a folder of images plus a captions file into webdataset shards the pipeline reads.

Everything is checked before the first byte is written, so a typo in a column name or a missing
image fails fast with the row named instead of leaving half a shard set behind.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import webdataset as wds

from ..config import ConfigError, check
from .decode import IMAGE_EXTS

__all__ = ["read_captions", "convert_folder"]

log = logging.getLogger("modalmoe.data")

_COLUMNS = ("file", "caption")


def read_captions(captions_file: str | Path) -> list[tuple[str, str]]:
    """(file, caption) rows from a CSV with a header ``file,caption`` or JSONL ``{"file", "caption"}``."""
    path = Path(captions_file)
    if not path.is_file():
        raise ConfigError(f"captions file {str(path)!r} does not exist")
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exn:
                    raise ConfigError(f"{path}:{n}: not a JSON object ({exn})") from exn
                missing = [c for c in _COLUMNS if not isinstance(record, dict) or c not in record]
                if missing:
                    raise ConfigError(
                        f'{path}:{n}: missing key(s) {missing}; each line needs {{"file": ..., "caption": ...}}'
                    )
                rows.append((str(record["file"]), str(record["caption"])))
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise ConfigError(
                f"{path}: missing column(s) {missing}; found {header}. The first line must be a header with "
                "columns `file` (image path relative to the image folder) and `caption`"
            )
        for row in reader:
            rows.append((row["file"], row["caption"]))
    return rows


def convert_folder(
    image_dir: str | Path,
    captions_file: str | Path,
    out_pattern: str,
    samples_per_shard: int = 1000,
) -> list[str]:
    """Write shards ``out_pattern % i`` (e.g. ``out/train-%06d.tar``); returns their paths.

    Keys are the row index (``000000042``) so odd file names never break webdataset's key/extension
    split; the original file name and caption are kept in ``key.json``.
    """
    check(samples_per_shard > 0, "samples_per_shard", f"must be positive, got {samples_per_shard}")
    try:
        out_pattern % 0
    except TypeError as exn:
        raise ConfigError(
            f"out_pattern {out_pattern!r} needs one %d-style field for the shard number, e.g. 'out/train-%06d.tar'"
        ) from exn
    image_root = Path(image_dir)
    if not image_root.is_dir():
        raise ConfigError(f"image folder {str(image_root)!r} does not exist")
    rows = read_captions(captions_file)
    check(bool(rows), "captions_file", f"{captions_file} lists no image")
    missing, bad_ext, empty = [], [], []
    for n, (name, caption) in enumerate(rows):
        ext = Path(name).suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            bad_ext.append(name)
        elif not (image_root / name).is_file():
            missing.append(name)
        if not caption.strip():
            empty.append(n)
    if missing:
        raise ConfigError(
            f"{len(missing)} image(s) listed in {captions_file} are not in {image_root} (first: {missing[:5]})"
        )
    if bad_ext:
        raise ConfigError(f"{len(bad_ext)} file(s) are not {'/'.join(IMAGE_EXTS)} images (first: {bad_ext[:5]})")
    if empty:
        raise ConfigError(
            f"{len(empty)} row(s) of {captions_file} have an empty caption (first rows: {empty[:5]})"
        )
    Path(out_pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(
        out_pattern, maxcount=samples_per_shard, verbose=0, encoder=False, mtime=0, post=written.append
    ) as sink:
        for i, (name, caption) in enumerate(rows):
            ext = Path(name).suffix.lower().lstrip(".")
            sink.write(
                {
                    "__key__": f"{i:09d}",
                    ext: (image_root / name).read_bytes(),
                    "txt": caption.strip().encode("utf-8"),
                    "json": json.dumps({"file": name, "caption": caption}, sort_keys=True).encode("utf-8"),
                }
            )
    log.info("converted %d images into %d shard(s) %s", len(rows), len(written), out_pattern)
    return written
