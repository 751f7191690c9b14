"""The MoE layer in bf16 on CPU: modalmoe against a bf16 dense MLP of the same FLOPs, side by side.

Both run fwd+bwd under ``torch.autocast("cpu", bfloat16)`` over float32 weights, the way a bf16
training job runs them (float32 master weights, cast per forward). The dense contender is one SwiGLU
MLP of the experts' shape over the T·k routed rows: the expert FLOPs with no routing, no permute and
no imbalance; it is modalmoe's own dense ``MLP`` (the fused SwiGLU op included), and the same MLP
written in plain PyTorch (``F.silu(gate) * up``, what a user's dense layer is) is timed beside it.
An fp32 dense MLP of the same FLOPs is timed in the same rounds too, for scale.
Ratios are medians of interleaved rounds (``bench_permute.time_interleaved``).

    python benchmarks/bench_moe_bf16.py [--tokens 16384] [--experts 16 64] [--repeats 10]
"""

from __future__ import annotations

import torch
from bench_moe import layer_shape_args
from bench_permute import time_interleaved
from modalmoe import ops
from modalmoe.runtime.cpu_memory import keep_freed_memory
from modalmoe.runtime.moe import MoEConfig, MoELayer
from modalmoe.runtime.moe.experts import MLP


class TorchSwiGLU(torch.nn.Module):
    def __init__(self, H: int, F: int):
        super().__init__()
        self.up = torch.nn.Linear(H, 2 * F, bias=False)
        self.down = torch.nn.Linear(F, H, bias=False)

    def forward(self, x):
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


def bench(T: int, H: int, F: int, E: int, k: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(T, H)
    modality = torch.randint(0, 2, (T,))
    ours = MoELayer(MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=k, activation="swiglu"))
    dense = MLP(H, F, "swiglu", 0.02)
    plain = TorchSwiGLU(H, F)
    rows = torch.randn(T * k, H)
    g_rows, g = torch.randn(T * k, H), torch.randn(T, H)

    def run_ours():
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = ours(xi, modality)
        torch.autograd.backward([y, aux.loss], [g.to(y.dtype), torch.ones(())])
        ours.zero_grad(set_to_none=True)

    def run_dense(mlp, dtype):
        def run():
            ri = rows.clone().requires_grad_(True)
            if dtype == torch.float32:
                y = mlp(ri)
            else:
                with torch.autocast("cpu", dtype=dtype):
                    y = mlp(ri)
            y.backward(g_rows.to(y.dtype))
            mlp.zero_grad(set_to_none=True)

        return run

    fns = {"dense_bf16": run_dense(dense, torch.bfloat16), "modalmoe_bf16": run_ours,
           "torch_dense_bf16": run_dense(plain, torch.bfloat16), "dense_fp32": run_dense(dense, torch.float32)}
    return {name: median for name, (median, _) in time_interleaved(fns, warmup=1, repeats=repeats, rounds=repeats).items()}


def main() -> None:
    a = layer_shape_args(__doc__, repeats=10).parse_args()
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, extension: {ops.HAS_EXTENSION}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; freed memory reused (as the trainer does)")
    print(f"T={a.tokens} H={a.hidden} F={a.ffn} SwiGLU top-{a.top_k}, fwd+bwd under bf16 autocast, median of {a.repeats}")
    for E in a.experts:
        t = bench(a.tokens, a.hidden, a.ffn, E, a.top_k, a.repeats)
        print(f"E={E:3d}: dense bf16 {t['dense_bf16']:7.1f} ms | modalmoe bf16 {t['modalmoe_bf16']:7.1f} ms = "
              f"{t['modalmoe_bf16'] / t['dense_bf16']:.3f}x dense bf16 | plain-torch dense bf16 "
              f"{t['torch_dense_bf16']:7.1f} ms: modalmoe = {t['modalmoe_bf16'] / t['torch_dense_bf16']:.3f}x | dense fp32 {t['dense_fp32']:7.1f} ms "
              f"(modalmoe bf16 = {t['modalmoe_bf16'] / t['dense_fp32']:.2f}x dense fp32)", flush=True)


if __name__ == "__main__":
    main()
