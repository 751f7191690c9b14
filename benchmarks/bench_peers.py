"""One MoE FFN layer, fwd+bwd, against the MoE layers a user would pick instead, side by side.

Every contender is timed in the same interleaved rounds (the order rotates each round, so machine
noise and drift hit them alike) and reported as the median over rounds, divided by the median of a
dense SwiGLU MLP of the experts' shape over the T·k routed rows (the same active FLOPs, no routing)
in the same precision. All routers are softmax top-k with the k weights renormalised, and start
from the same router weights (modalmoe's), so the contenders see the same routing (except where
DeepSpeed's 2nd-expert sampling adds noise); expert weights are N(0, 0.02), SwiGLU, no bias.

Contenders, each configured as its users configure it:

- modalmoe ``MoELayer``, dropless, load-balancing loss in the backward. bf16: autocast over fp32
  weights (what the trainer runs).
- DeepSpeed-MoE (``deepspeed.moe.layer.MoE``, always installed here) at capacity factor 1.0 and
  1.25 (tokens past capacity dropped) and dropless (``drop_tokens=False``: capacity = the fullest
  expert's rows), each with the 2nd-expert sampling (``top2_2nd_expert_sampling``: Gumbel noise on
  the 2nd pick, DeepSpeed's default) off and on. ``use_rts`` only acts in top-1 gating and is left
  at its default. Its experts are a padded [E, capacity, H] buffer: the rows it computes are
  E × capacity, printed beside the routed rows the others compute. bf16: native (its bf16 engine
  casts the module to bf16).
- Optional, skipped with the reason printed when they do not import (benchmark-only dependencies,
  not in requirements.txt: ``pip install transformers torchtitan``; torchtitan 0.3 imports
  ``triton`` at import time, so ``pip install triton`` too; measured with transformers 5.24,
  torchtitan 0.3.0, triton 3.9):
  - Hugging Face transformers' Qwen3-MoE ``Qwen3MoeSparseMoeBlock`` with each of its
    ``experts_implementation`` options (eager loop, ``grouped_mm`` — what ``from_pretrained``
    picks by default —, ``batched_mm``; the CUDA-only hub kernels are skipped on CPU), the
    ``load_balancing_loss_func`` of its model (``output_router_logits=True``) in the backward.
    bf16: native (``torch_dtype=torch.bfloat16``). ``batched_mm`` gathers one weight matrix per
    routed row and is skipped when those copies and their grads would not fit (96 GiB at T=16384).
  - torchtitan's ``MoE`` (``torchtitan.models.common.moe``, the config its Qwen3-MoE models
    build, local dispatch): as shipped its experts cast to bf16 for the GEMMs whatever the run's
    precision, so in the fp32 table it is marked as not the same precision, and "fp32 experts" is
    the same module with the casts removed. No aux loss in its backward (its aux-loss-free bias is
    updated by an optimizer hook, not in fwd+bwd). bf16: autocast (what its single-device runs do).

glibc keeps freed memory (``runtime/cpu_memory.py``, as the trainer sets it; ``--fresh-pages`` keeps
glibc's defaults) for every contender alike.

    python benchmarks/bench_peers.py [--tokens 16384] [--experts 16 64] [--precision fp32 bf16] [--rounds 6]
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from modalmoe import ops
from modalmoe.runtime.cpu_memory import keep_freed_memory
from modalmoe.runtime.moe import MoEConfig, MoELayer
from torch import Tensor, nn

__all__ = ["Shape", "Contender", "contenders", "time_rounds", "main"]

# Legend: T tokens, H hidden, F expert FFN width, E experts, k routed experts per token, R rows.

INIT_STD = 0.02
BATCHED_MM_LIMIT = 2 << 30  # bytes of per-row weight copies batched_mm may gather


@dataclass(frozen=True)
class Shape:
    T: int
    H: int
    F: int
    E: int
    k: int = 2


@dataclass
class Contender:
    """``step`` runs one fwd+bwd and returns (output [T, H], input grad [T, H]); the parameter
    grads stay on ``module`` until the next step. ``rows`` says what the experts computed in the
    last step."""

    name: str
    precision: str
    step: Callable[[], tuple[Tensor, Tensor]]
    module: nn.Module
    rows: Callable[[], str]
    note: str = ""
    same_precision: bool = True


class SwiGLU(nn.Module):
    """The dense MLP a user writes (also DeepSpeed's expert): silu(x W_gate) * (x W_up) W_down."""

    def __init__(self, H: int, F: int):
        super().__init__()
        self.up = nn.Linear(H, 2 * F, bias=False)
        self.down = nn.Linear(F, H, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _normal_(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, INIT_STD)
    return module


@dataclass
class _Inputs:
    x_TH: Tensor
    g_TH: Tensor
    modality_T: Tensor
    router_EH: Tensor  # the router weights every contender starts from
    rows_RH: Tensor  # the dense reference's T·k rows
    g_RH: Tensor


def _inputs(s: Shape) -> _Inputs:
    gen = torch.Generator().manual_seed(0)
    return _Inputs(
        x_TH=torch.randn(s.T, s.H, generator=gen), g_TH=torch.randn(s.T, s.H, generator=gen),
        modality_T=torch.randint(0, 2, (s.T,), generator=gen), router_EH=torch.randn(s.E, s.H, generator=gen) * INIT_STD,
        rows_RH=torch.randn(s.T * s.k, s.H, generator=gen), g_RH=torch.randn(s.T * s.k, s.H, generator=gen))


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


def _backward(outputs: list[Tensor], grads: list[Tensor]) -> None:
    torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, grads)])


