"""The training loop: data → model → loss → step, with metrics, evaluation, checkpoints and a report.

Stays generic over the model: it needs ``model(batch)`` to return an object with ``loss``,
``caption_loss``, ``aux_loss``, ``num_text_tokens`` and ``moe_stats`` (one RoutingStats per MoE layer).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..models.parallelize import check_tp_divisibility, parallelize
from ..models.params import count_parameters
from ..models.transformer import build_model
from ..runtime.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state
from ..runtime.config import ConfigError
from ..runtime.consolidate import load_consolidated, named_optimizer_state, shard_layout_meta
from ..runtime.cpu_affinity import bind_local_rank, idle_io_threads
from ..runtime.cpu_memory import keep_freed_memory
from ..runtime.data import Tokenizer, build_loader, check_vocab_size
from ..runtime.data.counts import BAD_REASONS
from ..runtime.distributed import init_from_env, polled, set_busy_wait
from ..runtime.engine import DeepSpeedEngine, TorchEngine
from ..runtime.faults import NonFiniteError, NonFiniteTracker, PeerLostError, describe
from ..runtime.metrics import MetricsWriter, get_logger
from ..runtime.modality import MODALITY_NAMES
from ..runtime.moe.stats import RoutingStats, specialisation_index
from ..runtime.parallel_state import Layout, ParallelState
from ..runtime.preemption import Preempted, agreed_signal
from ..runtime.tensor_parallel import tp_shard_specs
from ..runtime.watchdog import Watchdog, looks_distributed
from .evaluate import evaluate
from .flops import TrainFlops, peak_tflops, throughput_metrics
from .health import CollapseMonitor
from .job_config import JobConfig
from .report import write_routing_report

__all__ = ["Trainer"]

log = get_logger("modalmoe.train")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config field `train.device`: cuda was asked for but torch sees no GPU; use auto or cpu")
    return torch.device(name)


def check_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"config field `train.run_dir`: cannot write to {str(path)!r} ({e.strerror}); "
            "choose a writable folder with --set train.run_dir=PATH"
        ) from e


class Trainer:
    """One training job. Under several processes (launched by deepspeed, srun, mpirun or torchrun)
    it validates the layout, joins the process group, shards the model and steps through DeepSpeed;
    in one process it steps with plain PyTorch. ``train_data`` replaces the shard loader (tests)."""

    def __init__(self, cfg: JobConfig, *, train_data=None):
        self.cfg = cfg
        t, par = cfg.train, cfg.parallel
        # everything that can be checked without a process group is checked before one is created
        cfg.validate(check_paths=train_data is None)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        layout = Layout.from_config(par, world)
        layout.validate_model(cfg.model.num_heads, cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.model.moe.num_experts)
        check_tp_divisibility(cfg.model, par.tp, par.expert_tp)
        use_deepspeed = par.engine == "deepspeed" or (par.engine == "auto" and world > 1)
        if world > 1 and not use_deepspeed:
            raise ConfigError("config field `parallel.engine`: a multi-process job steps through DeepSpeed; set it to auto or deepspeed")
        self.run_dir = t.resolved_run_dir
        check_run_dir(self.run_dir)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = _device(t.device)
        if self.device.type == "cpu" and t.cpu_keep_freed_memory:
            keep_freed_memory()
        self.dtype = torch.bfloat16 if t.resolved_dtype(self.device.type) == "bfloat16" else torch.float32
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32
        self.tokenizer = Tokenizer(cfg.data.tokenizer)
        check_vocab_size(self.tokenizer, cfg.model.vocab_size)

        self.state: ParallelState | None = None
        self.rank = 0
        bound = None
        if use_deepspeed:
            # polling only pays when each local rank's threads have cores of their own
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            set_busy_wait(par.busy_wait and local_ranks * torch.get_num_threads() <= cores)
            self.rank, _ = init_from_env(timeout_s=t.collective_timeout_s)
            if self.device.type == "cpu" and par.bind_cores and "LOCAL_RANK" in os.environ:
                # gloo's threads exist now and are bound too; groups made later inherit the binding
                bound = bind_local_rank(int(os.environ["LOCAL_RANK"]), local_ranks, torch.get_num_threads())
            self.state = ParallelState.build(layout)
        self.is_main = self.rank == 0
        self.dp_rank = self.state.rank_in("dp") if self.state else 0
        self.dp_size = self.state.size("dp") if self.state else 1
        if self.is_main and self.state is not None:
            log.info("parallel layout: %s", self.state.describe())

        torch.manual_seed(t.seed)
        model = build_model(cfg.model)
        self.total_params, self.active_params = count_parameters(model)
        self.model_flops = TrainFlops.of(cfg.model, self.active_params)
        self.peak_tflops = peak_tflops(self.device, self.dtype, t.tf32, t.peak_tflops)
        init = load_consolidated(t.init_from) if t.init_from else None
        if init is not None:
            model.load_state_dict(init[0])
        if self.state is not None:
            parallelize(model, self.state, expert_tp=par.expert_tp)
        model.to(self.device)
        if use_deepspeed:
            self.engine = DeepSpeedEngine(model, t, cfg.data, par, self.state)
        else:
            self.engine = TorchEngine(model, t)
        self.model = self.engine.module
        if bound is not None:  # every process group (ours, DeepSpeed's) exists by now
            n_idle = idle_io_threads()
            log.debug("rank %d: bound to cores %s; %d gloo I/O threads under SCHED_IDLE", self.rank, bound, n_idle)
        self.step = 0
        if init is not None:
            self._continue_from(init)
        torch.manual_seed(t.seed + 1 + self.dp_rank)  # per-replica randomness (noise, dropout) after the shared init
        self.train_loader = train_data if train_data is not None else build_loader(
            cfg.data, split="train", dp_rank=self.dp_rank, dp_size=self.dp_size, tokenizer=self.tokenizer,
            pin_memory=self.device.type == "cuda",
        )
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=t.keep_checkpoints)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main, tensorboard=t.tensorboard)
        self.bad_counts: dict[str, int] = {}
        self.run_stats: list[RoutingStats] | None = None
        self.nonfinite = NonFiniteTracker(t.max_nonfinite_steps)
        moe = cfg.model.moe
        self.collapse = CollapseMonitor(cfg.model.moe_layers, MODALITY_NAMES, moe.num_experts, share=t.collapse_share,
                                        window=t.collapse_window, partition=moe.modality_partition)
        self.watchdog: Watchdog | None = None

    def _continue_from(self, init) -> None:
        """After ``train.init_from``: restore the step, the LR schedule and, when the consolidated
        checkpoint has them, Adam's moments, sharded for this layout exactly like the weights."""
        _, moments, info = init
        self.step = int(info["step"])
        opt = self.engine.optimizer
        if moments is not None and isinstance(getattr(opt, "state", None), dict) and self.cfg.parallel.zero_stage == 0:
            shards = {}
            for kind in ("exp_avg", "exp_avg_sq"):
                holder = build_model(self.cfg.model)
                with torch.no_grad():
                    for name, p in holder.named_parameters():
                        p.copy_(moments[kind][name])
                if self.state is not None:
                    parallelize(holder, self.state, expert_tp=self.cfg.parallel.expert_tp)
                shards[kind] = dict(holder.named_parameters())
            for name, p in self.model.named_parameters():
                opt.state[p] = {
                    "step": moments["step"][name].reshape(()).clone(),
                    "exp_avg": shards["exp_avg"][name].detach().to(p.device).clone(),
                    "exp_avg_sq": shards["exp_avg_sq"][name].detach().to(p.device).clone(),
                }
        elif self.is_main:
            log.warning("train.init_from %s: optimizer moments not restored (not in the checkpoint, or ZeRO %d); Adam restarts",
                        self.cfg.train.init_from, self.cfg.parallel.zero_stage)
        self.engine.set_schedule_step(self.step)
        if self.is_main:
            log.info("initialised from %s (step %d of %s)", self.cfg.train.init_from, self.step, info.get("layout"))

    # ---- collectives over the data-parallel group (no-ops in one process) --------------------

    def _dp_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is None or self.dp_size == 1:
            return x
        x = x.detach().clone().to("cuda" if dist.get_backend() == "nccl" else "cpu")
        polled(dist.all_reduce, x, group=self.state.dp_group)
        return x.to(self.device)

    def _dp_min(self, n: int) -> int:
        if self.state is None or self.dp_size == 1:
            return n
        x = torch.tensor([n], dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.state.dp_group)
        return int(x)

    def _reduce_stats(self, stats: list[RoutingStats]) -> list[RoutingStats]:
        """Sum each layer's routing stats over the data-parallel replicas (in place)."""
        if self.state is not None and self.dp_size > 1:
            for s in stats:
                for x in s.tensors():
                    x.copy_(self._dp_sum(x))
        return stats

    def _barrier(self) -> None:
        if self.state is not None:
            dist.barrier()

    # ---- checkpoints ------------------------------------------------------------------------

    def _layout_meta(self) -> dict:
        p = self.cfg.parallel
        return {"world": int(os.environ.get("WORLD_SIZE", "1")) if self.state else 1,
                "tp": p.tp, "ep": p.ep, "expert_tp": p.expert_tp, "zero_stage": p.zero_stage,
                "engine": type(self.engine).__name__}

    def _stem(self) -> str:
        return f"rank{self.rank:05d}"

    def save(self) -> Path:
        state = {
            "model": self.model.state_dict(),
            "engine": self.engine.state_dict(),
            "trainer": {
                "step": self.step,
                "rng": rng_state(),
                "data": self.train_loader.state_dict(),
                "bad_counts": dict(self.bad_counts),
                "nonfinite": self.nonfinite.state_dict(),
                "collapse": self.collapse.state_dict(),
            },
        }
        state["named_optimizer"] = named_optimizer_state(self.model, self.engine.optimizer)
        tp_specs = tp_shard_specs(self.model) if self.state is not None and self.state.size("tp") > 1 else {}
        meta = {"config": self.cfg.to_yaml(), "layout": self._layout_meta(), "shards": shard_layout_meta(self.model, tp_specs)}
        return self.checkpoints.save(self.step, {self._stem(): state}, meta=meta, rank=self.rank, barrier=self._barrier)

    def resume(self) -> bool:
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        manifest = CheckpointManager.verify(latest)
        saved = manifest["meta"].get("layout")
        if saved != self._layout_meta():
            raise CheckpointError(
                f"checkpoint {latest} was written with layout {saved}, this job runs {self._layout_meta()}; "
                "resume with the same layout, or start a new run folder from a consolidated checkpoint "
                "(modalmoe checkpoint consolidate)"
            )
        states, _ = CheckpointManager.load(latest, map_location=self.device, stems=[self._stem()])
        st = states[self._stem()]
        self.model.load_state_dict(st["model"])
        self.engine.load_state_dict(st["engine"])
        tr = st["trainer"]
        self.train_loader.load_state_dict(tr["data"])
        self.bad_counts = dict(tr["bad_counts"])
        self.nonfinite.load_state_dict(tr.get("nonfinite", {}))
        self.collapse.load_state_dict(tr.get("collapse", {}))
        set_rng_state(tr["rng"])
        self.step = int(tr["step"])
        if self.is_main:
            log.info("resumed from %s at step %d", latest, self.step)
        return True

    # ---- the loop ---------------------------------------------------------------------------

    def _autocast(self):
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, batch) -> tuple[dict[str, float], list[RoutingStats], int]:
        """One optimizer step. The caption loss is normalised by the global number of caption
        tokens, so every layout computes the gradient of the same global-batch objective."""
        batch = batch.to(self.device, non_blocking=True)  # from pinned memory on CUDA: the copy overlaps
        with self._autocast():
            out = self.model(batch)
        n_local = out.num_text_tokens.detach().float()
        nonfinite = (~torch.isfinite(out.loss.detach().float())).float()
        extra = (out.loss - out.caption_loss).detach().float()
        contrastive = out.contrastive_loss.detach().float() if out.contrastive_loss is not None else n_local.new_zeros(())
        # one all-reduce for [caption tokens, caption nll sum, real tokens, replicas with a non-finite
        # loss, contrastive loss], then one host copy for the skip decision and every logged scalar
        totals = self._dp_sum(torch.stack([n_local, out.caption_loss.detach().float() * n_local,
                                           batch.mask.sum().float(), nonfinite, contrastive]))
        host = torch.cat([totals, torch.stack([extra, out.aux_loss.detach().float(), out.loss.detach().float()])]).tolist()
        n_tok, nll_sum, real_tokens, n_nonfinite, contrastive_sum, extra_h, aux_h, loss_h = host
        if n_nonfinite > 0:  # every rank sees the same sum (TP peers share the loss): all skip
            return {"loss": loss_h, "skipped": 1.0}, out.moe_stats, int(real_tokens)
        n_global = max(n_tok, 1.0)
        scale = n_local * self.dp_size / n_global
        loss = out.caption_loss * scale + (out.loss - out.caption_loss)
        self.engine.backward(loss)
        grad_norm = self.engine.step()  # a non-finite (global) norm: the engine dropped the grads
        caption = nll_sum / n_global
        scalars = {
            "loss": caption + extra_h,
            "caption_loss": caption,
            "aux_loss": aux_h,
            "grad_norm": grad_norm,
            "skipped": float(not math.isfinite(grad_norm)),
        }
        if out.contrastive_loss is not None:
            scalars["contrastive_loss"] = contrastive_sum / self.dp_size
        return scalars, out.moe_stats, int(real_tokens)

    def _window_metrics(self, sums: dict[str, float], n: int, stats: list[RoutingStats], tokens: int, seconds: float) -> dict:
        m = {k: v / n for k, v in sums.items()}
        m["lr"] = self.engine.lr
        m["tokens_per_s"] = tokens / max(seconds, 1e-9)
        # model FLOPs of the window's samples (every dp replica's), shared by every rank of the job
        samples = n * self.cfg.data.batch_size * self.dp_size
        flops = self.model_flops.for_window(tokens, samples, self.cfg.model.max_text_len)
        world = dist.get_world_size() if dist.is_initialized() else 1
        m.update(throughput_metrics(flops, seconds, world, self.peak_tflops))
        if stats:
            m["balance"] = sum(s.balance() for s in stats) / len(stats)
            m["routing/specialisation"] = sum(specialisation_index(s.load_ME) for s in stats) / len(stats)
            for mi, name in enumerate(MODALITY_NAMES):
                m[f"routing/entropy/{name}"] = sum(float(s.entropy_M()[mi]) for s in stats) / len(stats)
                m[f"routing/dropped/{name}"] = sum(float(s.dropped_fraction_M()[mi]) for s in stats) / len(stats)
            for layer, s in zip(self.cfg.model.moe_layers, stats):
                for k, v in s.summary(MODALITY_NAMES).items():
                    m[f"layer{layer}/{k}"] = v
        bad = self._dp_sum(torch.tensor([self.bad_counts.get(r, 0) for r in BAD_REASONS], dtype=torch.long))
        for reason, count in zip(BAD_REASONS, bad.tolist()):
            if count:
                m[f"data/bad/{reason}"] = count
        m["nonfinite/skipped"] = self.nonfinite.take_window()
        m["nonfinite/total"] = self.nonfinite.total
        m.update(self.collapse.update(self.step, stats))
        return m

    def _skip(self, scalars: dict[str, float], batch) -> None:
        """A step skipped for a non-finite loss or gradient: count it; too many in a row save the
        state (the last finite weights) for inspection and stop the job."""
        stop = self.nonfinite.record(True)
        what = f"loss {scalars.get('loss', float('nan')):.4g}, grad norm {scalars.get('grad_norm', float('nan')):.4g}"
        if self.is_main:
            log.warning("step %d skipped: non-finite %s (%d in a row, %d in all)", self.step, what,
                        self.nonfinite.in_row, self.nonfinite.total)
        if not stop:
            return
        ckpt = self.save()
        keys = list(getattr(batch, "keys", []))[:4]
        raise NonFiniteError(
            f"{self.nonfinite.in_row} steps in a row (train.max_nonfinite_steps) had a non-finite loss or gradient, "
            f"the last at step {self.step} ({what}; batch keys {keys}); the last finite state is saved in {ckpt} for "
            "inspection. Lower train.lr or raise train.warmup_steps, check the data, then resume (the run folder "
            "continues from there); or raise train.max_nonfinite_steps"
        )

    def fit(self) -> dict:
        """Train to ``train.steps``. In a multi-process job a watchdog runs meanwhile (README, "When
        things go wrong"): a lost or failed peer ends this rank with PeerLostError naming it."""
        self.watchdog = Watchdog.for_job(self.cfg.train.heartbeat_timeout_s)
        if self.watchdog is not None:
            self.watchdog.start()
        try:
            summary = self._fit()
        except Preempted:
            if self.watchdog is not None:
                self.watchdog.stop()
            raise
        except BaseException as exc:
            self._on_failure(exc)
            raise
        if self.watchdog is not None:
            self.watchdog.stop()
        return summary

    def _on_failure(self, exc: BaseException) -> None:
        """A collective that failed because a peer died becomes PeerLostError naming that peer; any
        other error is announced to the peers (so they stop now) and propagates unchanged."""
        wd = self.watchdog
        if wd is None:
            return
        verdict = wd.diagnose(wait_s=wd.timeout_s + 2 * wd.interval_s) if looks_distributed(exc) else None
        if verdict is None:
            wd.fail(f"{type(exc).__name__}: {describe(exc)}"[:400])
            return
        wd.stop(done=False)
        log.error("%s", verdict)
        first = str(exc).splitlines()[0].split(". ")[0][:200] if str(exc) else type(exc).__name__
        raise PeerLostError(
            f"{verdict}; rank {self.rank} stops too (its collective failed: {first}). Look at that rank's log "
            "for why it died; rerunning the job resumes from the latest checkpoint"
        ) from exc

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
        sums: dict[str, float] = {}
        window: list[RoutingStats] = []
        n, tokens, t0 = 0, 0, time.perf_counter()
        self.model.train()
        data = iter(self.train_loader)
        while self.step < t.steps:
            batch = next(data, None)
            if batch is None:
                data = iter(self.train_loader)
                batch = next(data)
            for reason, c in getattr(batch, "bad_counts", {}).items():
                self.bad_counts[reason] = self.bad_counts.get(reason, 0) + c
            scalars, stats, ntok = self.train_step(batch)
            self.step += 1
            if scalars.pop("skipped", 0.0):
                self._skip(scalars, batch)
            else:
                self.nonfinite.record(False)
                n += 1
                tokens += ntok
                for k, v in scalars.items():
                    sums[k] = sums.get(k, 0.0) + v
                window = stats if not window else [a + b for a, b in zip(window, stats)]
            if self.step % t.log_every == 0 or self.step == t.steps:
                window = self._reduce_stats(window)
                m = self._window_metrics(sums, n, window, tokens, time.perf_counter() - t0)
                self.metrics.write(self.step, "train", m)
                if progress is not None:
                    progress.set_postfix(loss=f"{m.get('loss', float('nan')):.3f}", tok_s=f"{m['tokens_per_s']:.0f}", bal=f"{m.get('balance', 1.0):.2f}",
                                         **({"mfu": f"{m['mfu']:.1%}"} if "mfu" in m else {}))
                self.run_stats = window or self.run_stats
                sums, window, n, tokens, t0 = {}, [], 0, 0, time.perf_counter()
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
            if t.report and self.run_stats:
                write_routing_report(self.run_dir, self.run_stats, self.cfg.model.moe_layers, MODALITY_NAMES)
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
            dp_sum=self._dp_sum, dp_min=self._dp_min,
        )
        self.metrics.write(self.step, "eval", result)
        if self.is_main:
            log.info(
                "eval at step %d: caption loss %.3f (unigram baseline %.3f), retrieval R@1 %.3f R@5 %.3f (chance %.3f / %.3f)",
                self.step, result["caption_loss"], result["unigram_loss"], result.get("retrieval_r1", float("nan")),
                result.get("retrieval_r5", float("nan")), result.get("retrieval_chance_r1", float("nan")),
                result.get("retrieval_chance_r5", float("nan")),
            )
        return result
