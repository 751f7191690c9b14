"""One summary of a gpu_check run: every stage with its status, time and figures, as Markdown and JSON.

Reads what ``benchmarks/gpu_check.sh`` left in its work folder: ``stages.tsv`` (one line per stage:
index, name, status, seconds, exit status, timeout, note; status is pass, fail, timeout, skip
or out_of_time), ``figures/<stage>.json`` (what each
helper measured) and ``logs/<stage>.log``. Writes the Markdown and JSON summaries and one text
file holding every stage's log (the device tool brings back only a few files), then prints the
Markdown.

    python benchmarks/gpu_check/summary.py --work WORK --md OUT/gpu_check_summary.md --json ... --logs ...
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

LOG_CAP = 1_000_000  # characters kept of each stage's log in the combined file (its end; 16 MiB come back)
TAIL_LINES = 25  # lines of a failed stage's log quoted in the Markdown
KEY_FIGURES = {  # what the stage table shows; every figure is in the JSON and the sections below
    "env": ["gpu", "torch", "cuda", "nvcc", "python"],
    "deps": ["installed", "missing"],
    "build": ["build_s", "extension", "cuda_kernels", "sass"],
    "tests": ["passed", "failed", "skipped", "errors"],
    "edge_cases": ["cases_passed", "cases_failed"],
    "bench_ops": ["permute_GBps", "permute_vs_copy", "unpermute_GBps", "unpermute_vs_copy", "copy_permute_bytes_GBps"],
    "bench_layer": ["moe_layer_ms", "moe_layer_tflops", "dense_T_x_kF_ms", "dense_T_x_kF_tflops", "moe_vs_dense",
                    "matmul_peak_tflops"],
    "smoke_train": ["steps", "tokens_per_s", "tflops", "mfu", "last_loss"],
}
SANITIZER_KEYS = ["errors", "hazards", "cases_passed", "cases_failed", "exit_status"]


def fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)


def read_stages(work: Path) -> list[dict]:
    stages = []
    path = work / "stages.tsv"
    for line in (path.read_text().splitlines() if path.exists() else []):
        idx, name, status, seconds, rc, timeout_s, note = (line.split("\t") + [""] * 7)[:7]
        fig_path = work / "figures" / f"{name}.json"
        figures: dict = {}
        if fig_path.exists():
            try:
                figures = json.loads(fig_path.read_text())
            except json.JSONDecodeError as e:
                figures = {"notes": [f"unreadable figures file: {e}"]}
        stages.append({
            "index": int(idx), "name": name, "status": status, "seconds": float(seconds or 0),
            "rc": int(rc) if rc.lstrip("-").isdigit() else None,
            "timeout_s": int(timeout_s) if timeout_s.isdigit() else None, "note": note,
            "log": f"logs/{idx.zfill(2)}_{name}.log", "figures": figures,
        })
    return stages


def key_figures(stage: dict) -> str:
    figs = stage["figures"]
    names = KEY_FIGURES.get(stage["name"], SANITIZER_KEYS)
    shown = [f"{n}={fmt(figs[n])}" for n in names if n in figs]
    return "; ".join(shown)


def markdown(meta: dict, stages: list[dict], work: Path) -> str:
    out = [f"# modalmoe GPU check ({meta['mode']})", ""]
    out.append(f"- when: {meta['finished']}; host {meta['host']}; total {meta['total_s']:.0f} s of a "
               f"{meta['budget_s']} s budget")
    out.append(f"- verdict: **{meta['verdict']}** ({meta['counts']})")
    out.append(f"- logs: {meta['logs_file']} (every stage's log, in order)")
    out += ["", "| # | stage | status | seconds | key figures | note |", "|---|---|---|---|---|---|"]
    for s in stages:
        out.append(f"| {s['index']} | {s['name']} | {s['status']} | {s['seconds']:.1f} | {key_figures(s)} | {s['note']} |")
    for s in stages:
        figs = s["figures"]
        tables, notes = figs.get("tables", {}), figs.get("notes", [])
        scalars = {k: v for k, v in figs.items() if k not in ("tables", "notes")}
        if not (tables or notes or len(scalars) > len(KEY_FIGURES.get(s["name"], []))):
            continue
        out += ["", f"## {s['index']}. {s['name']} ({s['status']})", ""]
        if scalars:
            out.append("; ".join(f"{k}={fmt(v)}" for k, v in scalars.items()))
        for title, table in tables.items():
            out += ["", f"{title}:", "", "| " + " | ".join(table["columns"]) + " |",
                    "|" + "---|" * len(table["columns"])]
            out += ["| " + " | ".join(map(fmt, row)) + " |" for row in table["rows"]]
        out += [f"- {n}" for n in notes]
    failed = [s for s in stages if s["status"] in ("fail", "timeout")]
    for s in failed:
        log = work / s["log"]
        tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log.exists() else ["(no log)"]
        out += ["", f"## log tail: {s['name']} ({s['status']}, exit {s['rc']})", "", "```", *tail, "```"]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--logs", required=True, help="combined log file to write")
    ap.add_argument("--mode", default="gpu")
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--started", type=float, default=time.time(), help="epoch seconds the run started")
    a = ap.parse_args()
    work = Path(a.work)
    stages = read_stages(work)
    counts: dict[str, int] = {}
    for s in stages:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    meta = {
        "mode": a.mode,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "total_s": time.time() - a.started,
        "budget_s": a.budget,
        "passed": bool(stages) and all(s["status"] in ("pass", "skip") for s in stages),
        "verdict": ("FAIL" if any(s["status"] in ("fail", "timeout") for s in stages) else
                    "INCOMPLETE" if not stages or any(s["status"] == "out_of_time" for s in stages) else "PASS"),
        "counts": ", ".join(f"{n} {k}" for k, n in counts.items()),
        "logs_file": Path(a.logs).name,
    }
    with open(a.logs, "w") as f:
        for s in stages:
            log = work / s["log"]
            text = log.read_text(errors="replace") if log.exists() else "(no log)\n"
            if len(text) > LOG_CAP:
                text = f"[... first {len(text) - LOG_CAP} characters cut ...]\n" + text[-LOG_CAP:]
            f.write(f"\n===== {s['index']:02d} {s['name']}: {s['status']} in {s['seconds']:.1f} s "
                    f"(exit {s['rc']}, timeout {s['timeout_s']} s) {s['note']} =====\n{text}")
    md = markdown(meta, stages, work)
    Path(a.md).write_text(md)
    Path(a.json).write_text(json.dumps({**meta, "stages": stages}, indent=1, default=str))
    print(md)
    return 0 if meta["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
