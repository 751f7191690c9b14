"""The training loop: data → model → loss → step, with metrics, evaluation, checkpoints and a report.

Its parts live beside it: ``process`` (this process's place in the job, the watchdog),
``checkpointing`` (save, resume, init-from), ``monitors`` (the metrics window and the counters).
Stays generic over the model: it needs ``model(batch)`` to return an object with ``loss``,
``caption_nll_sum``, ``num_text_tokens``, ``non_caption_loss``, ``aux_loss``, ``contrastive_loss``
and ``moe_stats`` (one RoutingStats per MoE layer).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from ..models.activation_checkpoint import apply_activation_checkpointing
from ..models.parallelize import build_local_model, check_tp_divisibility
from ..models.params import count_parameters
from ..models.transformer import build_model
from ..ops import GradBuffers
from ..runtime.data import Tokenizer, build_loader, check_vocab_size
from ..runtime.engine import DeepSpeedEngine, TorchEngine
from ..runtime.launch_info import LaunchInfo
from ..runtime.metrics import MetricsWriter, get_logger
from ..runtime.modality import MODALITY_NAMES
from ..runtime.moe.stats import RoutingStats
from ..runtime.parallel_state import Layout
from ..runtime.preemption import Preempted, agreed_signal
from .checkpointing import Checkpointing, continue_from, load_init
from .evaluate import evaluate
from .flops import TrainFlops, peak_tflops
from .job_config import JobConfig
from .memory_plan import check_memory_fits
from .monitors import Monitors
from .process import check_run_dir, setup_process, uses_deepspeed
from .report import write_routing_report

__all__ = ["Trainer"]

log = get_logger("modalmoe.train")


class Trainer:
    """One training job. Under several processes (launched by deepspeed, srun, mpirun or torchrun)
    it validates the layout, joins the process group, shards the model and steps through DeepSpeed;
    in one process it steps with plain PyTorch. ``launch`` describes the job (the CLI passes what
    ``launch.environment`` detected; by default the torch.distributed variables are read once);
    ``train_data`` replaces the shard loader (tests)."""

    def __init__(self, cfg: JobConfig, *, train_data=None, launch: LaunchInfo | None = None):
        self.cfg = cfg
        t, par = cfg.train, cfg.parallel
        launch = launch if launch is not None else LaunchInfo.from_env()
        # everything that can be checked without a process group is checked before one is created
        cfg.validate(check_paths=train_data is None)
        world = launch.world_size
        layout = Layout.from_config(par, world)
        layout.validate_num_experts(cfg.model.moe.num_experts)
        check_tp_divisibility(cfg.model, par.tp, par.expert_tp, world_size=world)
        use_deepspeed = uses_deepspeed(par, world)
        self.run_dir = t.resolved_run_dir
        check_run_dir(self.run_dir)
        self.tokenizer = Tokenizer(cfg.data.tokenizer)
        check_vocab_size(self.tokenizer, cfg.model.vocab_size)
        # the memory planner's fit check, on every rank, before any process group or weight exists
        check_memory_fits(cfg, world, launch.local_world_size, log)

        self.process = p = setup_process(cfg, launch, layout, use_deepspeed)
        self.device, self.dtype, self.state = p.device, p.dtype, p.state
        self.rank, self.is_main, self.dp_rank, self.dp_size = p.rank, p.is_main, p.dp_rank, p.dp_size

        torch.manual_seed(t.seed)
        # counted on the unallocated whole model; this rank then allocates only its own shards
        self.total_params, self.active_params = count_parameters(build_model(cfg.model, seed=t.seed, device="meta"))
        init = load_init(cfg)
        model = build_local_model(cfg.model, self.state, expert_tp=par.expert_tp, device=self.device, seed=t.seed,
                                  weights=init)
        apply_activation_checkpointing(model, t.activation_checkpointing)  # on the sharded layers
        if not t.cpu_grad_buffers:  # the expert weights' gradients: fresh each backward, none kept
            for m in model.modules():
                if isinstance(getattr(m, "grad_buffers", None), GradBuffers):
                    m.grad_buffers.per_shape = 0
        self.engine = DeepSpeedEngine(model, t, cfg.data, par, self.state) if use_deepspeed else TorchEngine(model, t)
        self.model = self.engine.module
        p.idle_io_threads()
        self.step = continue_from(init, cfg, self.engine, p) if init is not None else 0
        torch.manual_seed(t.seed + 1 + self.dp_rank)  # per-replica randomness (noise, dropout) after the shared init
        self.train_loader = train_data if train_data is not None else build_loader(
            cfg.data, split="train", dp_rank=self.dp_rank, dp_size=self.dp_size, tokenizer=self.tokenizer,
            pin_memory=self.device.type == "cuda",
        )
        self.checkpoints = Checkpointing(cfg, self.run_dir, p, self.engine)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main, tensorboard=t.tensorboard)
        flops = TrainFlops.of(cfg.model, self.active_params)
        self.monitors = Monitors(cfg, p, flops, peak_tflops(self.device, self.dtype, t.tf32, t.peak_tflops))

    def save(self) -> Path:
        return self.checkpoints.save(self.step, self.train_loader, self.monitors)

    def resume(self) -> bool:
        step = self.checkpoints.resume(self.train_loader, self.monitors)
        if step is None:
            return False
        self.step = step
        return True

    # ---- the loop ---------------------------------------------------------------------------

    def _autocast(self):
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, batch) -> tuple[dict[str, float], list[RoutingStats], int]:
        """One optimizer step. The caption NLL is divided once, by the global number of caption
        tokens, so every layout computes the gradient of the same global-batch objective."""
        batch = batch.to(self.device, non_blocking=True)  # from pinned memory on CUDA: the copy overlaps
        with self._autocast():
            out = self.model(batch)
        n_local = out.num_text_tokens.detach().float()
        nonfinite = (~torch.isfinite(out.loss.detach().float())).float()
        contrastive = out.contrastive_loss.detach().float() if out.contrastive_loss is not None else n_local.new_zeros(())
        # one all-reduce for [caption tokens, caption nll sum, real tokens, replicas with a non-finite
        # loss, contrastive loss], then one host copy for the skip decision and every logged scalar
        totals = self.process.dp_sum(torch.stack([n_local, out.caption_nll_sum.detach().float(), batch.mask.sum().float(),
                                                  nonfinite, contrastive]))
        local = torch.stack([out.non_caption_loss.detach().float(), out.aux_loss.detach().float(), out.loss.detach().float()])
        n_tok, nll_sum, real_tokens, n_nonfinite, contrastive_sum, other_h, aux_h, loss_h = torch.cat([totals, local]).tolist()
        if n_nonfinite > 0:  # every rank sees the same sum (TP peers share the loss): all skip
            return {"loss": loss_h, "skipped": 1.0}, out.moe_stats, int(real_tokens)
        n_global = max(n_tok, 1.0)
        # × dp_size: the engine averages the replicas' gradients, so their mean is the gradient of Σ nll / n_global
        loss = out.caption_nll_sum * (self.dp_size / n_global) + out.non_caption_loss
        self.engine.backward(loss)
        grad_norm = self.engine.step()  # a non-finite (global) norm: the engine dropped the grads
        caption = nll_sum / n_global
        scalars = {
            "loss": caption + other_h,
            "caption_loss": caption,
            "aux_loss": aux_h,
            "grad_norm": grad_norm,
            "skipped": float(not math.isfinite(grad_norm)),
        }
        if out.contrastive_loss is not None:
            scalars["contrastive_loss"] = contrastive_sum / self.dp_size
        return scalars, out.moe_stats, int(real_tokens)

    def _skip(self, scalars: dict[str, float], batch) -> None:
        """A step skipped for a non-finite loss or gradient: counted; too many in a row save the
        state (the last finite weights) for inspection and stop the job."""
        if self.monitors.skip(self.step, scalars):
            raise self.monitors.nonfinite_error(self.step, scalars, batch, self.save())

    def fit(self) -> dict:
        """Train to ``train.steps``. In a multi-process job a watchdog runs meanwhile (README, "When
        things go wrong"): a lost or failed peer ends this rank with PeerLostError naming it."""
        with self.process.watched(self.cfg.train.heartbeat_timeout_s):
            return self._fit()

    def _fit(self) -> dict:
        t = self.cfg.train
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            log.info(
                "model: %.2fM parameters, %.2fM active per token; device %s, dtype %s; run folder %s",
                self.total_params / 1e6, self.active_params / 1e6, self.device, self.dtype, self.run_dir,
            )
        if t.resume:
            self.resume()
        progress = None
        if self.is_main and t.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=t.steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.monitors.reset_window()
        self.model.train()
        data = iter(self.train_loader)
        while self.step < t.steps:
            batch = next(data, None)
            if batch is None:
                data = iter(self.train_loader)
                batch = next(data)
            self.monitors.count_bad(batch)
            scalars, stats, ntok = self.train_step(batch)
            self.step += 1
            if scalars.pop("skipped", 0.0):
                self._skip(scalars, batch)
            else:
                self.monitors.record(scalars, stats, ntok)
            if self.step % t.log_every == 0 or self.step == t.steps:
                m = self.monitors.window_metrics(self.step, self.engine.lr)
                self.metrics.write(self.step, "train", m)
                if progress is not None:
                    progress.set_postfix(loss=f"{m.get('loss', float('nan')):.3f}", tok_s=f"{m['tokens_per_s']:.0f}", bal=f"{m.get('balance', 1.0):.2f}",
                                         **({"mfu": f"{m['mfu']:.1%}"} if "mfu" in m else {}))
            if progress is not None:
                progress.update(1)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self.evaluate()
            if t.save_every and self.step % t.save_every == 0 and self.step < t.steps:
                self.save()
            if self.step < t.steps and (signum := agreed_signal()):
                saved = bool(t.save_every) and self.step % t.save_every == 0
                ckpt = self.checkpoints.latest() if saved else self.save()
                self.metrics.close()
                raise Preempted(signum, self.step, ckpt)
        if progress is not None:
            progress.close()
        final = self.evaluate()
        ckpt = self.save()
        summary = {"step": self.step, "checkpoint": str(ckpt), "eval": final,
                   "parameters": {"total": self.total_params, "active_per_token": self.active_params}}
        if self.is_main:
            if t.report and self.monitors.run_stats:
                write_routing_report(self.run_dir, self.monitors.run_stats, self.cfg.model.moe_layers, MODALITY_NAMES)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.metrics.close()
        return summary

    def evaluate(self) -> dict[str, float]:
        if not self.cfg.data.eval_shards:
            return {}
        t = self.cfg.train
        loader = build_loader(self.cfg.data, split="eval", dp_rank=self.dp_rank, dp_size=self.dp_size, tokenizer=self.tokenizer,
                              pin_memory=self.device.type == "cuda")
        result = evaluate(
            self.model, loader, self.device, max_batches=t.eval_batches, retrieval_size=t.retrieval_size,
            pad_id=self.tokenizer.pad_id, vocab_size=self.cfg.model.vocab_size, dtype=self.dtype,
            dp_sum=self.process.dp_sum, dp_min=self.process.dp_min,
        )
        self.metrics.write(self.step, "eval", result)
        if self.is_main:
            log.info(
                "eval at step %d: caption loss %.3f (baselines: unigram %.3f, other images %.3f), "
                "retrieval R@1 %.3f R@5 %.3f (chance %.3f / %.3f)",
                self.step, result["caption_loss"], result["unigram_loss"], result["image_ablated_loss"],
                result.get("retrieval_r1", float("nan")),
                result.get("retrieval_r5", float("nan")), result.get("retrieval_chance_r1", float("nan")),
                result.get("retrieval_chance_r5", float("nan")),
            )
        return result