def _dense(s: Shape, inp: _Inputs, bf16: bool) -> Contender:
    mlp = _normal_(SwiGLU(s.H, s.F))

    def step():
        mlp.zero_grad(set_to_none=True)
        r = inp.rows_RH.clone().requires_grad_(True)
        with _autocast(bf16):
            y = mlp(r)
        _backward([y], [inp.g_RH])
        return y, r.grad

    return Contender("dense SwiGLU (reference)", "bf16 autocast" if bf16 else "fp32", step, mlp,
                     lambda: f"{s.T * s.k} (T·k, no routing)")


def _modalmoe(s: Shape, inp: _Inputs, bf16: bool) -> Contender:
    layer = MoELayer(MoEConfig(hidden_size=s.H, ffn_hidden_size=s.F, num_experts=s.E, top_k=s.k, activation="swiglu"))
    with torch.no_grad():
        layer.router.weight_EH.copy_(inp.router_EH)
    seen = {}
    layer.experts.register_forward_hook(lambda m, args, out: seen.update(rows=args[0].shape[0]))

    def step():
        layer.zero_grad(set_to_none=True)
        x = inp.x_TH.clone().requires_grad_(True)
        with _autocast(bf16):
            y, aux = layer(x, inp.modality_T)
        _backward([y, aux.loss], [inp.g_TH, torch.ones(())])
        return y, x.grad

    return Contender("modalmoe MoELayer (dropless)", "bf16 autocast" if bf16 else "fp32", step, layer,
                     lambda: f"{seen.get('rows')} routed")


