"""CPU bandwidth of modalmoe.ops.permute / unpermute, forward and backward, against a plain copy.

Each op's rate is the bytes it must move (every tensor it reads or writes counted once: rows,
index maps, gate weights) over its time, and the ceiling is ``dst.copy_(src)`` moving the same
number of bytes (half read, half written, preallocated), timed in the same interleaved rounds:
``op rate / copy rate`` near 1 means the op runs at memory speed (target >= 0.85). The backward
ops are the ones the registered autograd runs: permute's is ``combine_rows`` without weights,
unpermute's ``combine_rows_backward`` (both gradients, the rows' and the gate weights', in one pass
that reads the [T, H] gradient once; the two ops ``gather_rows`` + ``slot_dot`` before it). The
pure-PyTorch index_select / index_add path (the ops' reference) is timed in a second table.
Medians are reported (minima too: on a shared, busy machine the median picks up preemption).
By default glibc is told to reuse freed memory (``runtime/cpu_memory.py``, as the trainer does
on CPU) so the timings measure the kernels rather than the page faults of a fresh 32 MiB mmap
on every call; ``--fresh-pages`` keeps glibc's defaults.

Legend: T tokens, k slots per token, S = T*k slots, E experts, H hidden, R = T*k permuted rows.

Run: ``python benchmarks/bench_permute.py [--tokens 16384 --top-k 2 --hidden 256 --experts 16 64] [--grouped-mm]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from modalmoe import ops
from modalmoe.runtime.cpu_memory import keep_freed_memory

__all__ = ["bench_bandwidth", "main", "time_interleaved"]


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, rounds: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, tuple[float, float]]:
    """(median ms, min ms) per candidate. Each round gives every candidate a short warmed-up burst,
    so the allocator settles on its pattern while drift over the run hits all candidates alike.
    ``clock=time.process_time`` counts this process's CPU time instead of wall time."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(per_round):
                start = clock()
                fn()
                times[name].append(clock() - start)
    return {name: (1e3 * statistics.median(t), 1e3 * min(t)) for name, t in times.items()}


