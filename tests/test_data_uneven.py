"""Uneven shards across dp ranks (``resampled: false``): a rank whose share is much smaller starts
its next pass instead of ending its epoch, so no rank hangs at an epoch end and all ranks end each
epoch after the same step; eval passes of uneven length run the same number of forward passes."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_utils import run_distributed
from modalmoe.runtime.data import DataConfig, build_loader, make_demo
from parity_utils import MODEL
from shard_utils import good_samples, write_tar

BATCH, EPOCH_SAMPLES = 4, 16  # 4 batches an epoch


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return make_demo(tmp_path_factory.mktemp("demo"), n_train=40, n_eval=10, samples_per_shard=40).tokenizer


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """Ten shards; split over 2 ranks, rank 0 reads five of 10 samples each (50), rank 1 one shard of
    3 samples and four empty tars: its share runs out several times in every epoch."""
    root = tmp_path_factory.mktemp("uneven")
    for i in range(10):
        if i % 2 == 0:
            samples = good_samples(f"big{i}", 10)
        else:
            samples = good_samples("small", 3) if i == 1 else []
        write_tar(root / f"s{i:02d}.tar", samples)
    return root


def _cfg(root: Path, tok: str, **kw) -> DataConfig:
    base = dict(train_shards=[str(root / "s*.tar")], eval_shards=[str(root / "s*.tar")], tokenizer=tok,
                batch_size=BATCH, epoch_samples=EPOCH_SAMPLES, shuffle_buffer=8, num_workers=0, resampled=False)
    return DataConfig(**{**base, **kw})


def _positions(loader, n: int) -> list[tuple[int, int]]:
    """(epoch, batch in epoch) after each of ``n`` batches, crossing epochs like the trainer."""
    out: list[tuple[int, int]] = []
    while len(out) < n:
        for _ in loader:
            out.append((loader.epoch, loader.batch_in_epoch))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_ends_each_epoch_after_the_same_batch(uneven, tok, workers):
    cfg = _cfg(uneven, tok, num_workers=workers)
    loaders = [build_loader(cfg, split="train", dp_rank=r, dp_size=2, tokenizer=tok) for r in range(2)]
    assert all(loader.stream.plan.dp == "shards" for loader in loaders)
    expected = [(e, b) for e in range(3) for b in range(1, 5)][:10]
    runs = [_positions(loader, 10) for loader in loaders]
    assert runs[0] == runs[1] == expected
    small = loaders[1]
    assert sum(small.state_dict()["raw_consumed"]) > 3  # it read its 3 samples several times this epoch


def _train(rank: int, world: int, root: str, tok: str, run_dir: str) -> dict:
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.trainer import Trainer

    cfg = load_job_config(None, MODEL + [
        f"data.train_shards=['{root}/s*.tar']", f"data.eval_shards=['{root}/s*.tar']", f"data.tokenizer={tok}",
        f"data.batch_size={BATCH}", f"data.epoch_samples={EPOCH_SAMPLES}", "data.shuffle_buffer=8",
        "data.resampled=false", "train.steps=10", "train.log_every=5",
        "train.eval_batches=4", "train.retrieval_size=8", f"train.run_dir={run_dir}",
    ]).validate()
    trainer = Trainer(cfg)
    seen: list[tuple[int, int]] = []
    loader = trainer.train_loader

    class Recording:  # the trainer's own loader, noting where each batch it hands out falls
        def __iter__(self):
            for batch in loader:
                seen.append((loader.epoch, loader.batch_in_epoch))
                yield batch

        def __getattr__(self, name):
            return getattr(loader, name)

    trainer.train_loader = Recording()
    summary = trainer.fit()
    return {"step": summary["step"], "seen": seen, "eval": summary["eval"], "raw": loader.state_dict()["raw_consumed"]}


def test_training_past_the_small_ranks_epoch_end_does_not_hang(uneven, tok, tmp_path):
    out = run_distributed(_train, 2, str(uneven), tok, str(tmp_path / "run"), timeout=240)
    expected = [(e, b) for e in range(3) for b in range(1, 5)][:10]
    assert [o["step"] for o in out] == [10, 10]
    assert out[0]["seen"] == out[1]["seen"] == expected
    assert sum(out[1]["raw"]) > 3
    assert out[0]["eval"] == out[1]["eval"] and out[0]["eval"]["caption_loss"] > 0  # uneven eval passes too
