"""The step engine: plain PyTorch for one process, DeepSpeed (ZeRO 0/1/2) for a parallel job.

Both expose ``backward(loss)``, ``step() -> grad_norm``, ``lr`` and optimizer state, so the trainer
does not care which it has. The gradient norm is the true global one: TP shards summed over TP,
each expert counted once (summed over EP, never averaged over EP ranks as DeepSpeed's ZeRO-0
clipping does), replicated parameters once.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .deepspeed_groups import DeepSpeedMPU, deepspeed_moe_marker, expert_group_name, register_with_deepspeed
from .distributed import is_expert_param, polled
from .faults import weights_only_safe
from .metrics import get_logger
from .moe.layer import moe_layers
from .optim import build_optimizer
from .parallel_state import ParallelState

__all__ = ["TorchEngine", "DeepSpeedEngine", "global_grad_norm", "deepspeed_config"]

log = get_logger("modalmoe.engine")


def _sum_of_squares(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float64)).pow(2).sum()


@torch.no_grad()
def global_grad_norm(model: nn.Module, state: ParallelState | None, expert_tp: bool = False) -> float:
    """L2 norm of the whole model's (already data-parallel-reduced) gradient, identical on every rank.

    One fused norm per kind of parameter (``_foreach_norm``, float64 sums) on the grads' device and
    one host copy at the end: the step's only grad-norm sync."""
    kinds: list[list[torch.Tensor]] = [[], [], []]  # replicated, TP-sharded, expert
    device = None
    for p in model.parameters():
        if p.grad is None:
            continue
        device = p.grad.device
        kind = 2 if is_expert_param(p) else 1 if getattr(p, "tensor_model_parallel", False) else 0
        kinds[kind].append(p.grad.detach())
    device = device or torch.device("cpu")
    sq = torch.stack([_sum_of_squares(g, device) for g in kinds])
    if state is not None and dist.is_initialized():
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        sq = sq.to(comm)
        tp_part, ex = sq[1:2].clone(), sq[2:3].clone()
        if state.size("tp") > 1:
            polled(dist.all_reduce, tp_part, group=state.tp_group)
        if state.size("ep") > 1:
            polled(dist.all_reduce, ex, group=state.ep_group)
        if expert_tp and state.size("tp") > 1:
            polled(dist.all_reduce, ex, group=state.tp_group)
        sq = torch.cat([sq[:1], tp_part, ex])
    return math.sqrt(float(sq.sum()))


@torch.no_grad()
def _clip_(model: nn.Module, norm: float, max_norm: float) -> None:
    if max_norm > 0 and math.isfinite(norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], coef)


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Schedule:
    """What both engines share: the LR schedule (``self.scheduler``) and the optimizer state."""

    scheduler: torch.optim.lr_scheduler.LambdaLR
    optimizer: torch.optim.Optimizer

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def set_schedule_step(self, step: int) -> None:
        """Put the schedule at ``step`` without stepping the optimizer (a run continued from elsewhere)."""
        sched = self.scheduler
        sched.last_epoch = step
        lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])