def _init_deepspeed_dist() -> None:
    if torch.distributed.is_initialized():
        return
    with socket.socket() as sock:  # a free port: other jobs on this host run their own stores
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def _deepspeed(s: Shape, inp: _Inputs, bf16: bool, cf: float | None, sampling: bool) -> Contender:
    """cf None = dropless (``drop_tokens=False``)."""
    _init_deepspeed_dist()
    from deepspeed.moe.layer import MoE

    moe = MoE(s.H, _normal_(SwiGLU(s.H, s.F)), num_experts=s.E, ep_size=1, k=s.k, capacity_factor=cf or 1.0,
              eval_capacity_factor=cf or 1.0, min_capacity=4, drop_tokens=cf is not None,
              top2_2nd_expert_sampling=sampling)
    gate = moe.deepspeed_moe.gate
    with torch.no_grad():
        gate.wg.weight.copy_(inp.router_EH)
    dtype = torch.bfloat16 if bf16 else torch.float32
    moe.to(dtype)
    seen = {}
    gate.register_forward_hook(lambda m, args, out: seen.update(C=int(out[1])))

    def step():
        moe.zero_grad(set_to_none=True)
        x = inp.x_TH.to(dtype, copy=True).view(1, s.T, s.H).requires_grad_(True)
        y, l_aux, counts_E = moe(x)
        seen["kept"] = int(counts_E.clamp(max=seen["C"]).sum())
        _backward([y, l_aux], [inp.g_TH.view(1, s.T, s.H), torch.ones(())])
        return y.view(s.T, s.H), x.grad.view(s.T, s.H)

    def rows():
        C = seen.get("C")
        dropped = s.T * s.k - seen.get("kept", 0)
        return f"{s.E * C} (E×{C}), {seen.get('kept')} routed" + (f", {dropped} dropped" if dropped else "")

    what = f"cf {cf}" if cf is not None else "dropless"
    return Contender(f"DeepSpeed-MoE {what}, 2nd-expert sampling {'on' if sampling else 'off'}",
                     "native bf16" if bf16 else "fp32", step, moe, rows)


def _hf_options(transformers) -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager"] + sorted(ALL_EXPERTS_FUNCTIONS.keys())