def bench_bandwidth(T: int, k: int, H: int, E: int, *, warmup: int, repeats: int,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Prints, and returns, op rate / copy rate of the same bytes for permute and unpermute, fwd and bwd."""
    gen = torch.Generator().manual_seed(0)
    x_TH = torch.randn(T, H, generator=gen)
    topk_idx_Tk = torch.rand(T, E, generator=gen).topk(k, dim=1).indices
    topk_w_Tk = torch.rand(T, k, generator=gen)
    x_perm_RH, plan = ops.permute(x_TH, topk_idx_Tk, E)
    g_TH = torch.randn(T, H, generator=gen)
    g_RH = torch.randn(*x_perm_RH.shape, generator=gen)
    mm = torch.ops.modalmoe
    f, i64, S, R = x_TH.element_size(), 8, T * k, x_perm_RH.shape[0]
    w = topk_w_Tk.element_size()
    # (fn, bytes read, bytes written), each tensor once
    cases = {
        "permute fwd": (lambda: ops.permute(x_TH, topk_idx_Tk, E),
                        T * H * f + S * i64, R * H * f + S * i64 + R * i64 + S + 3 * E * i64),
        "permute bwd": (lambda: mm.combine_rows(g_RH, plan.row_of, plan.src_slot, None),
                        R * H * f + S * i64, T * H * f),
        "unpermute fwd": (lambda: ops.unpermute(x_perm_RH, plan, topk_w_Tk),
                          R * H * f + S * i64 + S * w, T * H * f),
        "unpermute bwd": (lambda: mm.combine_rows_backward(g_TH, x_perm_RH, plan.row_of, plan.src_slot, topk_w_Tk),
                          T * H * f + R * H * f + S * i64 + R * i64 + S * w, R * H * f + S * w),
    }
    fns: dict[str, Callable[[], object]] = {}
    for name, (fn, read, written) in cases.items():
        src = torch.randn((read + written) // 2 // 4, generator=gen)
        dst = torch.empty_like(src)
        fns[name] = fn
        fns[f"copy for {name}"] = lambda src=src, dst=dst: dst.copy_(src)
    ms = time_interleaved(fns, warmup=warmup, repeats=repeats, clock=clock)
    what = "process CPU time" if clock is time.process_time else "wall time"
    print(f"\nT={T} k={k} H={H} E={E} float32, {torch.get_num_threads()} threads, {what}, medians of {repeats} calls "
          f"in interleaved rounds (host shared with other jobs, load average {os.getloadavg()[0]:.1f})")
    print(f"  {'':<14s} {'MiB moved':>9s} {'op ms':>8s} {'op GB/s':>8s} {'copy ms':>8s} {'copy GB/s':>9s}"
          f"   op/copy (medians; from minima)")
    ratios = {}
    for name, (_, read, written) in cases.items():
        (op, op_min), (cp, cp_min) = ms[name], ms[f"copy for {name}"]
        moved = read + written
        copied = 2 * ((read + written) // 2 // 4) * 4
        ratio, ratio_min = (moved / op) / (copied / cp), (moved / op_min) / (copied / cp_min)
        ratios[name] = ratio
        print(f"  {name:<14s} {moved / 2**20:9.1f} {op:8.3f} {moved / op / 1e6:8.2f} {cp:8.3f} "
              f"{copied / cp / 1e6:9.2f}   {ratio:5.2f} ({ratio_min:4.2f})")
    return ratios


def bench_case(T: int, k: int, H: int, E: int, *, warmup: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x_TH = torch.randn(T, H, generator=gen)
    topk_idx_Tk = torch.rand(T, E, generator=gen).topk(k, dim=1).indices
    topk_w_Tk = torch.rand(T, k, generator=gen)

    x_perm_RH, plan = ops.permute(x_TH, topk_idx_Tk, E)
    _, ref_plan = ops.permute_reference(x_TH, topk_idx_Tk, E)
    src_tok_R = plan.src_slot // k
    row_of_S = plan.row_of.reshape(-1)
    slot_tok_S = torch.arange(T * k) // k
    w_S1 = topk_w_Tk.reshape(-1, 1)

    def index_add_combine() -> torch.Tensor:
        contrib_SH = x_perm_RH.index_select(0, row_of_S) * w_S1
        return x_TH.new_zeros(T, H).index_add_(0, slot_tok_S, contrib_SH)

    timings = {
        "permute (one op: plan + rows)": lambda: ops.permute(x_TH, topk_idx_Tk, E),
        "  build_plan only": lambda: ops.build_plan(topk_idx_Tk, E),
        "  gather only (as in the plain path)": lambda: ops.gather_rows(x_TH, plan.src_slot, plan.row_of),
        "unpermute (weighted)": lambda: ops.unpermute(x_perm_RH, plan, topk_w_Tk),
        "ref permute (argsort plan + index_select)": lambda: ops.permute_reference(x_TH, topk_idx_Tk, E),
        "ref gather only (index_select)": lambda: x_TH.index_select(0, src_tok_R),
        "ref unpermute (index_select + index_add)": lambda: ops.unpermute_reference(x_perm_RH, ref_plan, topk_w_Tk),
        "torch index_select*w + index_add_": index_add_combine,
    }
    ms = time_interleaved(timings, warmup=warmup, repeats=repeats)
    permute_ms, unpermute_ms = ms["permute (one op: plan + rows)"][0], ms["unpermute (weighted)"][0]
    print(f"\n  the ops against their pure-PyTorch reference (forward), T={T} k={k} H={H} E={E}")
    print(f"  {'':<44s} {'median':>9s} {'min':>9s}")
    for name, (median, best) in ms.items():
        print(f"  {name:<44s} {median:6.3f} ms {best:6.3f} ms")
    print(f"  => speedup over the reference: permute "
          f"{ms['ref permute (argsort plan + index_select)'][0] / permute_ms:.1f}x, unpermute "
          f"{ms['ref unpermute (index_select + index_add)'][0] / unpermute_ms:.1f}x")


def bench_grouped_mm(R: int, K: int, N: int, E: int, *, warmup: int, repeats: int) -> None:
    """Forward + backward of ops.grouped_mm vs one dense mm of the same rows and the naive cat loop."""
    gen = torch.Generator().manual_seed(1)
    counts = torch.multinomial(torch.ones(E), R, replacement=True, generator=gen).bincount(minlength=E).tolist()
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    x_RK = torch.randn(R, K, generator=gen, requires_grad=True)
    w_EKN = torch.randn(E, K, N, generator=gen, requires_grad=True)
    w_KN = torch.randn(K, N, generator=gen, requires_grad=True)
    g_RN = torch.randn(R, N, generator=gen)

    def fwd_bwd(fn: Callable[[], torch.Tensor], *params: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            for p in params:
                p.grad = None
            fn().backward(g_RN)

        return run

    timings = {
        "dense mm [R, K] @ [K, N]": fwd_bwd(lambda: x_RK @ w_KN, x_RK, w_KN),
        "grouped_mm": fwd_bwd(lambda: ops.grouped_mm(x_RK, w_EKN, counts), x_RK, w_EKN),
        "naive cat([x_e @ w[e]])": fwd_bwd(lambda: ops.grouped_mm_reference(x_RK, w_EKN, offsets), x_RK, w_EKN),
    }
    ms = time_interleaved(timings, warmup=warmup, repeats=repeats)
    dense = ms["dense mm [R, K] @ [K, N]"][0]
    print(f"\ngrouped mm fwd+bwd R={R} K={K} N={N} E={E} float32")
    for name, (median, best) in ms.items():
        print(f"  {name:<44s} {median:7.2f} ms {best:7.2f} ms   this/dense = {median / dense:4.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each burst")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per candidate")
    parser.add_argument("--fresh-pages", action="store_true", help="keep glibc's malloc defaults")
    parser.add_argument("--grouped-mm", action="store_true", help="also time grouped_mm (R=T*k, K=H, N=2H)")
    parser.add_argument("--no-reference", action="store_true", help="skip the pure-PyTorch reference table")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time this process's CPU time (with --threads 1: the work done, on a shared host too)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    if not args.fresh_pages:
        keep_freed_memory()
    if not ops.HAS_EXTENSION:
        raise SystemExit("modalmoe._C is not built; nothing to benchmark (see the warning above)")
    for E in args.experts:
        bench_bandwidth(args.tokens, args.top_k, args.hidden, E, warmup=args.warmup, repeats=args.repeats, clock=clock)
        if not args.no_reference:
            bench_case(args.tokens, args.top_k, args.hidden, E, warmup=args.warmup, repeats=args.repeats)
    if args.grouped_mm:
        for E in args.experts:
            R = args.tokens * args.top_k
            bench_grouped_mm(R, args.hidden, 2 * args.hidden, E, warmup=1, repeats=max(5, args.repeats // 4))


if __name__ == "__main__":
    main()
