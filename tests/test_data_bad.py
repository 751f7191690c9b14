"""Broken samples and shards are skipped and counted by reason; mostly-broken data raises."""

import io
import random
import tarfile

import pytest
import webdataset as wds

from modalmoe.runtime.data import (
    BAD_REASONS,
    BadDataError,
    DataConfig,
    build_loader,
    make_demo,
    render_scene,
    sample_scene,
)


def _image(i, fmt="PNG"):
    buf = io.BytesIO()
    render_scene(sample_scene(random.Random(i)), 32).save(buf, format=fmt)
    return buf.getvalue()


def _write(path, samples):
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)


def _good(prefix, n):
    return [{"__key__": f"{prefix}-{i:04d}", "png": _image(i), "txt": b"a small red circle"} for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), n_train=40, n_eval=10, samples_per_shard=40).tokenizer


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Six shards: two good, one with one sample of each bad kind, a cut tar, a zero-byte and a non-tar."""
    root = tmp_path_factory.mktemp("broken")
    _write(root / "s0-good.tar", _good("g0", 10))
    jpeg = _image(1, "JPEG")
    png = _image(2)
    bad = [
        {"__key__": "bad-jpeg", "jpg": jpeg[: len(jpeg) // 2], "txt": b"a truncated jpeg"},
        {"__key__": "bad-png", "png": b"\x00BADHDR\x00" + png[8:], "txt": b"a png with a bad header"},
        {"__key__": "bad-notxt", "png": png, "json": b"{}"},
        {"__key__": "bad-empty", "png": png, "txt": b"  \n"},
        {"__key__": "bad-utf8", "png": png, "txt": b"caf\xe9 \xff\xfe"},
        {"__key__": "bad-noimg", "txt": b"a caption without an image", "json": b"{}"},
    ]
    _write(root / "s1-mixed.tar", _good("m", 4) + bad + _good("n", 4))
    _write(root / "s2-full.tar", [dict(s, json=b"{}") for s in _good("c", 10)])
    with tarfile.open(root / "s2-full.tar") as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == "c-0006.png").offset_data + 200
    (root / "s2-cut.tar").write_bytes((root / "s2-full.tar").read_bytes()[:cut_at])
    (root / "s2-full.tar").unlink()
    (root / "s3-zero.tar").write_bytes(b"")
    (root / "s4-notar.tar").write_bytes(b"this is not a tar archive\n" * 100)
    _write(root / "s5-good.tar", _good("g5", 10))
    return root


def _cfg(root, tok, **kw):
    base = dict(
        train_shards=[str(root / "s*.tar")],
        eval_shards=[str(root / "s*.tar")],
        tokenizer=tok,
        batch_size=4,
        epoch_samples=96,
        shuffle_buffer=8,
        num_workers=0,
        bad_check_min_samples=8,
        max_bad_fraction=0.9,
    )
    return DataConfig(**{**base, **kw})


GOOD_KEYS = (
    {f"g0-{i:04d}" for i in range(10)}
    | {f"g5-{i:04d}" for i in range(10)}
    | {f"m-{i:04d}" for i in range(4)}
    | {f"n-{i:04d}" for i in range(4)}
    | {f"c-{i:04d}" for i in range(6)}
)


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_counts_every_reason_exactly(broken, tok, workers):
    loader = build_loader(
        _cfg(broken, tok, num_workers=workers), split="eval", dp_rank=0, dp_size=1, tokenizer=tok
    )
    batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(GOOD_KEYS)
    assert loader.bad_counts() == {
        "missing_image": 2,  # bad-noimg, and c-0006 whose png was cut off with the tar
        "missing_caption": 1,
        "bad_utf8": 1,
        "empty_caption": 1,
        "bad_image": 2,  # truncated jpeg, bad png header
        "bad_shard": 3,  # cut tar, zero-byte tar, not a tar
    }
    per_batch = {}
    for b in batches:
        for reason, n in b.bad_counts.items():
            per_batch[reason] = per_batch.get(reason, 0) + n
    assert per_batch == {r: n for r, n in loader.bad_counts().items() if n}


@pytest.mark.parametrize("workers", [0, 2])
def test_training_keeps_flowing_past_bad_data(broken, tok, workers):
    loader = build_loader(
        _cfg(broken, tok, num_workers=workers), split="train", dp_rank=0, dp_size=1, tokenizer=tok
    )
    batches = list(loader)
    assert len(batches) == 96 // 4
    assert {k for b in batches for k in b.keys} <= GOOD_KEYS
    counts = loader.bad_counts()
    assert set(counts) == set(BAD_REASONS)
    assert all(counts[r] >= 1 for r in BAD_REASONS), counts
    assert loader.state_dict()["bad_counts"] == {r: n for r, n in counts.items() if n}


@pytest.fixture(scope="module")
def mostly_bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("mostly_bad")
    samples = [{"__key__": f"x-{i:04d}", "png": _image(i)} for i in range(30)] + _good("ok", 6)
    random.Random(0).shuffle(samples)
    _write(root / "s0.tar", samples[:18])
    _write(root / "s1.tar", samples[18:])
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_fraction_threshold_raises(mostly_bad, tok, workers):
    cfg = _cfg(mostly_bad, tok, num_workers=workers, max_bad_fraction=0.5, bad_check_min_samples=10)
    with pytest.raises(BadDataError) as err:
        list(build_loader(cfg, split="train", dp_rank=0, dp_size=1, tokenizer=tok))
    assert "max_bad_fraction 0.5" in str(err.value) and "missing_caption=" in str(err.value)


def test_bad_fraction_waits_for_min_samples(mostly_bad, tok):
    cfg = _cfg(
        mostly_bad, tok, epoch_samples=4, max_bad_fraction=0.5, bad_check_min_samples=1000, shuffle_buffer=0
    )
    assert len(list(build_loader(cfg, split="train", dp_rank=0, dp_size=1, tokenizer=tok))) == 1


def test_all_shards_unreadable_raises_instead_of_hanging(tmp_path, tok):
    for i in range(3):
        (tmp_path / f"s{i}.tar").write_bytes(b"" if i else b"garbage" * 100)
    with pytest.raises(BadDataError, match="in a row"):
        list(build_loader(_cfg(tmp_path, tok), split="train", dp_rank=0, dp_size=1, tokenizer=tok))
    with pytest.raises(BadDataError, match="in a row"):
        list(build_loader(_cfg(tmp_path, tok, resampled=True), split="train", dp_rank=0, dp_size=1, tokenizer=tok))
