"""Run the CPU benchmarks, each in a fresh process, and print every ratio they report in one table.

Each script keeps its own side-by-side protocol (interleaved rounds, medians); this only runs them
and collects their ratio lines. A fresh process per script matters: the glibc setting of
``runtime/cpu_memory.py`` is process-wide, so the "glibc defaults" rows run where it was never set.
``--quick`` shrinks tokens, repeats and samples (the ratios move: the targets are stated at the full
sizes); ``--cpu-time`` runs the fp32 layer and the permute benchmarks on one thread with this
process's CPU time as the clock (on a loaded shared host the wall-clock ratios are noise); ``--ep``
adds the EP step benchmark (minutes: torchrun processes); ``--show`` echoes the scripts' own output.
The host is shared: rerun before trusting a single figure.

    python benchmarks/run_all.py [--quick] [--cpu-time] [--ep] [--show] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(script: str, args: list[str], show: bool) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, cwd=HERE)
    out = proc.stdout
    if show:
        print(out, end="", flush=True)
    if proc.returncode != 0:
        print(f"{script} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
    print(f"  ran {script} {' '.join(args)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def moe_rows(out: str, setting: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for line in out.splitlines():
        m = re.match(r"E=\s*(\d+): .*?modalmoe .*?= ([\d.]+)x ideal", line)
        if not m:
            continue
        E = m.group(1)
        rows.append(("moe layer fwd+bwd / dense MLP of the same FLOPs", f"E={E}, {setting}", "modalmoe", m.group(2)))
        if f := re.search(r"with fresh weight grads .*?= ([\d.]+)x ideal", line):
            rows.append(("", f"E={E}, {setting}", "modalmoe, fresh weight grads", f.group(1)))
        if d := re.search(r"deepspeed \(cf 1.25\) .*?= ([\d.]+)x ideal", line):
            rows.append(("", f"E={E}, {setting}", "deepspeed MoE, cf 1.25", d.group(1)))
    return rows


def bf16_rows(out: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for line in out.splitlines():
        if m := re.match(r"E=\s*(\d+): .*?= ([\d.]+)x dense bf16 .*?modalmoe = ([\d.]+)x", line):
            rows.append(("bf16 moe layer / bf16 dense MLP", f"E={m.group(1)}", "over modalmoe's dense MLP", m.group(2)))
            rows.append(("", f"E={m.group(1)}", "over a plain-PyTorch dense MLP", m.group(3)))
    return rows


def permute_rows(out: str) -> list[tuple[str, str, str, str]]:
    rows, E = [], "?"
    for line in out.splitlines():
        if h := re.search(r"\bE=(\d+) float32", line):
            E = h.group(1)
        if m := re.match(r"\s+((?:un)?permute (?:fwd|bwd))\s+(?:[\d.]+\s+){5}([\d.]+) \(([\d.]+)\)", line):
            rows.append(("bytes moved/s over a copy of the same bytes", f"E={E}", m.group(1),
                         f"{m.group(2)} (minima {m.group(3)})"))
    return rows


def loader_rows(out: str) -> list[tuple[str, str, str, str]]:
    rows = []
    if m := re.search(r"library / hand-written time: ([\d.]+)", out):
        rows.append(("loader decode time, library / hand-written", "512x384 JPEG -> 224 px", "per sample", m.group(1)))
    if m := re.search(r"one worker's work in this process: (\d+) samples/s.*?keep up with the step: (.*)", out):
        rows.append(("loader samples/s per worker", "512x384 JPEG -> 224 px", "SampleStream", m.group(1)))
        rows.append(("", "small preset's step (assumed MFU)", "workers needed", m.group(2)))
    return rows


def ep_rows(out: str) -> list[tuple[str, str, str, str]]:
    return [("EP=2 step / EP=1 step", f"{m.group(1)} samples/rank", "fit() steps", m.group(2))
            for m in re.finditer(r"^(\d+) samples/rank: EP=2/EP=1 (\S+(?: \S+)?) \(target", out, re.M)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (minutes, rough ratios)")
    ap.add_argument("--cpu-time", action="store_true", help="1 thread, CPU time as the clock (fp32 layer, permute)")
    ap.add_argument("--ep", action="store_true", help="also the EP step benchmark (slow)")
    ap.add_argument("--show", action="store_true", help="echo each script's output")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown (the README's is pasted from it)")
    a = ap.parse_args()
    q = a.quick
    size = ["--tokens", "4096", "--repeats", "3"] if q else ["--repeats", "9"]
    clock = ["--threads", "1", "--cpu-time"] if a.cpu_time else []
    tag = ", 1 thread, CPU time" if a.cpu_time else ""
    rows: list[tuple[str, str, str, str]] = []
    empty: list[str] = []

    def add(script: str, parsed: list) -> None:
        rows.extend(parsed)
        if not parsed:  # a failed script or a changed output line: said, never a silently shorter table
            empty.append(script)

    add("bench_moe.py", moe_rows(_run("bench_moe.py", size + clock + ["--no-deepspeed"] * q, a.show),
                                 "trainer's allocator setting" + tag))
    add("bench_moe.py --fresh-pages", moe_rows(_run("bench_moe.py", size + clock + ["--fresh-pages", "--fresh-grads",
                                                                                   "--no-deepspeed"], a.show),
                                               "glibc defaults (a user's own loop)" + tag))
    add("bench_moe_bf16.py", bf16_rows(_run("bench_moe_bf16.py", size, a.show)))
    add("bench_permute.py", permute_rows(_run("bench_permute.py", clock + ["--no-reference", "--repeats", "20" if q else "100"],
                                              a.show)))
    add("bench_loader.py", loader_rows(_run("bench_loader.py", ["--samples", "128" if q else "512", "--rounds",
                                                                "2" if q else "5"], a.show)))
    if a.ep:
        add("bench_ep_step.py", ep_rows(_run("bench_ep_step.py", ["--repeats", "1" if q else "3"], a.show)))
    print(f"\nhost shared with other jobs: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
          f"{'; --quick sizes' if q else ''}")
    header = ("benchmark", "setting", "contender", "ratio")
    if a.markdown:
        print("| " + " | ".join(header) + " |\n|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
        print("-+-".join("-" * w for w in widths))
        for r in rows:
            print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    if empty:
        sys.exit(f"no ratio parsed from: {', '.join(empty)} (the script failed or its output changed; see above)")


if __name__ == "__main__":
    main()
