"""benchmarks/gpu_check.sh --cpu: the GPU check's dry run goes through every stage and writes its summary.

The GPU lease is short, so the script must work the first time it runs there; this runs the whole
thing on CPU at tiny sizes (about a minute on 2 cores) and checks the summary it leaves: every
stage listed with a status, the CPU-capable stages passed, the sanitizer stages skipped, and the
measured figures are finite numbers. A one-file wheel exercises the --wheels install path.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["env", "deps", "build", "tests", "edge_cases", "bench_ops", "bench_layer", "smoke_train",
          "memcheck", "racecheck", "synccheck"]
SANITIZERS = {"memcheck", "racecheck", "synccheck"}


def _extension_builds() -> bool:
    code = "import torch, modalmoe._C"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _tiny_wheel(folder: Path) -> None:
    """A pure-Python wheel holding one module, gpu_check_probe, for the --no-index install."""
    folder.mkdir()
    info = "gpu_check_probe-0.1.dist-info"
    with zipfile.ZipFile(folder / "gpu_check_probe-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("gpu_check_probe.py", "VALUE = 1\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu_check_probe\nVersion: 0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.skipif(not _extension_builds() and os.environ.get("MODALMOE_REQUIRE_EXTENSION") != "1",
                    reason="modalmoe._C not built: the dry run would spend minutes building it")
def test_cpu_dry_run_writes_a_full_summary(tmp_path):
    out = tmp_path / "out"
    _tiny_wheel(tmp_path / "wheels")
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--out", str(out), "--wheels", str(tmp_path / "wheels")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    md = (out / "gpu_check_summary.md").read_text()
    summary = json.loads((out / "gpu_check_summary.json").read_text())
    logs = (out / "gpu_check_logs.txt").read_text()
    assert summary["mode"] == "cpu" and summary["passed"] is True
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["name"] for s in summary["stages"]] == STAGES
    for name, s in stages.items():
        want = "skip" if name in SANITIZERS else "pass"
        assert s["status"] == want, f"{name}: {s['status']} ({s['note']})"
        assert f"| {name} | {s['status']} |" in md
        assert f" {name}: {s['status']}" in logs
    assert summary["total_s"] < 240

    figs = {name: s["figures"] for name, s in stages.items()}
    assert figs["deps"]["installed"] == 1 and figs["deps"]["missing"] == []
    assert figs["build"]["extension"] is True
    assert figs["tests"]["passed"] >= 1 and figs["tests"]["failed"] == 0
    assert figs["edge_cases"]["cases_failed"] == 0 and figs["edge_cases"]["cases_passed"] >= 10
    for key in ("permute_ms", "permute_GBps", "permute_vs_copy", "unpermute_ms", "unpermute_GBps",
                "unpermute_vs_copy", "copy_permute_bytes_GBps", "unpermute_rel_err"):
        assert _number(figs["bench_ops"][key]), (key, figs["bench_ops"][key])
    assert figs["bench_ops"]["permute_exact"] is True
    for key in ("moe_layer_ms", "moe_layer_tflops", "experts_only_tflops", "dense_T_x_kF_ms",
                "dense_T_x_kF_tflops", "moe_vs_dense", "matmul_peak_tflops"):
        assert _number(figs["bench_layer"][key]) and figs["bench_layer"][key] > 0, key
    smoke = figs["smoke_train"]
    assert smoke["steps"] == 3 and _number(smoke["tokens_per_s"]) and _number(smoke["last_loss"])
    for key in ("tflops", "mfu"):
        assert _number(smoke[key]) or smoke[key] == "n/a"
