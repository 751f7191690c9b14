"""All-to-all volume of one MoE layer step (fwd + bwd): modalmoe's EP dispatch vs DeepSpeed-MoE.

modalmoe is measured: ``ep`` gloo ranks run an expert-parallel MoELayer and the dispatcher counts
the row bytes it hands to its four all-to-alls (dispatch and combine, forward and backward).
DeepSpeed-MoE is computed analytically from the same routing (it is not run): each of its four
all-to-alls moves an [E, C, H] tensor per rank, C the expert capacity, so 4·E·C·H·bytes per rank:

* ``cf 1.25``: C = max(ceil(T·k / E · 1.25), min_capacity=4) (``deepspeed.moe.sharded_moe``,
  ``drop_tokens=True``); rows over capacity are dropped, yet the padded tensor is sent whole.
* ``dropless``: C = the largest per-(rank, expert) load in the EP group (``drop_tokens=False``
  all-reduces max(exp_counts)).

T counts every position of the rank's batch: DeepSpeed's gate routes padding tokens too, while
modalmoe does not route them (``--pad`` sets the padding fraction, 0 by default).

Routers: ``topk`` on random tokens routes near-uniformly; ``modality`` at init adds a per-modality
embedding that sends each modality's tokens to the same few experts (a skewed load).

    python benchmarks/bench_dispatch_bytes.py [--ep 4] [--tokens 2048] [--experts 16] [--routers topk modality]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from modalmoe.runtime.moe import MoEConfig, MoELayer
from modalmoe.runtime.parallel_state import Layout, ParallelState

DS_MIN_CAPACITY = 4
DS_CF = 1.25


def _rank_main(rank: int, a: argparse.Namespace, init_file: str, router: str, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=a.ep, timeout=timedelta(seconds=300))
    state = ParallelState.build(Layout(a.ep, ep=a.ep))
    cfg = MoEConfig(hidden_size=a.hidden, ffn_hidden_size=a.ffn, num_experts=a.experts, top_k=a.top_k,
                    router=router)
    torch.manual_seed(0)  # same router on every rank
    layer = MoELayer(cfg, stats_group=state.dp_group)
    layer.apply_ep(state.ep_group)
    g = torch.Generator().manual_seed(1 + rank)  # different tokens per rank
    x = torch.randn(a.tokens, a.hidden, generator=g, requires_grad=True)
    modality = torch.randint(0, 2, (a.tokens,), generator=g)
    mask = torch.rand(a.tokens, generator=g) >= a.pad
    y, aux = layer(x, modality, mask)
    (y.square().sum() + aux.loss).backward()

    ours_idx_Tk = layer.router(x.detach(), modality, mask).idx_Tk
    ds_idx_Tk = layer.router(x.detach(), modality, torch.ones_like(mask)).idx_Tk  # DeepSpeed routes padding too
    load_E = torch.bincount(ds_idx_Tk.flatten(), minlength=a.experts)
    max_load = load_E.max().clone()
    dist.all_reduce(max_load, op=dist.ReduceOp.MAX, group=state.ep_group)
    row = a.hidden * x.element_size()
    cap = max(math.ceil(a.tokens * a.top_k / a.experts * DS_CF), DS_MIN_CAPACITY)
    dropped_cf = int((load_E - cap).clamp_min(0).sum())
    res = dict(
        ours=layer.dispatcher.total_bytes_sent,
        ours_detail=dict(layer.dispatcher.bytes_sent),
        real_rows=int((ours_idx_Tk >= 0).sum()),
        ds_cf=4 * a.experts * cap * row,
        ds_dropless=4 * a.experts * int(max_load) * row,
        dropped_cf=dropped_cf,
        imbalance=float(load_E.max() / load_E.float().mean()),
    )
    out.put((rank, res))
    dist.destroy_process_group()


def run(a: argparse.Namespace, router: str) -> list[dict]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, args=(r, a, init_file, router, out)) for r in range(a.ep)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=600) for _ in procs)
        for p in procs:
            p.join()
    return [results[r] for r in range(a.ep)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--pad", type=float, default=0.0, help="fraction of padding positions")
    ap.add_argument("--routers", nargs="+", default=["topk", "modality"])
    a = ap.parse_args()
    print(f"ep={a.ep} ranks, T={a.tokens}/rank, H={a.hidden}, E={a.experts}, top-{a.top_k}, pad={a.pad:.0%}, "
          f"float32; bytes per rank per layer step (4 all-to-alls: dispatch+combine, fwd+bwd)")
    print("modalmoe measured; DeepSpeed-MoE computed from the same routing (not run)")
    for router in a.routers:
        res = run(a, router)
        row = a.hidden * 4
        for r in res:
            d = r["ours_detail"]
            assert d["dispatch_fwd"] == d["combine_bwd"] == r["real_rows"] * row, r
        ours = sum(r["ours"] for r in res) / len(res)
        ds_cf = sum(r["ds_cf"] for r in res) / len(res)
        ds_dl = sum(r["ds_dropless"] for r in res) / len(res)
        drop = sum(r["dropped_cf"] for r in res) / (len(res) * a.tokens * a.top_k)
        imb = max(r["imbalance"] for r in res)
        print(
            f"{router:>8} router (max/mean expert load {imb:.2f}): modalmoe {ours / 2**20:7.2f} MiB | "
            f"DeepSpeed cf {DS_CF} {ds_cf / 2**20:7.2f} MiB (ratio modalmoe/DS {ours / ds_cf:.3f}; DS drops "
            f"{drop:.1%} of rows) | DeepSpeed dropless {ds_dl / 2**20:7.2f} MiB (ratio {ours / ds_dl:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
