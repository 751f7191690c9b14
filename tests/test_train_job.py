"""The main job end to end on a tiny demo set: run folder contents, learning, exact resume, CLI errors."""

import json
import shutil
import subprocess
import sys

import pytest
from modalmoe.launch.cli import main

TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2",
    "model.ffn_hidden_size=64", "model.moe.ffn_hidden_size=32", "model.moe.num_experts=4",
    "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=50",
    "train.log_every=5", "train.eval_batches=2", "train.retrieval_size=16", "train.progress=false",
    "train.warmup_steps=2",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    assert main(["data", "make-demo", str(d), "--n-train", "320", "--n-eval", "64"]) == 0
    return d


def _train(demo_dir, run_dir, *extra):
    return main(["train", "--demo-dir", str(demo_dir), "--set", *TINY, f"train.run_dir={run_dir}", *extra])


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}, [r for r in rows if r["split"] == "eval"]


def test_train_writes_the_run_folder_and_learns(demo_dir, tmp_path):
    run = tmp_path / "run"
    assert _train(demo_dir, run, "train.steps=30") == 0
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "routing_report.md", "routing_load.png", "routing_curves.png"]:
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "manifest.json").is_file()
    losses, evals = _losses(run)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[30] < losses[5]
    ev = evals[-1]
    for key in ["caption_loss", "perplexity", "unigram_loss", "retrieval_r1", "retrieval_r5", "retrieval_chance_r1"]:
        assert key in ev
    report = (run / "routing_report.md").read_text()
    assert "| layer | modality |" in report and "| image |" in report and "| text |" in report


def test_resume_continues_the_loss_curve_exactly(demo_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ("train.steps=20", "train.eval_batches=1", "train.save_every=10", "train.keep_checkpoints=3")
    assert _train(demo_dir, full, *common) == 0
    # a job stopped after step 10: only that checkpoint exists; it resumes to the same end
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000010", part / "checkpoints" / "step_00000010")
    (part / "checkpoints" / "latest").write_text("step_00000010\n")
    assert _train(demo_dir, part, *common) == 0
    a, _ = _losses(full)
    b, _ = _losses(part)
    assert sorted(b) == [15, 20]
    assert a[15] == b[15] and a[20] == b[20]


def test_bad_flags_stop_before_work(demo_dir, tmp_path, capsys):
    assert _train(demo_dir, tmp_path / "r", "model.moe.router=nope") == 2
    err = capsys.readouterr().err
    assert "model.moe.router" in err and "choose one of" in err
    assert not (tmp_path / "r").exists()


def test_module_entry_point_prints_config(demo_dir):
    out = subprocess.run(
        [sys.executable, "-m", "modalmoe.launch.train", "--demo-dir", str(demo_dir), "--print-config"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "moe:" in out.stdout and "train_shards:" in out.stdout
