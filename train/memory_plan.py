"""The memory planner behind ``modalmoe plan`` and the trainer's start-time fit check.

Per rank: parameters counted on the model built on the meta device and cut by the layout's rules
(TP shards what ``tp_plan()`` names but ``REPLICATED``, experts split over TP with ``expert_tp``, EP
keeps num_experts / ep experts), float32 gradients, the optimizer state by engine and ZeRO stage, one
micro-batch's activations (train/memory_activations.py) and the EP all-to-all rows.

What lives at once (the peak): the parameters and optimizer state always; then either the activation
phase (saved activations + the loss's or a recomputed layer's working set + rows in flight) or the
gradient phase (gradients + DeepSpeed's reduce bucket + the optimizer step's temporaries). Backward
frees activations as it makes gradients layer by layer, so the two phases do not add. AdamW
(``foreach``) keeps two float32 moments and needs one parameter-sized temporary (sqrt of the second
moment) in its step; Adafactor (``train.optimizer``, one tensor at a time) keeps a row and a column
per matrix and needs one tensor's second-moment estimate in its step. DeepSpeed ZeRO-0 all-reduces
the gradients through flattened copies of ``parallel.reduce_bucket_size`` elements (plus the tensor
that passes it), one bucket at a time, dense ones first. DeepSpeed ZeRO-1/2
(deepspeed/runtime/zero/stage_1_and_2.py) flattens each parameter group into one buffer (the
parameters become views: no extra copy once built), clones this rank's partition as the float32
master, keeps the moments of that partition only, and stages gradients in a reduce bucket of
``reduce_bucket_size`` elements: reserved whole on a GPU, touched only as far as it is filled on CPU;
ZeRO-2 keeps the reduced gradient partition, ZeRO-1 the full gradients. Dense state partitions over
DP, expert state over expert-DP.

When the MoE layers run twice a step (``model.contrastive_coef`` > 0: the text-only pass), each
expert weight's gradient arrives in two parts and backward holds the first until the other pass
reaches that layer: counted as one more expert-gradient copy, a bound (at the peak of a 4-layer
base, 4 of its 8 expert weights, 42% of their bytes, were waiting). On CPU each expert weight also
keeps its gradient buffers between steps (ops/grad_buffers.py, ``train.cpu_grad_buffers``): then two
apart from ``.grad``, else only the one that is ``.grad``. Building: each rank allocates only its
shards (models.parallelize.build_local_model), drawing one whole tensor (one expert's) at a time
before cutting it; ZeRO-1/2 holds a parameter group twice while flattening it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field

import torch

from ..models.parallelize import REPLICATED
from ..models.transformer import build_model
from ..runtime.config import ConfigError
from ..runtime.parallel_state import Layout
from .job_config import JobConfig
from .memory_activations import activation_plan
from .process import uses_deepspeed

__all__ = ["MemoryPlan", "RankPlan", "plan_memory", "parse_memory", "format_plan", "check_memory_fits",
           "device_budget", "suggestions", "REDUCE_BUCKET_ELEMENTS"]

GiB = 2**30
F32 = 4
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's reduce_bucket_size default, parallel.reduce_bucket_size's


@dataclass
class RankPlan:
    ranks: list[int]
    position: str  # the layout coordinates these ranks share
    params: int
    grads: int
    grad_buffers: int  # DeepSpeed's reduce bucket (ZeRO-1/2) or flattened all-reduce copy (ZeRO-0)
    optimizer: int  # AdamW moments (+ the float32 master partition under ZeRO-1/2), or Adafactor's factors
    step_temp: int
    activations: int  # saved for backward under train.activation_checkpointing
    activations_no_ckpt: int
    activation_temp: int
    logits: int
    all_to_all: int
    all_to_all_worst: int
    expert_rows: int
    expert_rows_worst: int
    activations_worst: int
    build: int  # while the model is built and sharded (and ZeRO flattens it)
    kept_grad_buffers: int = 0  # CPU: expert-weight gradient buffers kept between steps, beside .grad
    grad_pending: int = 0  # backward: an expert weight's first gradient contribution waiting for its second
    peak: int = 0
    peak_worst: int = 0

    def phases(self, worst: bool = False) -> dict[str, int]:
        static = self.params + self.optimizer + self.kept_grad_buffers
        act = (self.activations_worst if worst else self.activations) + self.activation_temp
        act += self.all_to_all_worst if worst else self.all_to_all
        return {"activation phase": static + act,
                "gradient phase": static + self.grads + self.grad_pending + self.grad_buffers + self.step_temp,
                "build": self.build}


@dataclass
class MemoryPlan:
    world_size: int
    layout: str
    engine: str
    device: str
    dtype: str
    checkpointing: str
    batch_size: int
    ranks: list[RankPlan] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.ranks)

    @property
    def peak_worst(self) -> int:
        return max(r.peak_worst for r in self.ranks)

    def to_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak, "peak_worst": self.peak_worst}


def _local_numel(cfg: JobConfig, name: str, numel: int, tp_sharded: set[str]) -> tuple[int, bool]:
    """(numel on one rank, whether it is an expert weight) under the layout's sharding rules."""
    par = cfg.parallel
    module = name.rpartition(".")[0]
    if ".ffn.experts." in name:
        n = numel // par.ep
        return (n // par.tp if par.expert_tp else n), True
    if ".ffn.shared." in name:
        return (numel // par.tp if par.expert_tp else numel), False
    return (numel // par.tp if module in tp_sharded else numel), False


def _count_params(cfg: JobConfig) -> dict[str, int]:
    """Elements per rank by kind, from the meta-device model: every rank holds equal shares."""
    model = build_model(cfg.model, device="meta")
    tp_sharded = {n for n in model.tp_plan() if n not in REPLICATED}
    keys = ("full", "local", "dense", "expert", "largest_whole", "largest_group", "largest_dense", "largest_expert",
            "factored")
    out = dict.fromkeys(keys, 0)
    groups: dict[tuple[bool, bool], int] = {}
    for name, p in model.named_parameters():  # tied weights appear once
        n, is_expert = _local_numel(cfg, name, p.numel(), tp_sharded)
        out["full"] += p.numel()
        out["local"] += n
        out["expert" if is_expert else "dense"] += n
        largest = "largest_expert" if is_expert else "largest_dense"
        out[largest] = max(out[largest], n)
        out["largest_whole"] = max(out["largest_whole"], p.numel() // (p.shape[0] if is_expert else 1))
        # Adafactor: a row and a column per matrix (per expert), a full second moment per vector;
        # counted on whole shapes (EP's expert share taken), an upper bound for TP shards
        if p.ndim >= 2:
            matrices = p.shape[:-2].numel() // (cfg.parallel.ep if is_expert else 1)
            out["factored"] += matrices * (p.shape[-2] + p.shape[-1])
        else:
            out["factored"] += n
        decay = p.ndim >= 2 and "embed" not in name
        groups[(is_expert, decay)] = groups.get((is_expert, decay), 0) + n
    out["largest_group"] = max(groups.values())
    return out


def _device_type(cfg: JobConfig, device: str | None) -> str:
    if device:
        return device
    if cfg.train.device != "auto":
        return cfg.train.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_memory(cfg: JobConfig, world_size: int, device: str | None = None) -> MemoryPlan:
    """The per-rank memory of ``cfg`` launched on ``world_size`` ranks (``device``: cpu | cuda; by
    default the one the job would pick here)."""
    par, model = cfg.parallel, cfg.model
    layout = Layout.from_config(par, world_size)
    dev = _device_type(cfg, device)
    dtype = cfg.train.resolved_dtype(dev)
    c = 2 if dtype == "bfloat16" else F32
    deepspeed = uses_deepspeed(par, world_size)
    zero = par.zero_stage if deepspeed else 0
    n = _count_params(cfg)
    dp, edp = layout.dp, layout.edp
    params = n["local"] * F32
    grads = params
    master = n["dense"] // dp + n["expert"] // edp  # this rank's partition, elements
    size = par.reduce_bucket_size
    if zero == 0:
        if cfg.train.optimizer == "adafactor":  # one tensor at a time: its second-moment estimate
            optimizer = n["factored"] * F32
            step_temp = max(n["largest_dense"], n["largest_expert"]) * F32
        else:
            optimizer = 2 * params
            step_temp = params
        # ZeRO-0 through DeepSpeed: dense, then expert grads flattened for their all-reduce, a bucket
        # at a time; a bucket takes tensors until it passes reduce_bucket_size elements
        buckets = [min(n[kind], size + n[f"largest_{kind}"]) for kind in ("dense", "expert")]
        grad_buffers = max(buckets) * F32 if deepspeed else 0
    else:
        optimizer = 3 * master * F32
        step_temp = 2 * master * F32  # the flattened gradient partition and AdamW's temporary
        bucket = size if dev == "cuda" else min(size, n["local"])
        grad_buffers = bucket * F32
        if zero == 2:
            grads = master * F32  # the reduced partition; the bucket holds the rest in flight
    # ops/grad_buffers.py keeps up to two per expert weight; when the MoE layers run twice a step (the
    # contrastive text-only pass) both stay apart from .grad, which is the sum of the two
    twice = model.contrastive_coef > 0 and bool(model.moe_layers)
    kept = 2 * n["expert"] * F32 if dev == "cpu" and cfg.train.cpu_grad_buffers and twice else 0
    build = params + n["largest_whole"] * F32  # the init draws each whole tensor (one expert's) before cutting it
    if zero:
        build = max(build, params + n["largest_group"] * F32)
    flex = dev == "cuda" and model.attention in ("auto", "flex") and model.dropout == 0 and model.head_dim >= 16
    kw = dict(tp=par.tp, ep=par.ep, expert_tp=par.expert_tp, compute_bytes=c, flex=flex,
              fused_swiglu=dev == "cpu" and c == 2)
    mode = cfg.train.activation_checkpointing
    B = cfg.data.batch_size
    act = activation_plan(model, B, mode=mode, **kw)
    act_none = activation_plan(model, B, mode="none", **kw)
    worst = activation_plan(model, B, mode=mode, worst=True, **kw)
    batch = B * (model.num_patches * model.patch_dim * F32 + model.max_text_len * 9 + model.max_seq_len * 9)
    # backward starts with the head's weight gradient while every activation is still there
    head_grad = model.vocab_size * model.hidden_size * F32
    rank = RankPlan(
        ranks=list(range(world_size)), position=layout.describe(), params=params, grads=grads,
        grad_buffers=grad_buffers, optimizer=optimizer, step_temp=step_temp,
        activations=act.saved + batch, activations_no_ckpt=act_none.saved + batch,
        activation_temp=act.transient + head_grad, logits=act.logits,
        all_to_all=act.all_to_all, all_to_all_worst=worst.all_to_all,
        expert_rows=act.rows_computed, expert_rows_worst=worst.rows_computed,
        activations_worst=worst.saved + batch + worst.transient - act.transient, build=build,
        kept_grad_buffers=kept, grad_pending=n["expert"] * F32 if twice else 0,
    )
    rank.peak = max(rank.phases().values())
    rank.peak_worst = max(rank.phases(worst=True).values())
    return MemoryPlan(world_size, layout.describe(), f"deepspeed zero-{zero}" if deepspeed else "torch",
                      dev, dtype, mode, B, [rank])


_UNITS = {"": 10**9, "g": 10**9, "gb": 10**9, "gib": GiB, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "t": 10**12, "tb": 10**12, "tib": 2**40, "b": 1}


def parse_memory(text: str | float) -> int:
    """'80GB' / '80G' / 80 → 80·10⁹ bytes (decimal, as GPU vendors quote memory); '80GiB' → 80·2³⁰."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--device-memory: cannot read {text!r}; give a positive size such as 80GB, 80GiB, 24G or 24 "
                          "(a plain number is GB = 10^9 bytes; GiB = 2^30)")
    return int(float(m.group(1)) * _UNITS[unit])


def _gib(n: int) -> str:
    return f"{n / GiB:8.3f}"


def _candidates(cfg: JobConfig, world_size: int) -> list[tuple[str, object]]:
    par, moe = cfg.parallel, cfg.model.moe
    out: list[tuple[str, object]] = []
    if cfg.model.moe_layers:
        out.append(("parallel.ep", par.ep * 2))
    if world_size > 1:
        out += [("parallel.zero_stage", z) for z in (1, 2) if z > par.zero_stage]
    out += [("train.activation_checkpointing", m) for m in ("moe", "attention", "full")
            if m != cfg.train.activation_checkpointing and (m != "moe" or cfg.model.moe_layers)]
    if cfg.train.optimizer == "adamw" and par.zero_stage == 0:
        out.append(("train.optimizer", "adafactor"))
    if cfg.train.cpu_grad_buffers and cfg.model.contrastive_coef > 0 and cfg.model.moe_layers:
        out.append(("train.cpu_grad_buffers", False))
    if world_size > 1 and par.reduce_bucket_size > 50_000_000:
        out.append(("parallel.reduce_bucket_size", 50_000_000))
    if cfg.data.batch_size > 1:
        out.append(("data.batch_size", cfg.data.batch_size // 2))
    if cfg.model.moe_layers and world_size > 1 and par.ep > 1:
        out.append(("model.moe.imbalance_cap_ratio", 2.0 if moe.imbalance_cap_ratio is None else max(1.0, moe.imbalance_cap_ratio / 2)))
    return out


def suggestions(plan: MemoryPlan, cfg: JobConfig) -> list[str]:
    """The single-field changes that lower this plan's peak (the worst case for the imbalance cap),
    most useful first (more EP, ZeRO, checkpointing, a smaller batch, the cap), each with the peak it would give: every one is re-planned, none guessed."""
    out = []
    for path, value in _candidates(cfg, plan.world_size):
        changed = copy.deepcopy(cfg)
        section, _, name = path.rpartition(".")
        obj = changed
        for part in section.split("."):
            obj = getattr(obj, part)
        setattr(obj, name, value)
        try:
            new = plan_memory(changed, plan.world_size, plan.device)
        except ConfigError:  # e.g. ep no longer divides dp
            continue
        before, after = (plan.peak_worst, new.peak_worst) if "imbalance" in path else (plan.peak, new.peak)
        if after < before:
            case = "worst case" if "imbalance" in path else "peak"
            shown = str(value).lower() if isinstance(value, bool) else value
            out.append(f"{path}={shown} ({case} {before / GiB:.3f} → {after / GiB:.3f} GiB)")
    return out


def format_plan(plan: MemoryPlan, budget: int | None = None, cfg: JobConfig | None = None) -> str:
    lines = [f"memory plan: {plan.layout}; engine {plan.engine}; {plan.device} {plan.dtype}; "
             f"batch {plan.batch_size} per rank; activation checkpointing {plan.checkpointing}"]
    for r in plan.ranks:
        rows = [
            ("parameters (float32)", r.params), ("gradients (float32)", r.grads),
            ("gradient buffers", r.grad_buffers), ("optimizer state", r.optimizer),
            ("optimizer step temporaries", r.step_temp),
            ("expert gradient buffers kept (CPU, train.cpu_grad_buffers)", r.kept_grad_buffers),
            ("expert gradients of the first pass awaiting the second", r.grad_pending),
            (f"activations, checkpointing {plan.checkpointing}", r.activations),
            ("activations, no checkpointing", r.activations_no_ckpt),
            ("activation working set (loss / recompute)", r.activation_temp),
            ("  of which logits + loss", r.logits),
            (f"all-to-all rows, balanced ({r.expert_rows} rows)", r.all_to_all),
            (f"all-to-all rows, worst case ({r.expert_rows_worst} rows)", r.all_to_all_worst),
            ("model build", r.build),
        ]
        lines.append(f"ranks {r.ranks[0]}..{r.ranks[-1]} (all alike: even TP/EP shares)" if len(r.ranks) > 1
                     else f"rank {r.ranks[0]}")
        lines.append(f"  {'component':52s} {'GiB':>8s}")
        lines += [f"  {name:52s} {_gib(v)}" for name, v in rows]
        for name, v in r.phases().items():
            lines.append(f"  {'= ' + name:52s} {_gib(v)}")
        lines.append(f"  {'PEAK, balanced':52s} {_gib(r.peak)}")
        lines.append(f"  {'PEAK, worst-case expert imbalance':52s} {_gib(r.peak_worst)}")
    lines.append(f"total over {plan.world_size} ranks: {_gib(plan.peak * plan.world_size).strip()} GiB (balanced)")
    if budget is not None:
        fits = plan.peak <= budget
        lines.append(f"device memory {budget / 1e9:.3f} GB = {budget / GiB:.3f} GiB per rank: {'FITS' if fits else 'DOES NOT FIT'} "
                     f"(balanced peak {plan.peak / GiB:.3f} GiB)")
        if plan.peak_worst > budget >= plan.peak:
            lines.append(f"warning: the worst-case expert imbalance ({plan.peak_worst / GiB:.3f} GiB) would not fit")
        if not fits and cfg is not None:
            lines += ["fields to change, most useful first:"] + [f"  --set {s}" for s in suggestions(plan, cfg)]
    return "\n".join(lines)


def device_budget(cfg: JobConfig, device: torch.device, local_world_size: int) -> int:
    """train.device_memory_gb, or the device's own: a GPU's memory, or on CPU the available RAM
    shared by this node's ranks."""
    if cfg.train.device_memory_gb > 0:
        return int(cfg.train.device_memory_gb * 10**9)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kib * 1024 // max(1, local_world_size)


def check_memory_fits(cfg: JobConfig, world_size: int, local_world_size: int, log=None) -> MemoryPlan | None:
    """Refuse (ConfigError) a job whose balanced peak exceeds the budget; warn on the worst case."""
    if not cfg.train.check_memory:
        return None
    from .process import resolve_device

    device = resolve_device(cfg.train.device)
    plan = plan_memory(cfg, world_size, device.type)
    budget = device_budget(cfg, device, local_world_size)
    if plan.peak > budget:
        fixes = "; ".join(suggestions(plan, cfg)) or "a smaller model"
        raise ConfigError(
            f"config field `train.device_memory_gb`: the memory planner predicts {plan.peak / GiB:.2f} GiB per rank "
            f"({plan.peak} bytes, balanced routing) but the budget is {budget / GiB:.2f} GiB "
            f"({'train.device_memory_gb' if cfg.train.device_memory_gb else 'the device'}). Change: {fixes}; "
            "see `modalmoe plan`, or set train.check_memory=false to start anyway")
    if plan.peak_worst > budget and log is not None:
        log.warning("memory: the worst-case expert imbalance would need %.2f GiB per rank, above the %.2f GiB budget "
                    "(the balanced case fits; moe.imbalance_cap_ratio bounds it)", plan.peak_worst / GiB, budget / GiB)
    return plan

