"""Small edge cases of permute / unpermute / grouped_mm, checked against the pure-PyTorch references.

Sized for compute-sanitizer (memcheck, racecheck, synccheck): a few hundred tokens at most, so a
run under a tool is bound by its start-up, not by the kernels. Each case runs forward and backward
on ``--device`` and compares values, plans and gradients with the ``*_reference`` functions run on
the same inputs; a case that raises or mismatches is listed, and the exit status is 1.

Legend: T tokens, k slots per token, E experts, H hidden, R permuted rows, K/N mm features.

    python benchmarks/gpu_check/edge_cases.py --device cuda [--out figures.json]
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable

import torch
from modalmoe import ops
from timing import cuda_kernels_registered, device_from_arg, write_figures

PLAN_FIELDS = ("counts", "padded_counts", "offsets", "row_of", "src_slot", "dropped")


def _check_permute_roundtrip(
    x_TH: torch.Tensor, idx_Tk: torch.Tensor, E: int, *, pad: int = 1, capacity: int | None = None,
    weights: bool = True,
) -> None:
    """permute → scale → unpermute, forward and backward, against the reference path."""
    device = x_TH.device
    w_Tk = torch.rand(idx_Tk.shape, device=device, dtype=torch.float32) if weights else None
    outs = []
    for permute, unpermute in ((ops.permute, ops.unpermute), (ops.permute_reference, ops.unpermute_reference)):
        x = x_TH.detach().clone().requires_grad_(True)
        w = w_Tk.detach().clone().requires_grad_(True) if w_Tk is not None else None
        x_perm_RH, plan = permute(x, idx_Tk, E, pad_multiple=pad, capacity=capacity)
        y_TH = unpermute(x_perm_RH * 1.5, plan, w)
        g_TH = torch.linspace(-1, 1, y_TH.numel(), device=device).view_as(y_TH).to(y_TH.dtype)
        y_TH.backward(g_TH)
        outs.append((x_perm_RH.detach(), plan, y_TH.detach(), x.grad, None if w is None else w.grad))
    (xp, plan, y, gx, gw), (xp_ref, plan_ref, y_ref, gx_ref, gw_ref) = outs
    for name in PLAN_FIELDS:
        got, want = getattr(plan, name).cpu(), getattr(plan_ref, name).cpu()
        assert got.dtype == want.dtype and torch.equal(got, want), f"plan.{name} differs: {got} vs {want}"
    assert torch.equal(xp, xp_ref), "permuted rows differ from the reference (permute is a copy: must be exact)"
    torch.testing.assert_close(y, y_ref)
    if gx is not None or gx_ref is not None:
        torch.testing.assert_close(gx, gx_ref)
    if gw_ref is not None:
        torch.testing.assert_close(gw, gw_ref)
    assert bool(torch.isfinite(y.float()).all()), "non-finite output"


def _check_grouped_mm(counts: list[int], K: int, N: int, dtype: torch.dtype, device: torch.device) -> None:
    gen = torch.Generator(device="cpu").manual_seed(sum(counts) + K)
    R, E = sum(counts), len(counts)
    x_RK = torch.randn(R, K, generator=gen).to(device, dtype)
    w_EKN = torch.randn(E, K, N, generator=gen).to(device, dtype)
    g_RN = torch.randn(R, N, generator=gen).to(device, dtype)
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    results = []
    for fn in (lambda x, w: ops.grouped_mm(x, w, counts), lambda x, w: ops.grouped_mm_reference(x, w, offsets)):
        x, w = x_RK.clone().requires_grad_(True), w_EKN.clone().requires_grad_(True)
        out = fn(x, w)
        out.backward(g_RN)
        results.append((out.detach(), x.grad, w.grad))
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * max(1.0, K**0.5))


def cases(device: torch.device) -> dict[str, Callable[[], None]]:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    def topk(T: int, k: int, E: int, dtype=torch.int64, unrouted: float = 0.0) -> torch.Tensor:
        idx_Tk = torch.rand(T, E, generator=gen).topk(k, dim=1).indices
        idx_Tk = torch.where(torch.rand(T, k, generator=gen) < unrouted, -1, idx_Tk)
        return idx_Tk.to(device, dtype)

    bf16 = torch.bfloat16
    return {
        "empty input T=0 (bf16)": lambda: _check_permute_roundtrip(
            randn(0, 64, dtype=bf16), torch.empty(0, 2, dtype=torch.int64, device=device), 4),
        "empty input, pad 8": lambda: _check_permute_roundtrip(
            randn(0, 16), torch.empty(0, 2, dtype=torch.int64, device=device), 4, pad=8),
        "one token k=2": lambda: _check_permute_roundtrip(randn(1, 64), topk(1, 2, 4), 4),
        "one token bf16 H=4096": lambda: _check_permute_roundtrip(randn(1, 4096, dtype=bf16), topk(1, 2, 8), 8),
        "all tokens to one expert k=1": lambda: _check_permute_roundtrip(
            randn(257, 64), torch.full((257, 1), 5, device=device), 8),
        "all slots to one expert k=2 (duplicates)": lambda: _check_permute_roundtrip(
            randn(129, 32, dtype=bf16), torch.full((129, 2), 3, device=device), 8, pad=4),
        "all slots unrouted (-1)": lambda: _check_permute_roundtrip(
            randn(17, 32), torch.full((17, 2), -1, device=device), 4, pad=4),
        "capacity drops (cap 16, pad 8, 10% unrouted)": lambda: _check_permute_roundtrip(
            randn(300, 48), topk(300, 2, 4, unrouted=0.1), 4, pad=8, capacity=16),
        "capacity 0 drops everything": lambda: _check_permute_roundtrip(randn(33, 16), topk(33, 2, 4), 4, capacity=0),
        "bf16 rows, fp32 weights, H=256 (vector path)": lambda: _check_permute_roundtrip(
            randn(512, 256, dtype=bf16), topk(512, 2, 16), 16),
        "bf16 H=1000 (not a vector multiple)": lambda: _check_permute_roundtrip(
            randn(96, 1000, dtype=bf16), topk(96, 2, 8), 8),
        "odd H=3, int32 idx, E=1": lambda: _check_permute_roundtrip(randn(40, 3), topk(40, 1, 1, torch.int32), 1),
        "int32 idx, k=4, E=64, pad 16": lambda: _check_permute_roundtrip(
            randn(200, 128, dtype=bf16), topk(200, 4, 64, torch.int32), 64, pad=16),
        "unweighted combine": lambda: _check_permute_roundtrip(randn(64, 64), topk(64, 2, 8), 8, weights=False),
        "grouped_mm bf16 with empty groups": lambda: _check_grouped_mm([0, 5, 0, 17, 1], 64, 48, bf16, device),
        "grouped_mm all rows in one group": lambda: _check_grouped_mm([0, 0, 96, 0], 32, 40, torch.float32, device),
        "grouped_mm zero rows": lambda: _check_grouped_mm([0, 0, 0], 16, 8, bf16, device),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="figures JSON")
    args = ap.parse_args()
    device = device_from_arg(args.device)
    failed: list[str] = []
    all_cases = cases(device)
    for name, fn in all_cases.items():
        try:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            print(f"ok    {name}", flush=True)
        except Exception:  # noqa: BLE001 - every failure is reported, then the next case runs
            failed.append(name)
            print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)
    figures = {
        "device": str(device),
        "extension": ops.HAS_EXTENSION,
        "cuda_kernels": cuda_kernels_registered(),
        "cases": len(all_cases),
        "cases_passed": len(all_cases) - len(failed),
        "cases_failed": len(failed),
    }
    if failed:
        figures["notes"] = [f"failed: {name}" for name in failed]
    write_figures(args.out, figures)
    if device.type == "cuda" and not figures["cuda_kernels"]:
        print("FAIL  modalmoe._C has no CUDA kernels: the cases ran the fallback, not the CUDA ops")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
