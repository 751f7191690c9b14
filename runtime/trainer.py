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

from ..models.config import IMAGE, TEXT
from ..models.params import count_parameters
from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .config import ConfigError
from .data import Tokenizer, build_loader, check_vocab_size
from .evaluate import evaluate
from .job_config import JobConfig
from .metrics import MetricsWriter, get_logger
from .moe.stats import RoutingStats, specialisation_index
from .optim import build_optimizer, lr_lambda
from .report import write_routing_report

__all__ = ["Trainer", "MODALITY_NAMES"]

MODALITY_NAMES = ["image", "text"]
assert (IMAGE, TEXT) == (0, 1)
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
    def __init__(self, cfg: JobConfig, *, dp_rank: int = 0, dp_size: int = 1, is_main: bool = True):
        self.cfg = cfg
        self.dp_rank, self.dp_size, self.is_main = dp_rank, dp_size, is_main
        t = cfg.train
        self.run_dir = t.resolved_run_dir
        check_run_dir(self.run_dir)
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        self.device = _device(t.device)
        self.dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32

        self.tokenizer = Tokenizer(cfg.data.tokenizer)
        check_vocab_size(self.tokenizer, cfg.model.vocab_size)
        self.model = cfg.model.build().to(self.device)
        self.total_params, self.active_params = count_parameters(self.model)
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, t.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio)
        )
        self.train_loader = build_loader(cfg.data, split="train", dp_rank=dp_rank, dp_size=dp_size, tokenizer=self.tokenizer)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=t.keep_checkpoints)
        self.metrics = MetricsWriter(self.run_dir, enabled=is_main, tensorboard=t.tensorboard)
        self.step = 0
        self.bad_counts: dict[str, int] = {}
        self.run_stats: list[RoutingStats] | None = None

    # ---- checkpoints ------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "data": self.train_loader.state_dict(),
                "bad_counts": dict(self.bad_counts),
            },
        }

    def save(self) -> Path:
        return self.checkpoints.save(self.step, self.state(), meta={"config": self.cfg.to_yaml()})

    def resume(self) -> bool:
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        states, _ = CheckpointManager.load(latest, map_location=self.device)
        self.model.load_state_dict(states["model"])
        self.optimizer.load_state_dict(states["optimizer"])
        tr = states["trainer"]
        self.scheduler.load_state_dict(tr["scheduler"])
        self.train_loader.load_state_dict(tr["data"])
        self.bad_counts = dict(tr["bad_counts"])
        set_rng_state(tr["rng"])
        self.step = int(tr["step"])
        log.info("resumed from %s at step %d", latest, self.step)
        return True

    # ---- the loop ---------------------------------------------------------------------------

    def _autocast(self):
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, batch) -> tuple[dict[str, float], list[RoutingStats], int]:
        batch = batch.to(self.device)
        with self._autocast():
            out = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip = self.cfg.train.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        scalars = {
            "loss": float(out.loss.detach()),
            "caption_loss": float(out.caption_loss.detach()),
            "aux_loss": float(out.aux_loss.detach()),
            "grad_norm": float(grad_norm),
        }
        if out.contrastive_loss is not None:
            scalars["contrastive_loss"] = float(out.contrastive_loss.detach())
        tokens = int(batch.mask.sum())
        return scalars, out.moe_stats, tokens

    def _window_metrics(self, sums: dict[str, float], n: int, stats: list[RoutingStats], tokens: int, seconds: float) -> dict:
        m = {k: v / n for k, v in sums.items()}
        m["lr"] = self.scheduler.get_last_lr()[0]
        m["tokens_per_s"] = tokens / max(seconds, 1e-9)
        if stats:
            m["balance"] = sum(s.balance() for s in stats) / len(stats)
            m["routing/specialisation"] = sum(specialisation_index(s.load_ME) for s in stats) / len(stats)
            for mi, name in enumerate(MODALITY_NAMES):
                m[f"routing/entropy/{name}"] = sum(float(s.entropy_M()[mi]) for s in stats) / len(stats)
                m[f"routing/dropped/{name}"] = sum(float(s.dropped_fraction_M()[mi]) for s in stats) / len(stats)
            for layer, s in zip(self.cfg.model.moe_layers, stats):
                for k, v in s.summary(MODALITY_NAMES).items():
                    m[f"layer{layer}/{k}"] = v
        for reason, count in self.bad_counts.items():
            m[f"data/bad/{reason}"] = count
        return m

    def fit(self) -> dict:
        t = self.cfg.train
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            log.info(
                "model: %.2fM parameters, %.2fM active per token; device %s, dtype %s; run folder %s",
                self.total_params / 1e6, self.active_params / 1e6, self.device, t.dtype, self.run_dir,
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
            n += 1
            tokens += ntok
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + v
            window = stats if not window else [a + b for a, b in zip(window, stats)]
            if not math.isfinite(scalars["loss"]):
                raise FloatingPointError(f"non-finite loss {scalars['loss']} at step {self.step}; lower train.lr or check the data")
            if self.step % t.log_every == 0 or self.step == t.steps:
                m = self._window_metrics(sums, n, window, tokens, time.perf_counter() - t0)
                self.metrics.write(self.step, "train", m)
                if progress is not None:
                    progress.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}", bal=f"{m.get('balance', 1.0):.2f}")
                self.run_stats = window
                sums, window, n, tokens, t0 = {}, [], 0, 0, time.perf_counter()
            if progress is not None:
                progress.update(1)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self.evaluate()
            if t.save_every and self.step % t.save_every == 0 and self.step < t.steps:
                self.save()
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
        loader = build_loader(self.cfg.data, split="eval", dp_rank=self.dp_rank, dp_size=self.dp_size, tokenizer=self.tokenizer)
        result = evaluate(
            self.model, loader, self.device, max_batches=t.eval_batches, retrieval_size=t.retrieval_size,
            pad_id=self.tokenizer.pad_id, vocab_size=self.cfg.model.vocab_size, dtype=self.dtype,
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
