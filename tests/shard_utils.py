"""Shards for the bad-data tests: good samples, and every kind of breakage the data path must survive."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import webdataset as wds
from modalmoe.runtime.data import render_scene, sample_scene


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    render_scene(sample_scene(random.Random(i)), 32).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)


def good_samples(prefix: str, n: int) -> list[dict]:
    return [{"__key__": f"{prefix}-{i:04d}", "png": image_bytes(i), "txt": b"a small red circle"} for i in range(n)]


def write_broken_shards(root: Path) -> Path:
    """Six shards: two good, one with one sample of each bad kind, a cut tar, a zero-byte and a non-tar."""
    write_tar(root / "s0-good.tar", good_samples("g0", 10))
    jpeg = image_bytes(1, "JPEG")
    png = image_bytes(2)
    bad = [
        {"__key__": "bad-jpeg", "jpg": jpeg[: len(jpeg) // 2], "txt": b"a truncated jpeg"},
        {"__key__": "bad-png", "png": b"\x00BADHDR\x00" + png[8:], "txt": b"a png with a bad header"},
        {"__key__": "bad-notxt", "png": png, "json": b"{}"},
        {"__key__": "bad-empty", "png": png, "txt": b"  \n"},
        {"__key__": "bad-utf8", "png": png, "txt": b"caf\xe9 \xff\xfe"},
        {"__key__": "bad-noimg", "txt": b"a caption without an image", "json": b"{}"},
    ]
    write_tar(root / "s1-mixed.tar", good_samples("m", 4) + bad + good_samples("n", 4))
    write_tar(root / "s2-full.tar", [dict(s, json=b"{}") for s in good_samples("c", 10)])
    with tarfile.open(root / "s2-full.tar") as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == "c-0006.png").offset_data + 200
    (root / "s2-cut.tar").write_bytes((root / "s2-full.tar").read_bytes()[:cut_at])
    (root / "s2-full.tar").unlink()
    (root / "s3-zero.tar").write_bytes(b"")
    (root / "s4-notar.tar").write_bytes(b"this is not a tar archive\n" * 100)
    write_tar(root / "s5-good.tar", good_samples("g5", 10))
    return root
