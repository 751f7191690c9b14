"""permute / unpermute bandwidth against a device copy of the same number of bytes.

Bytes counted (the fewest each op must move through device memory; b = bytes per element):
  permute    read  R·H·b   one row of x per permuted row (a token routed k times is read k times)
             write R·H·b   the permuted rows
             index S·i + S·8 + R·8 + S·1   topk_idx read (i = 8 for int64), row_of, src_slot and
                           dropped written; the [E]-sized counts/offsets are left out
  unpermute  read  R·H·b + S·8 + S·4   rows, row_of, the float32 router weights
             write T·H·b   the combined tokens
The copy baseline is ``dst.copy_(src)`` with src and dst of half the op's counted bytes each, so
it moves exactly the op's bytes (read + write); ``vs copy`` = copy time / op time, 1.0 = the op
runs at copy speed. The plan-only and gather-only rows split permute into its two parts. Times
are CUDA-event medians after warm-up; the data is far larger than the L2, so no rotation is
needed. permute is dropless and syncs once to size its output, as in training.

Legend: T tokens, k slots per token, S = T·k, E experts, H hidden, R = S permuted rows.

    python benchmarks/gpu_check/bench_ops.py --device cuda [--tokens 65536 --hidden 4096 --top-k 2 --experts 64]
"""

from __future__ import annotations

import argparse

import torch
from modalmoe import ops
from timing import cuda_kernels_registered, device_from_arg, median_ms, write_figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", help="figures JSON")
    a = ap.parse_args()
    device = device_from_arg(a.device)
    T, H, k, E = a.tokens, a.hidden, a.top_k, a.experts
    S = R = T * k
    dtype = torch.bfloat16
    b = torch.finfo(dtype).bits // 8

    gen = torch.Generator(device="cpu").manual_seed(0)
    x_TH = torch.randn(T, H, generator=gen, dtype=torch.float32).to(device, dtype)
    idx_Tk = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.to(device)
    w_Tk = torch.rand(T, k, generator=gen).to(device)
    i = idx_Tk.element_size()

    x_perm_RH, plan = ops.permute(x_TH, idx_Tk, E)
    y_TH = ops.unpermute(x_perm_RH, plan, w_Tk)
    # correctness once, on the timed inputs (permute is a copy: exact; unpermute sums in float32)
    ref_perm, ref_plan = ops.permute_reference(x_TH, idx_Tk, E)
    permute_exact = bool(torch.equal(x_perm_RH, ref_perm))
    ref_y = ops.unpermute_reference(x_perm_RH, ref_plan, w_Tk).float()
    unpermute_rel_err = float((y_TH.float() - ref_y).norm() / ref_y.norm().clamp_min(1e-30))
    del ref_perm, ref_y, ref_plan

    bytes_ = {
        "permute": 2 * R * H * b + S * i + S * 8 + R * 8 + S,
        "unpermute": R * H * b + S * 8 + S * 4 + T * H * b,
    }
    bytes_["plan only"] = S * i + S * 8 + R * 8 + S
    bytes_["gather only"] = 2 * R * H * b + R * 8

    fns = {
        "permute": lambda: ops.permute(x_TH, idx_Tk, E),
        "plan only": lambda: ops.build_plan(idx_Tk, E),
        "gather only": lambda: ops.gather_rows(x_TH, plan.src_slot, plan.row_of),
        "unpermute": lambda: ops.unpermute(x_perm_RH, plan, w_Tk),
    }
    rows, figures = [], {}
    for name, fn in fns.items():
        ms = median_ms(fn, device, repeats=a.repeats)
        half = max(1, bytes_[name] // 2 // b)
        src, dst = torch.empty(half, dtype=dtype, device=device).normal_(), torch.empty(half, dtype=dtype, device=device)
        copy_ms = median_ms(lambda d=dst, s=src: d.copy_(s), device, repeats=a.repeats)
        del src, dst
        gbps, copy_gbps = bytes_[name] / ms / 1e6, 2 * half * b / copy_ms / 1e6
        rows.append([name, f"{ms:.4g}", f"{bytes_[name] / 1e6:.4g}", f"{gbps:.4g}", f"{copy_gbps:.4g}", f"{copy_ms / ms:.2f}"])
        key = name.replace(" ", "_")
        figures[f"{key}_ms"] = ms
        figures[f"{key}_GBps"] = gbps
        figures[f"{key}_vs_copy"] = copy_ms / ms
        if name in ("permute", "unpermute"):
            figures[f"copy_{key}_bytes_GBps"] = copy_gbps

    figures.update({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "extension": ops.HAS_EXTENSION,
        "cuda_kernels": cuda_kernels_registered(),
        "shape": f"T={T} H={H} k={k} E={E} bf16, idx {idx_Tk.dtype}, weights float32",
        "permute_exact": permute_exact,
        "unpermute_rel_err": unpermute_rel_err,
        "tables": {"permute / unpermute vs a copy of the same bytes": {
            "columns": ["op", "ms", "MB counted", "GB/s", "copy GB/s", "vs copy"], "rows": rows}},
        "notes": ["GB/s = counted bytes (read + write + index, see bench_ops.py) / median time; copy = "
                  "dst.copy_(src) moving the same bytes"],
    })
    write_figures(a.out, figures)
    ok = permute_exact and unpermute_rel_err < 1e-2
    if device.type == "cuda" and not figures["cuda_kernels"]:
        print("FAIL  modalmoe._C has no CUDA kernels: this timed the pure-PyTorch fallback")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
