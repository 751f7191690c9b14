"""`modalmoe checkpoint consolidate`: an EP=2 checkpoint continues under EP=1 and under TP=2 with
the losses the EP=2 run itself went on to have (relative 1e-5 per step, float32; the Adam moments
travel with the weights, so the continuation is the same optimisation, not a warm start)."""

from __future__ import annotations

from dist_utils import run_distributed
from modalmoe.launch.cli import main
from parity_utils import data_overrides, train_run
from safetensors.torch import load_file

RTOL = 1e-5


def test_ep2_checkpoint_continues_under_ep1_and_tp2(demo, tmp_path):
    saving = data_overrides(demo) + ["train.save_every=10", "train.keep_checkpoints=3"]
    curve = run_distributed(train_run, 2, saving + ["parallel.ep=2"], str(tmp_path / "ep2"), timeout=300)[0]
    expected = {step: loss for step, loss, _ in curve if step > 10}

    out = tmp_path / "consolidated"
    assert main(["checkpoint", "consolidate", str(tmp_path / "ep2" / "checkpoints" / "step_00000010"), "--out", str(out)]) == 0
    weights = load_file(str(out / "model.safetensors"))
    experts = [k for k in weights if k.endswith("experts.w1_EHF")]
    assert experts and all(weights[k].shape[0] == 4 for k in experts)  # both EP ranks' experts, whole
    assert (out / "optimizer.safetensors").is_file() and (out / "config.yaml").is_file()

    start = data_overrides(demo) + [f"train.init_from={out}"]
    ep1 = train_run(0, 1, start, str(tmp_path / "ep1"), 10)
    tp2 = run_distributed(train_run, 2, start + ["parallel.tp=2"], str(tmp_path / "tp2"), 10, timeout=300)[0]
    for name, got in (("ep1", ep1), ("tp2", tp2)):
        losses = {step: loss for step, loss, _ in got}
        assert sorted(losses) == sorted(expected), name
        for step, ref in expected.items():
            assert abs(losses[step] - ref) <= RTOL * abs(ref), f"{name}: step {step} loss {losses[step]!r} vs EP=2's {ref!r}"


def test_consolidate_refuses_a_corrupt_checkpoint(demo, tmp_path, capsys):
    run = tmp_path / "one"
    train_run(0, 1, data_overrides(demo) + ["train.steps=2"], str(run))
    ckpt = next((run / "checkpoints").glob("step_*"))
    f = next(ckpt.glob("rank*.pt"))
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    assert main(["checkpoint", "consolidate", str(ckpt), "--out", str(tmp_path / "c")]) == 2
    assert "corrupt" in capsys.readouterr().err
