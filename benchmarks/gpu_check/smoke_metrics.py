"""Figures of a finished training run from its run folder's metrics.jsonl (and summary.json).

Reads the last ``train`` record (the steadiest window: the first one holds the warm-up steps) for
``tokens_per_s`` and, when the trainer logs them, ``tflops`` and ``mfu`` ("n/a" when absent), the
first and last logged loss, and the final ``eval`` record's caption loss.

    python benchmarks/gpu_check/smoke_metrics.py RUN_DIR [--out figures.json] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from timing import write_figures


def _pick(record: dict, name: str):
    """``name`` itself, else the first key that ends with it (e.g. ``perf/tflops``); "n/a" if none."""
    if name in record:
        return record[name]
    for key, value in record.items():
        if key.lower().endswith(name):
            return value
    return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=0, help="steps asked for: fail when fewer were logged")
    ap.add_argument("--out", help="figures JSON")
    a = ap.parse_args()
    path = Path(a.run_dir) / "metrics.jsonl"
    if not path.exists():
        write_figures(a.out, {"notes": [f"no {path}"]})
        return 1
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    if not train:
        write_figures(a.out, {"notes": [f"{path} has no train records"]})
        return 1
    last = train[-1]
    figures = {
        "steps": last["step"],
        "tokens_per_s": last.get("tokens_per_s", "n/a"),
        "tflops": _pick(last, "tflops"),
        "mfu": _pick(last, "mfu"),
        "first_loss": train[0].get("loss", "n/a"),
        "last_loss": last.get("loss", "n/a"),
        "eval_caption_loss": evals[-1].get("caption_loss", "n/a") if evals else "n/a",
        "logged_windows": len(train),
    }
    summary = Path(a.run_dir) / "summary.json"
    if summary.exists():
        params = json.loads(summary.read_text()).get("parameters", {})
        figures["params_M"] = params.get("total", 0) / 1e6
        figures["active_params_M"] = params.get("active_per_token", 0) / 1e6
    figures["notes"] = [f"figures from the last train window (steps up to {last['step']}) of {path}"]
    write_figures(a.out, figures)
    finite = isinstance(figures["last_loss"], (int, float)) and math.isfinite(figures["last_loss"])
    return 0 if finite and last["step"] >= a.steps else 1


if __name__ == "__main__":
    raise SystemExit(main())
