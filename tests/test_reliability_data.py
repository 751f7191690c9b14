"""Broken data end to end: ``modalmoe train`` skips and counts every kind of bad sample and shard,
stops with exit code 3 and a clear message on mostly-broken data, and logs the bad counts summed
over the data-parallel replicas."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from dist_utils import run_distributed
from modalmoe.launch.cli import main
from modalmoe.runtime.data import make_demo
from modalmoe.runtime.faults import EXIT_BAD_DATA
from parity_utils import MODEL, FixedBatches, data_overrides, global_batches
from shard_utils import good_samples, image_bytes, write_broken_shards, write_tar

TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.ffn_hidden_size=64",
    "model.moe.ffn_hidden_size=32", "model.moe.num_experts=4",
    "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "data.epoch_samples=32",
    "data.bad_check_min_samples=8", "data.eval_shards=[]",
    "train.log_every=2", "train.progress=false", "train.tensorboard=false", "train.report=false", "train.warmup_steps=1",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_train=64, n_eval=16, samples_per_shard=32)
    return str(d / "tokenizer.model")


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """Every kind of breakage the issue lists, between good shards and good samples."""
    return write_broken_shards(tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def mostly_broken(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mostly_broken")
    samples = [{"__key__": f"x-{i:04d}", "png": image_bytes(i), "txt": b" "} for i in range(30)] + good_samples("ok", 4)
    random.Random(0).shuffle(samples)
    write_tar(root / "s0.tar", samples)
    return root


def test_training_finishes_past_every_kind_of_bad_data_and_counts_it(broken, tokenizer, tmp_path):
    run = tmp_path / "run"
    rc = main(["train", "--set", *TINY, f"data.train_shards=['{broken}/s*.tar']", f"data.tokenizer={tokenizer}",
               "data.max_bad_fraction=0.9", "train.steps=12", f"train.run_dir={run}"])
    assert rc == 0
    assert json.loads((run / "summary.json").read_text())["step"] == 12
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["split"] == "train"][-1]
    assert last["step"] == 12
    for reason, at_least in {"bad_image": 2, "missing_caption": 1, "empty_caption": 1, "bad_utf8": 1, "bad_shard": 3}.items():
        assert last.get(f"data/bad/{reason}", 0) >= at_least, (reason, last)


def test_unreadable_shards_are_warned_about_once_and_counted_once(tokenizer, tmp_path, caplog):
    """60 steps (7.5 epochs, 2 workers restarted each epoch) over three unreadable tars: three
    warnings with a running count, and ``data/bad/bad_shard`` 3 at every log step from the first."""
    shards = tmp_path / "shards"  # urls of its own: each is warned about once per process
    shards.mkdir()
    write_broken_shards(shards)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="modalmoe.data"):
        rc = main(["train", "--set", *TINY, f"data.train_shards=['{shards}/s*.tar']", f"data.tokenizer={tokenizer}",
                   "data.num_workers=2", "data.max_bad_fraction=0.9", "train.steps=60", "train.log_every=20",
                   f"train.run_dir={run}"])
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable shard")]
    assert len(warned) == 3, warned
    names = sorted(w.split()[3].rstrip(":").rsplit("/", 1)[-1] for w in warned)
    assert names == ["s2-cut.tar", "s3-zero.tar", "s4-notar.tar"], warned
    ordinals = [int(w.split("(unreadable shard ")[1].split()[0]) for w in warned]  # a running count
    assert ordinals == list(range(ordinals[0], ordinals[0] + 3)), warned
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("data/bad/bad_shard")) for r in rows if r["split"] == "train"] == [(20, 3), (40, 3), (60, 3)]


def test_mostly_broken_data_stops_the_job_with_a_clear_error(mostly_broken, tokenizer, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "modalmoe.launch.train", "--set", *TINY, f"data.train_shards=['{mostly_broken}/s*.tar']",
         f"data.tokenizer={tokenizer}", "data.max_bad_fraction=0.5", "train.steps=12", f"train.run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, check=False, timeout=180,
    )
    assert out.returncode == EXIT_BAD_DATA, out.stderr[-3000:]
    err = out.stderr
    assert "error: " in err and "max_bad_fraction 0.5" in err and "empty_caption=" in err, err[-3000:]
    assert "Traceback" not in err


class BadCountingBatches(FixedBatches):
    """Each batch reports skips like the shard loader does: different reasons on each replica."""

    def __init__(self, dp_rank: int, dp_size: int):
        super().__init__(global_batches(), dp_rank, dp_size)
        counts = {"bad_utf8": 1} if dp_rank == 0 else {"bad_image": 2, "bad_shard": 1}
        self.batches = [replace(b, bad_counts=dict(counts)) for b in self.batches]


def _train_counting(rank: int, world: int, overrides: list[str], run_dir: str) -> dict | None:
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.trainer import Trainer

    cfg = load_job_config(None, MODEL + overrides + [f"train.run_dir={run_dir}", "train.steps=6", "train.log_every=3"])
    Trainer(cfg.validate(), train_data=BadCountingBatches(rank, world)).fit()
    if rank:
        return None
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"][-1]


def test_bad_counts_are_summed_over_the_data_parallel_replicas(tokenizer, tmp_path):
    demo = Path(tokenizer).parent
    last = run_distributed(_train_counting, 2, data_overrides(demo), str(tmp_path / "run"), timeout=120)[0]
    assert last["step"] == 6
    assert (last["data/bad/bad_utf8"], last["data/bad/bad_image"], last["data/bad/bad_shard"]) == (6, 12, 6)
