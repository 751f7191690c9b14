"""benchmarks/run_all.py: each script's ratio lines (as the scripts print them) become table rows,
and a script whose output yields no ratio makes the run fail naming it, instead of a shorter table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("run_all", Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)

MOE = ("E= 16: ideal   120.0 ms | modalmoe   126.0 ms = 1.05x ideal | with fresh weight grads   130.0 ms = 1.08x ideal"
       " | deepspeed (cf 1.25)   160.0 ms = 1.33x ideal")
BF16 = ("E= 64: dense bf16   276.5 ms | modalmoe bf16   327.0 ms = 1.183x dense bf16 | plain-torch dense bf16   284.7 ms: "
        "modalmoe = 1.148x | dense fp32   725.1 ms (modalmoe bf16 = 0.45x dense fp32)")
PERMUTE = """
T=16384 k=2 H=256 E=64 float32, 1 threads, process CPU time, medians of 40 calls in interleaved rounds (load average 0.2)
                 MiB moved    op ms  op GB/s  copy ms copy GB/s   op/copy (medians; from minima)
  permute fwd         48.8    2.396    21.35    2.034     25.14    0.85 (1.09)
  unpermute bwd       80.8    6.872    12.32    3.892     21.76    0.57 (0.65)
"""
LOADER = """  library / hand-written time: 0.84
  SampleStream, one worker's work in this process: 151 samples/s (rounds: 150, 152); workers to keep up with the step: 9 at MFU 0.10, 17 at MFU 0.20
"""


def test_parsers_read_the_scripts_lines():
    assert run_all.moe_rows(MOE, "s") == [
        ("moe layer fwd+bwd / dense MLP of the same FLOPs", "E=16, s", "modalmoe", "1.05"),
        ("", "E=16, s", "modalmoe, fresh weight grads", "1.08"),
        ("", "E=16, s", "deepspeed MoE, cf 1.25", "1.33"),
    ]
    assert [r[3] for r in run_all.bf16_rows(BF16)] == ["1.183", "1.148"]
    assert run_all.permute_rows(PERMUTE) == [
        ("bytes moved/s over a copy of the same bytes", "E=64", "permute fwd", "0.85 (minima 1.09)"),
        ("bytes moved/s over a copy of the same bytes", "E=64", "unpermute bwd", "0.57 (minima 0.65)"),
    ]
    assert [r[3] for r in run_all.loader_rows(LOADER)] == ["0.84", "151", "9 at MFU 0.10, 17 at MFU 0.20"]


def _fake_run(outputs):
    def run(script, args, show):
        key = "bench_moe.py --fresh-pages" if script == "bench_moe.py" and "--fresh-pages" in args else script
        return outputs[key]
    return run


def test_markdown_table_and_a_script_without_ratios(monkeypatch, capsys):
    outputs = {"bench_moe.py": MOE, "bench_moe.py --fresh-pages": MOE, "bench_moe_bf16.py": BF16,
               "bench_permute.py": PERMUTE, "bench_loader.py": LOADER}
    monkeypatch.setattr(run_all, "_run", _fake_run(outputs))
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--markdown"])
    run_all.main()
    out = capsys.readouterr().out
    assert "| benchmark | setting | contender | ratio |\n|---|---|---|---|" in out
    assert "| bf16 moe layer / bf16 dense MLP | E=64 | over modalmoe's dense MLP | 1.183 |" in out
    assert out.count("\n| ") == 1 + 3 + 3 + 2 + 2 + 3  # header + rows

    outputs["bench_moe_bf16.py"] = "Traceback (most recent call last): ...\n"
    monkeypatch.setattr(run_all, "_run", _fake_run(outputs))
    with pytest.raises(SystemExit, match=r"no ratio parsed from: bench_moe_bf16.py"):
        run_all.main()
