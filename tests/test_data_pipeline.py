"""The training/eval pipeline: dp splitting, epoch length, determinism and exact resume."""

import io
import logging
import random

import pytest
import torch
import webdataset as wds
from modalmoe.runtime.data import DataConfig, build_loader, iter_captions, make_demo, render_scene, sample_scene


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data = make_demo(root, seed=1, n_train=240, n_eval=50, samples_per_shard=20)
    # shards with broken samples mixed in, so resume must skip exactly past dropped samples
    for s in range(4):
        with wds.TarWriter(str(root / f"extra-{s:06d}.tar"), encoder=False) as sink:
            for i in range(20):
                buf = io.BytesIO()
                render_scene(sample_scene(random.Random(i)), 32).save(buf, format="PNG")
                sample = {"__key__": f"extra{s}-{i:04d}", "png": buf.getvalue(), "txt": b"a small red circle"}
                if i % 4 == 1:
                    del sample["txt"]
                if i % 4 == 2:
                    sample["png"] = b"garbage"
                sink.write(sample)
    return data


def _cfg(demo, **kw):
    base = dict(
        train_shards=demo.train_shards,
        eval_shards=demo.eval_shards,
        tokenizer=demo.tokenizer,
        batch_size=8,
        epoch_samples=96,
        shuffle_buffer=16,
        num_workers=0,
        seed=5,
    )
    return DataConfig(**{**base, **kw})


def _keys(batches):
    return [k for b in batches for k in b.keys]


def _same(a, b):
    assert a.keys == b.keys
    for name in ("patches", "text", "text_mask", "modality", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("workers", [0, 2])
def test_dp_ranks_disjoint_and_same_dp_rank_identical(demo, workers):
    cfg = _cfg(demo, num_workers=workers)
    r0 = list(build_loader(cfg, split="train", dp_rank=0, dp_size=2, tokenizer=demo.tokenizer))
    r1 = list(build_loader(cfg, split="train", dp_rank=1, dp_size=2, tokenizer=demo.tokenizer))
    twin = list(build_loader(cfg, split="train", dp_rank=0, dp_size=2, tokenizer=demo.tokenizer))  # a TP peer
    k0, k1 = _keys(r0), _keys(r1)
    assert len(k0) == len(k1) == 96
    assert len(set(k0)) == 96 and len(set(k1)) == 96
    assert not set(k0) & set(k1)
    for a, b in zip(r0, twin, strict=True):
        _same(a, b)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("single_shard", [False, True])
def test_eval_sees_each_sample_once_across_dp_ranks(demo, workers, single_shard):
    shards = [demo.eval_shards[0].replace("{000000..000002}", "000000")] if single_shard else demo.eval_shards
    expected = sorted(f"eval-{i:06d}" for i in range(20 if single_shard else 50))
    for dp_size in (1, 2, 3):
        cfg = _cfg(demo, eval_shards=shards, num_workers=workers)
        keys = []
        for rank in range(dp_size):
            loader = build_loader(cfg, split="eval", dp_rank=rank, dp_size=dp_size, tokenizer=demo.tokenizer)
            keys += _keys(loader)
        assert sorted(keys) == expected, (dp_size, workers)


def test_eval_is_ordered_and_repeatable(demo):
    loader = build_loader(_cfg(demo), split="eval", dp_rank=0, dp_size=1, tokenizer=demo.tokenizer)
    first, second = list(loader), list(loader)
    assert _keys(first) == [f"eval-{i:06d}" for i in range(50)]
    assert [b.size for b in first] == [8] * 6 + [2]
    for a, b in zip(first, second, strict=True):
        _same(a, b)
    assert captions_match(demo, first)


def captions_match(demo, batches):
    from modalmoe.runtime.data import Tokenizer

    tok = Tokenizer(demo.tokenizer)
    captions = list(iter_captions(demo.eval_shards))
    decoded = [tok.decode(row) for b in batches for row in b.text.tolist()]
    return decoded == captions


@pytest.mark.parametrize("resampled", [False, True])
def test_epoch_length_does_not_depend_on_workers(demo, resampled):
    orders = []
    for workers in (0, 2):
        loader = build_loader(
            _cfg(demo, num_workers=workers, resampled=resampled),
            split="train",
            dp_rank=0,
            dp_size=1,
            tokenizer=demo.tokenizer,
        )
        assert len(loader) == 12
        epoch0, epoch1 = list(loader), list(loader)
        assert len(epoch0) == len(epoch1) == 12 and loader.epoch == 2
        assert all(b.size == 8 for b in epoch0 + epoch1)
        assert _keys(epoch0) != _keys(epoch1)
        orders.append(_keys(epoch0))
    assert orders[0] != orders[1]  # worker count changes the (still deterministic) order, not the length


def _run(loader, n):
    """Take n batches from the loader, crossing epochs like a trainer would."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_resume_gives_the_same_following_batches(demo, workers, resampled):
    shards = demo.train_shards + [demo.out_dir + "/extra-{000000..000003}.tar"]
    cfg = _cfg(demo, train_shards=shards, num_workers=workers, resampled=resampled, max_bad_fraction=0.9)
    make = lambda: build_loader(cfg, split="train", dp_rank=1, dp_size=2, tokenizer=demo.tokenizer)  # noqa: E731
    reference = make()
    expected = _run(reference, 30)  # 2.5 epochs of 12 batches
    for stop in (5, 12, 19):
        first = make()
        head = _run(first, stop)
        state = first.state_dict()
        assert state["batch_in_epoch"] == (12 if stop == 12 else stop % 12)
        resumed = make()
        resumed.load_state_dict(state)
        tail = _run(resumed, 30 - stop)
        for a, b in zip(head + tail, expected, strict=True):
            _same(a, b)
        assert resumed.bad_counts() == reference.bad_counts()
        assert resumed.good_samples == reference.good_samples == 30 * 8
    assert reference.bad_counts()["missing_caption"] > 0 and reference.bad_counts()["bad_image"] > 0


def test_changed_layout_restarts_at_next_epoch(demo, caplog):
    state = build_loader(_cfg(demo), split="train", dp_rank=0, dp_size=1, tokenizer=demo.tokenizer)
    _run(state, 3)
    saved = state.state_dict()
    other = build_loader(_cfg(demo, num_workers=2), split="train", dp_rank=0, dp_size=1, tokenizer=demo.tokenizer)
    with caplog.at_level(logging.WARNING, logger="modalmoe.data"):
        other.load_state_dict(saved)
    assert "num_workers: 0 -> 2" in caplog.text
    assert (other.epoch, other.batch_in_epoch) == (1, 0)
