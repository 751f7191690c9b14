"""Activation checkpointing: peak memory and time of one fwd+bwd per mode, side by side in one run.

The model is the small preset (launch/configs/small.yaml: 8 layers, hidden 512, 8 experts top-2
every second layer, SwiGLU, 196 patches + 64 caption tokens) at ``--batch`` samples, float32 on CPU.
Each mode runs in a fresh subprocess: build, checkpoint the chosen sublayers, one warm-up fwd+bwd
(so the gradients exist before the measured step and are not counted), then with freed heap memory
handed back (``malloc_trim``) the resident size is read, the peak (VmHWM) is reset through
``/proc/self/clear_refs`` and one fwd+bwd is measured: the step's memory is the new peak minus the
resident size before it, i.e. the activations kept for backward plus the step's transients. The step
time is the median over ``--steps`` further steps. glibc's defaults are kept (not the trainer's
``keep_freed_memory``), so freed blocks do not hide the peak.

    python benchmarks/bench_activation_checkpointing.py [--batch 4] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODES = ["none", "moe", "attention", "full"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _batch(cfg, batch: int):
    from modalmoe.runtime.data.batch import Batch

    g = torch.Generator().manual_seed(0)
    P, C, L = cfg.num_patches, cfg.patch_dim, cfg.max_text_len
    lengths = torch.randint(L // 2, L + 1, (batch,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    text = torch.randint(4, cfg.vocab_size, (batch, L), generator=g).masked_fill(~mask, 0)
    modality = torch.cat([torch.zeros(batch, P, dtype=torch.long), torch.ones(batch, L, dtype=torch.long)], 1)
    return Batch(torch.randn(batch, P, C, generator=g), text, mask, modality,
                 torch.cat([torch.ones(batch, P, dtype=torch.bool), mask], 1), [""] * batch)


def child(args) -> None:
    from modalmoe.models.activation_checkpoint import apply_activation_checkpointing
    from modalmoe.models.transformer import build_model
    from modalmoe.train.job_config import load_job_config

    torch.set_num_threads(args.threads)
    cfg = load_job_config(HERE.parent / "launch" / "configs" / "small.yaml", []).model
    model = build_model(cfg, seed=0)
    apply_activation_checkpointing(model, args.mode)
    model.train()
    batch = _batch(cfg, args.batch)

    def step() -> float:
        t0 = time.perf_counter()
        model(batch).loss.backward()
        return time.perf_counter() - t0

    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    first = step()
    peak = _status_kib("VmHWM")
    times = [first] + [step() for _ in range(args.steps)]
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"mode": args.mode, "step_mib": (peak - before) / 1024, "before_mib": before / 1024,
                      "peak_mib": peak / 1024, "time_s": statistics.median(times), "params": params,
                      "tokens": args.batch * (cfg.num_patches + cfg.max_text_len)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the measured one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child's
    args = ap.parse_args()
    if args.mode:
        return child(args)
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--batch", str(args.batch),
                              "--steps", str(args.steps), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"small preset, {base['params'] / 1e6:.0f}M parameters, batch {args.batch} ({base['tokens']} tokens), "
          f"float32, {args.threads} threads; model + grads resident before the step: {base['before_mib']:.0f} MiB")
    print(f"{'mode':<10} {'step peak MiB':>14} {'x none':>7} {'step s':>8} {'x none':>7}")
    for r in rows:
        print(f"{r['mode']:<10} {r['step_mib']:>14.0f} {r['step_mib'] / base['step_mib']:>7.2f} "
              f"{r['time_s']:>8.2f} {r['time_s'] / base['time_s']:>7.2f}")


if __name__ == "__main__":
    main()