def _hf(s: Shape, inp: _Inputs, bf16: bool, impl: str) -> Contender | str:
    """A contender, or the reason it cannot run here."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    if impl in ("deepgemm", "sonicmoe") and not torch.cuda.is_available():
        return "a CUDA kernel (loaded from the kernels hub); no CUDA here"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if impl == "batched_mm":
        gathered = s.T * s.k * 3 * s.F * s.H * dtype.itemsize * 2  # forward weight copies + their grads
        if gathered > BATCHED_MM_LIMIT:
            return (f"gathers a [{s.H}×{3 * s.F}] weight copy per routed row: {gathered / 2**30:.0f} GiB at "
                    f"T={s.T} (limit {BATCHED_MM_LIMIT / 2**30:.0f} GiB; it is meant for decode-sized batches)")
    cfg = Qwen3MoeConfig(hidden_size=s.H, moe_intermediate_size=s.F, num_experts=s.E, num_experts_per_tok=s.k,
                         norm_topk_prob=True, hidden_act="silu", experts_implementation=impl)
    block = _normal_(qwen3.Qwen3MoeSparseMoeBlock(cfg))
    with torch.no_grad():
        block.gate.weight.copy_(inp.router_EH)
    block.to(dtype)
    seen = {}
    block.gate.register_forward_hook(lambda m, args, out: seen.update(logits=out[0]))
    block.experts.register_forward_hook(lambda m, args, out: seen.update(rows=args[1].numel()))

    def step():
        block.zero_grad(set_to_none=True)
        x = inp.x_TH.to(dtype, copy=True).view(1, s.T, s.H).requires_grad_(True)
        y = block(x)
        aux = cfg.router_aux_loss_coef * qwen3.load_balancing_loss_func((seen.pop("logits"),), s.E, s.k)
        _backward([y, aux], [inp.g_TH.view(1, s.T, s.H), torch.ones(())])
        return y.view(s.T, s.H), x.grad.view(s.T, s.H)

    return Contender(f"HF Qwen3MoeSparseMoeBlock {impl}", "native bf16" if bf16 else "fp32", step, block,
                     lambda: f"{seen.get('rows')} routed" + (" (one weight copy each)" if impl == "batched_mm" else ""))


def _torchtitan(s: Shape, inp: _Inputs, bf16: bool, fp32_experts: bool) -> Contender | str:
    from torchtitan.models.common import config_utils as tt
    from torchtitan.models.common.moe import GroupedExperts

    if bf16 and fp32_experts:
        return "under bf16 autocast the fp32-expert variant would run fp32 GEMMs (torch._grouped_mm is not autocast-enabled)"
    normal = partial(nn.init.normal_, std=INIT_STD)
    cfg = tt.make_moe_config(
        num_experts=s.E,
        router=tt.make_router_config(dim=s.H, num_experts=s.E, gate_param_init={"weight": normal, "bias": nn.init.zeros_},
                                     top_k=s.k, score_func="softmax", route_norm=True),
        routed_experts=tt.make_routed_experts_config(dim=s.H, hidden_dim=s.F, num_experts=s.E, top_k=s.k,
                                                     param_init={"w1_EFD": normal, "w2_EDF": normal, "w3_EFD": normal},
                                                     comm_backend="standard"))
    moe = cfg.build()
    moe.init_states()
    with torch.no_grad():
        moe.router.gate.weight.copy_(inp.router_EH)
    experts = moe.routed_experts.inner_experts
    if fp32_experts:
        experts.__class__ = _FP32GroupedExperts(GroupedExperts)
    seen = {}
    experts.register_forward_hook(lambda m, args, out: seen.update(rows=args[0].shape[0]))

    def step():
        moe.zero_grad(set_to_none=True)
        x = inp.x_TH.clone().view(1, s.T, s.H).requires_grad_(True)
        with _autocast(bf16), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
            y = moe(x)  # its router asks for fp32 autocast, which CPU refuses: the router runs in fp32 anyway
        _backward([y], [inp.g_TH.view(1, s.T, s.H)])
        return y.view(s.T, s.H), x.grad.view(s.T, s.H)

    if fp32_experts:
        return Contender("torchtitan MoE, fp32 experts", "fp32", step, moe, lambda: f"{seen.get('rows')} routed")
    return Contender("torchtitan MoE as shipped", "bf16 autocast" if bf16 else "fp32 run, bf16 expert GEMMs", step,
                     moe, lambda: f"{seen.get('rows')} routed", same_precision=bf16)


def _FP32GroupedExperts(base: type) -> type:
    class FP32GroupedExperts(base):
        """torchtitan's experts without their bf16 casts: the GEMMs in the parameters' dtype."""

        def forward(self, x_RD: Tensor, num_tokens_per_expert_E: Tensor) -> Tensor:
            offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
            h_RF = F.silu(torch._grouped_mm(x_RD, self.w1_EFD.transpose(-2, -1), offs=offsets_E))
            h_RF = h_RF * torch._grouped_mm(x_RD, self.w3_EFD.transpose(-2, -1), offs=offsets_E)
            return torch._grouped_mm(h_RF, self.w2_EDF.transpose(-2, -1), offs=offsets_E)

    return FP32GroupedExperts


def _optional(module: str, contender: str, importer: Callable[[str], object], log: Callable[[str], None]):
    try:
        return importer(module)
    except Exception as e:  # an optional peer that does not import is skipped, with why
        log(f"skipped {contender}: `import {module}` failed ({type(e).__name__}: {e})")
        return None


def contenders(s: Shape, bf16: bool, *, importer: Callable[[str], object] = importlib.import_module,
               log: Callable[[str], None] = print) -> list[Contender]:
    """Every contender that runs here, the dense reference first; each one skipped is logged with
    its reason."""
    inp = _inputs(s)
    out = [_dense(s, inp, bf16), _modalmoe(s, inp, bf16)]
    out += [_deepspeed(s, inp, bf16, cf, sampling) for cf in (1.0, 1.25, None) for sampling in (False, True)]
    peers: list[tuple[str, Callable[[], Contender | str]]] = []
    if transformers := _optional("transformers", "HF Qwen3-MoE", importer, log):
        peers += [(f"HF Qwen3MoeSparseMoeBlock {impl}", partial(_hf, s, inp, bf16, impl)) for impl in _hf_options(transformers)]
    if _optional("torchtitan.models.common.moe", "torchtitan MoE", importer, log):
        peers += [("torchtitan MoE as shipped", partial(_torchtitan, s, inp, bf16, False)),
                  ("torchtitan MoE, fp32 experts", partial(_torchtitan, s, inp, bf16, True))]
    for name, build in peers:
        c = build()
        if isinstance(c, str):
            log(f"skipped {name}: {c}")
        else:
            out.append(c)
    return out


_CLOCK = time.perf_counter


def time_rounds(cs: list[Contender], rounds: int, warmup: int = 1, slow: float = 8.0,
                slow_rounds: int = 2) -> dict[str, list[float]]:
    """Seconds per fwd+bwd, one call per contender per round, the order rotated each round. A
    contender whose warm-up took more than ``slow`` times the reference's (the first) is timed in
    the first ``slow_rounds`` rounds only: far off the others, it needs no fine median, and its
    rounds would double the run."""
    first: dict[str, float] = {}
    for c in cs:
        t0 = _CLOCK()
        for _ in range(warmup):
            c.step()
        first[c.name] = _CLOCK() - t0
    ref = first[cs[0].name]
    times: dict[str, list[float]] = {c.name: [] for c in cs}
    for r in range(rounds):
        for c in cs[r % len(cs):] + cs[: r % len(cs)]:
            if r >= slow_rounds and warmup and first[c.name] > slow * ref:
                continue
            t0 = _CLOCK()
            c.step()
            times[c.name].append(_CLOCK() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--fresh-pages", action="store_true", help="keep glibc's malloc defaults")
    ap.add_argument("--cpu-time", action="store_true", help="time this process's CPU seconds instead of wall time")
    a = ap.parse_args()
    global _CLOCK
    if a.cpu_time:
        _CLOCK = time.process_time
    reuse = not a.fresh_pages and keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, extension: {ops.HAS_EXTENSION}, allocator: "
          f"{'freed memory reused' if reuse else 'glibc defaults'}, clock: {'process CPU' if a.cpu_time else 'wall'}")
    print(f"T={a.tokens} H={a.hidden} F={a.ffn} SwiGLU top-{a.top_k}, fwd+bwd, median of {a.rounds} interleaved "
          f"rounds after 1 warm-up (2 rounds for one 8x slower than dense in its warm-up); host shared with other jobs ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start): ratios are comparable within a column, absolute ms less so", flush=True)
    table: dict[str, dict[str, str]] = {}
    columns = []
    for precision in a.precision:
        for E in a.experts:
            col = f"E={E} {precision}"
            columns.append(col)
            s = Shape(a.tokens, a.hidden, a.ffn, E, a.top_k)
            cs = contenders(s, precision == "bf16")
            times = time_rounds(cs, a.rounds)
            med = {c.name: statistics.median(times[c.name]) for c in cs}
            ref = med[cs[0].name]
            print(f"\n{col} (load average {os.getloadavg()[0]:.1f}):")
            for c in cs:
                t = times[c.name]
                print(f"  {c.name:58s} {c.precision:28s} {med[c.name] * 1e3:8.1f} ms (min {min(t) * 1e3:8.1f}, "
                      f"{len(t)} rounds) = {med[c.name] / ref:5.2f}x dense | expert rows {c.rows()}", flush=True)
                mark = "" if c.same_precision else " (bf16 GEMMs)"
                table.setdefault(c.name, {})[col] = f"{med[c.name] / ref:.2f}x{mark}"
            fair = [c for c in cs[1:] if c.same_precision]
            best = min(fair, key=lambda c: med[c.name])
            print(f"  fastest same-precision MoE: {best.name}")
            del cs
    print("\nfwd+bwd time / dense SwiGLU of the same FLOPs, same precision (median of interleaved rounds)")
    print("| contender | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(row.get(col, "-") for col in columns) + " |")


if __name__ == "__main__":
    main()
