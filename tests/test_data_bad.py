"""Broken samples and shards are skipped and counted by reason; mostly-broken data raises."""

import random

import pytest
from modalmoe.runtime.data import BAD_REASONS, BadDataError, DataConfig, build_loader, make_demo
from shard_utils import good_samples, image_bytes, write_broken_shards, write_tar


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), n_train=40, n_eval=10, samples_per_shard=40).tokenizer


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return write_broken_shards(tmp_path_factory.mktemp("broken"))


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
    samples = [{"__key__": f"x-{i:04d}", "png": image_bytes(i)} for i in range(30)] + good_samples("ok", 6)
    random.Random(0).shuffle(samples)
    write_tar(root / "s0.tar", samples[:18])
    write_tar(root / "s1.tar", samples[18:])
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
