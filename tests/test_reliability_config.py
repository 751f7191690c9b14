"""Bad configurations are refused before any process group exists, naming the field and the fix.

Each case runs twice: through ``modalmoe train`` (exit code 2, ``error: ...`` on stderr) and through
``Trainer(cfg)`` (ConfigError), with the launcher variables of a multi-rank world set in this one
process: a check that ran only after joining would try to join that world, so a short
``train.collective_timeout_s`` turns such a bug into a quick failure instead of a hang.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from dist_utils import free_port
from modalmoe.launch.cli import main
from modalmoe.launch.presets import preset_path
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.data import make_demo
from modalmoe.train.job_config import load_job_config
from modalmoe.train.trainer import Trainer

TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.ffn_hidden_size=64",
    "model.moe.ffn_hidden_size=32", "model.moe.num_experts=4", "model.vocab_size=64",
    "data.batch_size=4", "data.num_workers=0", "train.progress=false", "train.tensorboard=false",
    "train.collective_timeout_s=10",
]

# id: (world size, overrides, field named, words of the fix)
CASES = {
    "world_not_divisible_by_tp": (3, ["parallel.tp=2"], "parallel.tp", "use one of [1, 3]"),
    "dp_not_divisible_by_ep": (2, ["parallel.ep=4"], "parallel.ep", "use one of [1, 2]"),
    "experts_not_divisible_by_ep": (4, ["parallel.ep=4", "model.moe.num_experts=6"], "model.moe.num_experts", "multiple of 4"),
    "top_k_above_experts": (2, ["model.moe.top_k=5"], "model.moe.top_k", "lower top_k or add experts"),
    "tp_not_dividing_heads": (4, ["parallel.tp=4"], "model.num_heads", "use a multiple of 4"),
    "tp_not_dividing_ffn": (2, ["parallel.tp=2", "model.ffn_hidden_size=63"], "model.ffn_hidden_size", "use a multiple of 2"),
    "tp_not_dividing_expert_ffn": (
        2, ["parallel.tp=2", "parallel.expert_tp=true", "model.moe.ffn_hidden_size=31"], "model.moe.ffn_hidden_size",
        "change model.moe.ffn_hidden_size to a multiple of 2",
    ),
    "unknown_router": (2, ["model.moe.router=nope"], "model.moe.router", "choose one of"),
    "negative_lb_coef": (2, ["model.moe.lb_coef=-0.1"], "model.moe.lb_coef", "must be >= 0"),
    "negative_z_loss_coef": (2, ["model.moe.z_loss_coef=-1"], "model.moe.z_loss_coef", "must be >= 0"),
    "negative_contrastive_coef": (2, ["model.contrastive_coef=-0.5"], "model.contrastive_coef", "must be >= 0"),
    "missing_shards": (2, ["data.train_shards=['/nonexistent/train-{000000..000003}.tar']"], "data.train_shards", "matches no existing file"),
    "unwritable_run_dir": (2, ["train.run_dir={file}/run"], "train.run_dir", "choose a writable folder"),
    "tokenizer_vocab_mismatch": (2, ["model.vocab_size=8"], "model.vocab_size", "set model.vocab_size >="),
    "override_not_yaml": (2, ["data.train_shards=[/x/train-{000000..000003}.tar]"], "data.train_shards=", "quote strings"),
    "zero_max_nonfinite_steps": (2, ["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps", "must be >= 1"),
    "collapse_share_too_big": (2, ["train.collapse_share=1.5"], "train.collapse_share", "in [0, 1)"),
    "data_size_set_under_data": (2, ["data.patch_size=4"], "data.patch_size", "set model.patch_size=4 instead"),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_train=64, n_eval=16, samples_per_shard=32)
    return d


def _world(monkeypatch, world: int) -> None:
    env = {"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def _overrides(case: str, demo, tmp_path) -> list[str]:
    _, extra, _, _ = CASES[case]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    extra = [x.replace("{file}", str(blocker)) for x in extra]
    base = [f"data.train_shards=[{demo}/train-000000.tar]", f"data.eval_shards=[{demo}/eval-000000.tar]",
            f"data.tokenizer={demo}/tokenizer.model", f"train.run_dir={tmp_path}/run"]
    return TINY + base + extra


@pytest.mark.parametrize("case", list(CASES))
def test_cli_refuses_before_any_process_group(case, demo, tmp_path, monkeypatch, capsys):
    world, _, field, fix = CASES[case]
    _world(monkeypatch, world)
    assert main(["train", "--set", *_overrides(case, demo, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and field in err and fix in err, err
    assert not dist.is_initialized()


@pytest.mark.parametrize("case", [c for c in CASES if c != "override_not_yaml"])  # that one is the CLI's
def test_trainer_refuses_before_any_process_group(case, demo, tmp_path, monkeypatch):
    world, _, field, fix = CASES[case]
    _world(monkeypatch, world)
    # as the CLI loads it, but not validated: the Trainer must do that itself
    cfg = load_job_config(preset_path("smoke"), _overrides(case, demo, tmp_path))
    with pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert field in str(e.value) and fix in str(e.value), str(e.value)
    assert not dist.is_initialized()
