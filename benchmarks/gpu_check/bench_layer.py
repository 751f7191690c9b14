"""bf16 MoE layer fwd+bwd against dense bf16 MLPs of the same FLOPs, with achieved TFLOP/s.

Every candidate runs under bf16 autocast over float32 weights, as the trainer runs it:
  moe layer     MoELayer (topk router, dropless, gelu): route → permute → grouped_mm ×2 → combine
  experts only  GroupedExperts on already-permuted rows, uniform counts (the grouped GEMMs alone)
  dense T×kF    one MLP H → k·F → H over the T tokens (a dense model of the same compute)
  dense R×F     one MLP H → F → H over the R = T·k rows (the experts' shape with no routing)
FLOPs counted: expert GEMMs 12·R·H·F for fwd+bwd (2·m·n·k per GEMM, two GEMMs, backward twice
the forward), the same for the three baselines, plus the router's 6·T·H·E for the layer. The
ceiling is a measured 8192³ bf16 matmul. Times are CUDA-event medians after warm-up; gradients
are set to None before each call.

Legend: T tokens, H hidden, F expert FFN width, E experts, k slots per token, R = T·k rows.

    python benchmarks/gpu_check/bench_layer.py --device cuda [--tokens 16384 --hidden 4096 --ffn 2048 --experts 64 --top-k 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from modalmoe import ops
from modalmoe.runtime.moe import MoEConfig, MoELayer
from modalmoe.runtime.moe.experts import GroupedExperts
from timing import cuda_kernels_registered, device_from_arg, median_ms, write_figures
from torch import nn


def _mlp(H: int, F: int) -> nn.Module:
    return nn.Sequential(nn.Linear(H, F, bias=False), nn.GELU(approximate="tanh"), nn.Linear(F, H, bias=False))


def _fwd_bwd(module: nn.Module, forward: Callable[[], torch.Tensor | tuple], x: torch.Tensor, device) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward()
        if isinstance(out, tuple):  # MoELayer: (y, aux)
            y, aux = out
            torch.autograd.backward([y, aux.loss], [torch.ones_like(y), torch.ones_like(aux.loss)])
        else:
            out.backward(torch.ones_like(out))

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=2048, help="expert FFN width F")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peak-size", type=int, default=8192, help="n of the n³ bf16 matmul that sets the ceiling")
    ap.add_argument("--out", help="figures JSON")
    a = ap.parse_args()
    device = device_from_arg(a.device)
    T, H, F, E, k = a.tokens, a.hidden, a.ffn, a.experts, a.top_k
    R = T * k
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer does (router math is float32)

    n = a.peak_size
    am, bm = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    peak_tflops = 2 * n**3 / median_ms(lambda a_=am, b_=bm: a_ @ b_, device, repeats=a.repeats) / 1e9
    del am, bm

    x_TH = torch.randn(T, H, device=device, dtype=torch.bfloat16, requires_grad=True)
    modality_T = torch.randint(0, 2, (T,), device=device)
    rows_RH = torch.randn(R, H, device=device, dtype=torch.bfloat16, requires_grad=True)
    counts_E = [R // E + (1 if e < R % E else 0) for e in range(E)]

    with device:  # parameters made and initialised on the device (a CPU init of 2·E·H·F floats is slow)
        layer = MoELayer(MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=k, activation="gelu"))
        experts = GroupedExperts(E, H, F, "gelu", 0.02)
        dense_tokens, dense_rows = _mlp(H, k * F), _mlp(H, F)
    layer.to(device)  # buffers made without a device, if any
    expert_flops = 12 * R * H * F
    candidates = {
        "moe layer": (layer, lambda: layer(x_TH, modality_T), x_TH, expert_flops + 6 * T * H * E),
        "experts only": (experts, lambda: experts(rows_RH, counts_E), rows_RH, expert_flops),
        "dense T x kF": (dense_tokens, lambda: dense_tokens(x_TH), x_TH, expert_flops),
        "dense R x F": (dense_rows, lambda: dense_rows(rows_RH), rows_RH, expert_flops),
    }
    ms, rows, figures = {}, [], {}
    for name, (module, forward, inp, flops) in candidates.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms[name] = median_ms(_fwd_bwd(module, forward, inp, device), device, warmup=2, repeats=a.repeats)
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        tflops = flops / ms[name] / 1e9
        key = name.replace(" ", "_")
        figures[f"{key}_ms"] = ms[name]
        figures[f"{key}_tflops"] = tflops
        rows.append([name, f"{ms[name]:.4g}", f"{flops / 1e12:.4g}", f"{tflops:.4g}", f"{tflops / peak_tflops:.2f}",
                     f"{peak_gib:.1f}"])
    dense = ms["dense T x kF"]
    for row, name in zip(rows, candidates):
        row.append(f"{ms[name] / dense:.2f}")
    figures.update({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "extension": ops.HAS_EXTENSION,
        "cuda_kernels": cuda_kernels_registered(),
        "shape": f"T={T} H={H} F={F} E={E} k={k}, bf16 autocast, float32 weights",
        "matmul_peak_tflops": peak_tflops,
        "moe_vs_dense": ms["moe layer"] / dense,
        "tables": {"fwd+bwd, bf16": {
            "columns": ["candidate", "ms", "TFLOP counted", "TFLOP/s", "of matmul peak", "peak GiB", "time / dense T x kF"],
            "rows": rows}},
        "notes": [f"matmul peak: {n}³ bf16 matmul, {peak_tflops:.4g} TFLOP/s measured here",
                  "FLOPs: 12·R·H·F for the expert GEMMs (+ 6·T·H·E router for the layer); see bench_layer.py"],
    })
    write_figures(a.out, figures)
    if device.type == "cuda" and not figures["cuda_kernels"]:
        print("FAIL  modalmoe._C has no CUDA kernels: this timed the pure-PyTorch fallback")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
