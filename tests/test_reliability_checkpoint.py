"""Checkpoints survive a crash mid-write, refuse corrupt or pickled content, and a ZeRO-2 EP=2 run
saved with weights_only-safe state resumes its loss curve exactly."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from modalmoe.runtime.checkpoint import CheckpointError, CheckpointManager
from parity_utils import data_overrides, train_run

REPO = Path(__file__).resolve().parents[1]

CRASH = textwrap.dedent(
    """
    import os, signal, sys, torch
    from modalmoe.runtime.checkpoint import CheckpointManager

    directory, where = sys.argv[1], sys.argv[2]
    m = CheckpointManager(directory, keep=5)
    m.save(1, {"rank00000": {"w": torch.ones(3)}, "rank00001": {"w": torch.zeros(3)}})
    if where == "second_file":
        real, calls = torch.save, []
        def dying_save(obj, f, *a, **k):
            calls.append(f)
            if len(calls) == 2:  # the first file of step 2 is on disk, the second never will be
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **k)
        torch.save = dying_save
    else:  # the step_2 folder is complete and renamed into place, the pointer not yet updated
        CheckpointManager._write_latest = lambda self, name: os.kill(os.getpid(), signal.SIGKILL)
    m.save(2, {"rank00000": {"w": torch.full((3,), 2.0)}, "rank00001": {"w": torch.full((3,), 3.0)}})
    """
)


@pytest.mark.parametrize("where", ["second_file", "before_pointer"])
def test_sigkill_inside_save_leaves_the_previous_checkpoint_loadable(tmp_path, where):
    ckpts = tmp_path / "checkpoints"
    out = subprocess.run([sys.executable, "-c", CRASH, str(ckpts), where], capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == -9, out.stderr
    assert (ckpts / "latest").read_text().strip() == "step_00000001"
    if where == "second_file":
        assert (ckpts / ".step_00000002.tmp").is_dir() and not (ckpts / "step_00000002").exists()
    latest = CheckpointManager(ckpts).latest()
    states, manifest = CheckpointManager.load(latest)
    assert manifest["step"] == 1
    assert torch.equal(states["rank00000"]["w"], torch.ones(3)) and torch.equal(states["rank00001"]["w"], torch.zeros(3))
    # the next save goes through, over the leftover temporary folder
    CheckpointManager(ckpts).save(2, {"rank00000": {"w": torch.full((3,), 2.0)}})
    assert CheckpointManager(ckpts).latest().name == "step_00000002"


def test_a_flipped_byte_is_refused_naming_the_file_and_the_fix(tmp_path):
    m = CheckpointManager(tmp_path)
    path = m.save(3, {"rank00000": {"w": torch.arange(1000.0)}})
    f = path / "rank00000.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        CheckpointManager.verify(path)
    assert str(f) in str(e.value) and "earlier step_*" in str(e.value)
    with pytest.raises(CheckpointError):
        CheckpointManager.load(path)


class _Payload:
    """Unpickling this would run a command: the test checks it never runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


def test_a_pickled_object_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    m = CheckpointManager(tmp_path / "ckpt")
    path = m.save(1, {"rank00000": {"w": torch.ones(2), "evil": _Payload(str(marker))}})
    CheckpointManager.verify(path)  # sizes and checksums are right: only the content is bad
    with pytest.raises(CheckpointError) as e:
        CheckpointManager.load(path)
    assert "rank00000.pt" in str(e.value) and "never unpickled" in str(e.value)
    assert not marker.exists()


def test_every_torch_load_in_the_repo_is_weights_only():
    calls = []
    for f in REPO.rglob("*.py"):
        if any(part in {".git", "build", "tests", ".venv"} for part in f.relative_to(REPO).parts):
            continue
        for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", f.read_text()):
            calls.append((f, m.group(0)))
    assert calls, "expected at least the checkpoint loader"
    unsafe = [f"{f}: {c}" for f, c in calls if "weights_only=True" not in c]
    assert not unsafe, unsafe


def test_zero2_ep2_resume_with_weights_only_continues_the_loss_curve_exactly(demo, tmp_path):
    common = data_overrides(demo) + [
        "parallel.ep=2", "parallel.zero_stage=2", "train.save_every=10", "train.keep_checkpoints=3",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    curve = run_distributed(train_run, 2, common, str(full), timeout=300)[0]
    ckpt = full / "checkpoints" / "step_00000010"
    for f in ckpt.glob("rank*.pt"):
        state = torch.load(f, weights_only=True)
        opt = state["engine"]["optimizer"]
        assert "base_optimizer_state" in opt and "single_partition_of_fp32_groups" in opt  # ZeRO's own state kept
        assert "loss_scaler" not in opt
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, part / "checkpoints" / ckpt.name)
    (part / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    resumed = run_distributed(train_run, 2, common, str(part), timeout=300)[0]
    before = {step: loss for step, loss, _ in curve}
    after = {step: loss for step, loss, _ in resumed}
    assert sorted(after) == list(range(11, 21))
    for step in range(11, 21):
        assert after[step] == before[step], f"step {step}: resumed loss {after[step]!r} vs uninterrupted {before[step]!r}"
