"""Broken samples and shards are skipped and counted by reason; mostly-broken data raises."""

import logging
import random
import re

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


UNREADABLE = ("s2-cut.tar", "s3-zero.tar", "s4-notar.tar")


def _unreadable_warnings(caplog, root) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("skipping unreadable shard") and str(root) in r.getMessage()]


def _epochs(loader, n):
    return [b for _ in range(n) for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_shard_is_counted_and_warned_about_once(tmp_path, tok, workers, caplog):
    root = write_broken_shards(tmp_path)  # urls of its own: warnings are once per process
    cfg = _cfg(root, tok, num_workers=workers, epoch_samples=48)
    make = lambda: build_loader(cfg, split="train", dp_rank=0, dp_size=1, tokenizer=tok)  # noqa: E731
    loader = make()
    with caplog.at_level(logging.WARNING, logger="modalmoe.data"):
        batches = _epochs(loader, 3)  # every pass of every epoch (and every worker) meets all three
    assert sum(b.bad_counts.get("bad_shard", 0) for b in batches) == 3
    assert loader.bad_counts()["bad_shard"] == 3
    warned = _unreadable_warnings(caplog, root)
    assert len(warned) == 3, warned
    assert sorted(next(n for n in UNREADABLE if n in w) for w in warned) == list(UNREADABLE)
    ordinals = [int(re.search(r"unreadable shard (\d+) so far", w).group(1)) for w in warned]
    assert ordinals == list(range(ordinals[0], ordinals[0] + 3)), warned
    state = loader.state_dict()
    assert state["bad_shards"] == sorted(str(root / n) for n in UNREADABLE)

    resumed = make()
    resumed.load_state_dict(state)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modalmoe.data"):
        again = _epochs(resumed, 2)
    assert resumed.bad_counts()["bad_shard"] == 3  # counted before the checkpoint: not again
    assert not any(b.bad_counts.get("bad_shard") for b in again)
    assert not _unreadable_warnings(caplog, root)  # same process: already warned about


@pytest.mark.parametrize(
    "dp_size, resampled, shards",
    [(2, False, None), (2, True, None), (3, False, ("s0-good.tar", "s3-zero.tar"))],
    ids=["split-by-shards", "resampled", "split-by-samples"],
)
def test_bad_shards_summed_over_dp_ranks_count_each_shard_once(tmp_path, tok, dp_size, resampled, shards):
    root = write_broken_shards(tmp_path)
    patterns = [str(root / n) for n in shards] if shards else [str(root / "s*.tar")]
    cfg = _cfg(root, tok, train_shards=patterns, resampled=resampled, epoch_samples=48)
    total = 0
    for rank in range(dp_size):
        loader = build_loader(cfg, split="train", dp_rank=rank, dp_size=dp_size, tokenizer=tok)
        _epochs(loader, 3)
        total += loader.bad_counts()["bad_shard"]
    assert total == (1 if shards else 3)


def test_a_stream_of_empty_shards_raises_instead_of_spinning(tmp_path, tok):
    for i in range(3):
        write_tar(tmp_path / f"s{i}.tar", [])  # valid tars without a sample (img2dataset writes them)
    for resampled in (False, True):
        with pytest.raises(BadDataError, match="in a row yielded no sample"):
            list(build_loader(_cfg(tmp_path, tok, resampled=resampled), split="train", dp_rank=0, dp_size=1,
                              tokenizer=tok))


def test_a_dp_rank_whose_shards_are_empty_raises_and_the_others_run(tmp_path, tok):
    write_tar(tmp_path / "s0.tar", good_samples("g", 6))
    write_tar(tmp_path / "s1.tar", [])
    cfg = _cfg(tmp_path, tok, epoch_samples=16)
    assert len(list(build_loader(cfg, split="train", dp_rank=0, dp_size=2, tokenizer=tok))) == 4
    with pytest.raises(BadDataError, match="in a row yielded no sample"):
        list(build_loader(cfg, split="train", dp_rank=1, dp_size=2, tokenizer=tok))
