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
    for key in ["caption_loss", "perplexity", "unigram_loss", "image_ablated_loss", "image_explained_loss", "retrieval_r1", "retrieval_r5", "retrieval_chance_r1"]:
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


def test_the_caption_objective_is_normalised_by_the_global_token_count():
    """Two replicas' halves of a batch, each NLL sum divided by the tokens of both, add up to the
    whole batch's caption loss; ``loss`` is that caption mean plus the batch-mean terms."""
    import torch
    from modalmoe.models.config import ModelConfig
    from modalmoe.models.transformer import build_model
    from parity_utils import global_batches, slice_batch

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=32, hidden_size=32, num_heads=4, num_layers=2, ffn_hidden_size=64,
                                    moe_every=0, image_size=16, patch_size=8, max_text_len=12, contrastive_coef=0.5))
    batch = global_batches()[0]
    whole, halves = model(batch), [model(slice_batch(batch, 0, 4)), model(slice_batch(batch, 4, 8))]
    n_global = sum(int(h.num_text_tokens) for h in halves)
    assert n_global == int(whole.num_text_tokens) and int(halves[0].num_text_tokens) != int(halves[1].num_text_tokens)
    assert torch.allclose(sum(h.caption_nll_sum for h in halves) / n_global, whole.caption_loss, rtol=1e-6)
    for out in (whole, *halves):
        assert torch.allclose(out.caption_nll_sum / out.num_text_tokens, out.caption_loss, rtol=1e-6)
        assert torch.allclose(out.loss, out.caption_loss + out.non_caption_loss)
        assert torch.allclose(out.non_caption_loss, 0.5 * out.contrastive_loss + out.aux_loss)


def test_the_trainer_takes_the_launch_it_is_given(demo_dir, tmp_path, monkeypatch):
    """A LaunchInfo passed in wins over the environment (which here says: one process)."""
    import torch.distributed as dist
    from modalmoe.runtime.config import ConfigError
    from modalmoe.runtime.data import demo_paths
    from modalmoe.runtime.launch_info import LaunchInfo
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.trainer import Trainer

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    paths = demo_paths(demo_dir)
    cfg = load_job_config(None, TINY + [f"data.train_shards={paths['train']}", f"data.tokenizer={paths['tokenizer']}",
                                        "data.eval_shards=[]", f"train.run_dir={tmp_path}", "parallel.engine=torch"])
    two = LaunchInfo("torchrun", 0, 2, 0, 2, "127.0.0.1", 29500, "2 processes on 1 node(s)")
    with pytest.raises(ConfigError, match="parallel.engine"):
        Trainer(cfg, train_data=[], launch=two)
    assert not dist.is_initialized()
    trainer = Trainer(cfg, train_data=[], launch=LaunchInfo("single", 0, 1, 0, 1, None, None))
    assert trainer.checkpoints.layout_meta()["world"] == 1 and trainer.process.launch.launcher == "single"