class TorchEngine(_Schedule):
    """One process, no DeepSpeed: AdamW (or Adafactor) + warmup/cosine + clipping."""

    def __init__(self, model: nn.Module, train_cfg, state: ParallelState | None = None):
        t = train_cfg
        self.module = model
        self.state = state
        self.grad_clip = t.grad_clip
        self.optimizer, self.scheduler = build_optimizer(model, t)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> float:
        """Clip and step; a non-finite gradient norm drops the gradients and changes nothing
        (weights, moments, LR schedule), as DeepSpeed does on overflow."""
        norm = global_grad_norm(self.module, self.state)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        _clip_(self.module, norm, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return norm


def deepspeed_config(train_cfg, data_cfg, parallel_cfg, dp_size: int, dtype: str = "float32") -> dict:
    """The DeepSpeed JSON, generated from the config tree (never kept by hand beside it)."""
    zero = parallel_cfg.zero_stage
    return {
        "train_micro_batch_size_per_gpu": data_cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": data_cfg.batch_size * dp_size,
        # ZeRO-0 clipping in DeepSpeed averages per-rank norms (wrong under EP): we clip ourselves
        "gradient_clipping": train_cfg.grad_clip if zero > 0 else 0.0,
        "zero_optimization": {"stage": zero, "reduce_bucket_size": parallel_cfg.reduce_bucket_size},
        # bf16 as autocast over float32 parameters, exactly as the plain engine runs it: float32
        # master weights, optimizer state and grad accumulation, a float32 router and residual
        # stream. DeepSpeed's "bf16" section would cast the whole module (router, its bias
        # buffer, norms) to bf16 instead. No module is listed as safe for bf16 gradient
        # reduction: grads are reduced in float32, as Megatron and torchtitan do by default.
        "torch_autocast": {"enabled": dtype == "bfloat16", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(_Schedule):
    """DeepSpeed's engine on our process groups, with our experts tagged for EDP reduction."""

    def __init__(self, model: nn.Module, train_cfg, data_cfg, parallel_cfg, state: ParallelState):
        import deepspeed

        t = train_cfg
        self.state = state
        self.zero_stage = parallel_cfg.zero_stage
        self.expert_tp = parallel_cfg.expert_tp
        self.grad_clip = t.grad_clip
        layers = moe_layers(model)
        register_with_deepspeed(state)
        if layers:
            model.ds_moe_marker = deepspeed_moe_marker(layers[0].cfg.num_experts, state.size("ep"), expert_group_name(state))
        # the client optimizer, built as TorchEngine builds it; ZeRO 1/2 wrap it in DeepSpeed's partitioned optimizer
        optimizer, scheduler = build_optimizer(model, t)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(t, data_cfg, parallel_cfg, state.size("dp"), t.resolved_dtype(_param_device(model).type)),
            mpu=DeepSpeedMPU(state),
            dist_init_required=False,
        )
        self.module = self.engine.module
        # ZeRO-0: DeepSpeed's backward all-reduces in flattened buckets of a fixed 5e8 elements (2 GB
        # of float32 copies); we call the same all-reduce ourselves with parallel.reduce_bucket_size
        self.reduce_bucket_size = parallel_cfg.reduce_bucket_size
        if self.zero_stage == 0:
            self.engine.enable_backward_allreduce = False

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if self.zero_stage == 0:
            self.engine.allreduce_gradients(bucket_size=self.reduce_bucket_size)

    def step(self) -> float:
        """Like TorchEngine.step. The norm is global (identical on every rank), so every rank makes
        the same skip decision; ZeRO 1/2 skip inside DeepSpeed (overflow: grads and partitioned
        grad buffers dropped, no LR step)."""
        if self.zero_stage == 0:
            norm = global_grad_norm(self.module, self.state, self.expert_tp)
            if not math.isfinite(norm):
                self.engine.zero_grad()
                self.optimizer.zero_grad(set_to_none=True)
                return norm
            _clip_(self.module, norm, self.grad_clip)
            self.engine.step()
            return norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def _wrapped(self) -> bool:
        """ZeRO 1/2 (and bf16) hand back DeepSpeed's optimizer wrapper, not the torch optimizer."""
        return not isinstance(self.optimizer, torch.optim.Optimizer)

    def state_dict(self) -> dict:
        """Only what ``torch.load(weights_only=True)`` accepts: DeepSpeed's wrapper state carries
        objects (its loss scaler, parameter-slice mappings) that are dropped here; the fp32 master
        partitions, the base optimizer state and the paddings are kept."""
        sd = super().state_dict()
        if self._wrapped:
            dropped: list[str] = []
            sd["optimizer"] = weights_only_safe(sd["optimizer"], "optimizer", dropped)
            log.debug("DeepSpeed optimizer state not saved (not weights_only-safe): %s", dropped)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if not self._wrapped:
            return super().load_state_dict(sd)
        # DeepSpeed takes one state per DP rank and reads its own: this rank's, saved above
        per_rank = [sd["optimizer"]] * self.state.size("dp")
        self.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
        self.scheduler.load_state_dict(sd["scheduler"])
