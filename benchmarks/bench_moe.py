"""MoE layer fwd+bwd on CPU: modalmoe vs DeepSpeed-MoE vs the ideal, measured side by side.

The ideal is one dense MLP of the experts' shape over the T·k routed rows: the expert matmuls with
no routing, no permutation and no imbalance. modalmoe runs dropless; DeepSpeed-MoE runs its
capacity-factor path (1.25), which drops tokens. Ratios are time / ideal time, median of repeats,
the three timed in interleaved rounds so that machine noise hits them alike.

glibc is told to keep freed memory (``runtime/cpu_memory.py``, what the trainer does on CPU), so
all three reuse their buffers instead of page-faulting a fresh mmap for every tensor of 32 MiB or
more; ``--fresh-pages`` keeps glibc's defaults instead (all contenders slow down), as in a user's
own training loop. There modalmoe's expert weight gradients still come from buffers its
``GroupedExperts`` keeps between steps (``ops/grad_buffers.py``); ``--fresh-grads`` adds
modalmoe with fresh ones each step (``grad_buffers=None``) as a contender of the same rounds.

    python benchmarks/bench_moe.py [--tokens 16384] [--experts 16 64] [--repeats 5] [--fresh-pages] [--fresh-grads]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_permute import bench_bandwidth
from modalmoe import ops
from modalmoe.runtime.cpu_memory import keep_freed_memory
from modalmoe.runtime.moe import MoEConfig, MoELayer
from torch import nn


def _mlp(H: int, F: int) -> nn.Module:
    return nn.Sequential(nn.Linear(H, F, bias=False), nn.GELU(approximate="tanh"), nn.Linear(F, H, bias=False))


def _deepspeed_moe(H: int, F: int, E: int, k: int):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed
    from deepspeed.moe.layer import MoE

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return MoE(H, _mlp(H, F), num_experts=E, ep_size=1, k=k, capacity_factor=1.25, eval_capacity_factor=1.25,
               min_capacity=4, drop_tokens=True, use_rts=False)


_CLOCK = time.perf_counter  # --cpu-time: time.process_time (this process's CPU, robust to other jobs)


def _timed(fn) -> float:
    t0 = _CLOCK()
    fn()
    return _CLOCK() - t0


def bench(T: int, H: int, F: int, E: int, k: int, repeats: int, with_deepspeed: bool,
          fresh_grads: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(T, H)
    modality = torch.randint(0, 2, (T,))
    ours = MoELayer(MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=k, activation="gelu"))
    ideal = _mlp(H, F)
    rows = torch.randn(T * k, H)
    g_rows = torch.randn(T * k, H)
    g = torch.randn(T, H)

    def run_ours():
        xi = x.clone().requires_grad_(True)
        y, aux = ours(xi, modality)
        (torch.autograd.backward([y, aux.loss], [g, torch.ones(())]))
        ours.zero_grad(set_to_none=True)

    def run_ideal():
        ri = rows.clone().requires_grad_(True)
        ideal(ri).backward(g_rows)
        ideal.zero_grad(set_to_none=True)

    fns = {"ideal": run_ideal, "modalmoe": run_ours}
    if fresh_grads:
        plain = MoELayer(MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=k, activation="gelu"))
        plain.experts.grad_buffers = None

        def run_plain():
            xi = x.clone().requires_grad_(True)
            y, aux = plain(xi, modality)
            torch.autograd.backward([y, aux.loss], [g, torch.ones(())])
            plain.zero_grad(set_to_none=True)

        fns["fresh grads"] = run_plain
    if with_deepspeed:
        ds = _deepspeed_moe(H, F, E, k)

        def run_ds():
            xi = x.clone().view(1, T, H).requires_grad_(True)
            y, l_aux, _ = ds(xi)
            torch.autograd.backward([y, l_aux], [g.view(1, T, H), torch.ones(())])
            ds.zero_grad(set_to_none=True)

        fns["deepspeed"] = run_ds
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(v) for name, v in times.items()}


def layer_shape_args(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The layer-benchmark CLI shared with bench_moe_bf16.py: one shape, several expert counts."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap


def main() -> None:
    ap = layer_shape_args(__doc__, repeats=5)
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--fresh-pages", action="store_true", help="keep glibc's malloc defaults")
    ap.add_argument("--fresh-grads", action="store_true", help="also time modalmoe without its kept weight-grad buffers")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time this process's CPU seconds (user + sys) instead of wall time; with --threads 1 "
                         "they are the work done, whatever else runs on a shared host")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args()
    global _CLOCK
    if a.cpu_time:
        _CLOCK = time.process_time
    if a.threads:
        torch.set_num_threads(a.threads)
    reuse = not a.fresh_pages and keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, extension: {ops.HAS_EXTENSION}, "
          f"allocator: {'freed memory reused (as the trainer does)' if reuse else 'glibc defaults (fresh pages)'}, "
          f"clock: {'process CPU time' if a.cpu_time else 'wall'}")
    print(f"T={a.tokens} H={a.hidden} F={a.ffn} top-{a.top_k}, fwd+bwd, median of {a.repeats} interleaved rounds; "
          f"host shared with other jobs ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    for E in a.experts:
        t = bench(a.tokens, a.hidden, a.ffn, E, a.top_k, a.repeats, not a.no_deepspeed, a.fresh_grads)
        line = f"E={E:3d}: ideal {t['ideal'] * 1e3:7.1f} ms | modalmoe {t['modalmoe'] * 1e3:7.1f} ms = {t['modalmoe'] / t['ideal']:.2f}x ideal"
        if "fresh grads" in t:
            line += f" | with fresh weight grads {t['fresh grads'] * 1e3:7.1f} ms = {t['fresh grads'] / t['ideal']:.2f}x ideal"
        if "deepspeed" in t:
            line += f" | deepspeed (cf 1.25) {t['deepspeed'] * 1e3:7.1f} ms = {t['deepspeed'] / t['ideal']:.2f}x ideal"
            line += f" | deepspeed / modalmoe = {t['deepspeed'] / t['modalmoe']:.2f}"
        print(line, flush=True)
        bench_bandwidth(a.tokens, a.top_k, a.hidden, E, warmup=3, repeats=40)  # permute / unpermute vs copy rate


if __name__ == "__main__":
    main()
