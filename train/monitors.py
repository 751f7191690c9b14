"""What the loop watches between log steps: the metrics window (scalars, tokens, routing stats),
bad-sample counts, non-finite (skipped) steps, the router-collapse alarm (``health``) and the
dropless imbalance guard (:class:`ImbalanceGuard`). Each logging step turns them into one metrics
record; they are saved and restored with the checkpoint.
"""

from __future__ import annotations

import time

import torch

from ..runtime.data.counts import BAD_REASONS
from ..runtime.faults import NonFiniteError, NonFiniteTracker
from ..runtime.metrics import get_logger
from ..runtime.modality import MODALITY_NAMES
from ..runtime.moe.stats import RoutingStats, specialisation_index
from .flops import TrainFlops, throughput_metrics
from .health import CollapseMonitor
from .job_config import JobConfig
from .process import JobProcess

__all__ = ["Monitors", "ImbalanceGuard"]

log = get_logger("modalmoe.train")


def _what(scalars: dict[str, float]) -> str:
    return f"loss {scalars.get('loss', float('nan')):.4g}, grad norm {scalars.get('grad_norm', float('nan')):.4g}"


class ImbalanceGuard:
    """Warns once per (layer, expert) when, in one step, an expert's routed rows exceed
    ``moe.imbalance_warn_ratio`` × the mean rows per expert: the dropless layer's memory follows its
    busiest expert, which is how a dropless run runs out of memory in its first hundred steps.

    Checked here rather than in the layer: the layer's host copy holds only its own rank's rows per
    local expert (under EP not the mean over all experts) and the layer knows no name, while every
    step's routing stats pass through :meth:`Monitors.record` on the device. So each step adds a few
    device ops and no host sync (the per-step ratio's running maximum stays on the device), and the
    log step, which copies the window's stats to the host anyway, reads that maximum once.
    Per rank, before the data-parallel sum: the rank whose expert is crowded is the one at risk."""

    def __init__(self, layers: list[int], warn_ratio: float, cap_ratio: float | None, rank: int, world: int):
        self.layers, self.warn_ratio, self.cap_ratio = layers, warn_ratio, cap_ratio
        self.where = f" on rank {rank}" if world > 1 else ""
        self.peak_LE: torch.Tensor | None = None  # max over the window's steps of rows / mean rows
        self.warned: set[tuple[int, int]] = set()

    def record(self, stats: list[RoutingStats]) -> None:
        if self.warn_ratio <= 0 or not stats:
            return
        load_LE = torch.stack([s.load_ME.detach().sum(0) for s in stats]).float()
        ratio_LE = load_LE / load_LE.mean(1, keepdim=True).clamp_min(1e-9)
        self.peak_LE = ratio_LE if self.peak_LE is None else torch.maximum(self.peak_LE, ratio_LE)

    def check(self, first: int, step: int) -> dict[str, float]:
        """Warn for the steps ``[first, step]``; returns each layer's peak ratio (``layer<i>/imbalance``)."""
        if self.peak_LE is None:
            return {}
        peak = self.peak_LE.tolist()
        self.peak_LE = None
        for layer, ratios in zip(self.layers, peak):
            for e, r in enumerate(ratios):
                if r <= self.warn_ratio or (layer, e) in self.warned:
                    continue
                self.warned.add((layer, e))
                fix = (f"rows beyond {self.cap_ratio:g}x the mean are being dropped (model.moe.imbalance_cap_ratio; "
                       "see routing/dropped)" if self.cap_ratio is not None else
                       "set model.moe.imbalance_cap_ratio (e.g. 2.0) to drop the rows beyond that multiple of the "
                       "mean (counted in routing/dropped) before they run out of memory")
                log.warning(
                    "dropless imbalance: layer %d (layers.%d.ffn), expert %d received %.2fx the mean rows per "
                    "expert in one step of steps %d-%d%s (> model.moe.imbalance_warn_ratio=%g); %s, or raise "
                    "model.moe.lb_coef / set a capacity_factor",
                    layer, layer, e, r, first, step, self.where, self.warn_ratio, fix,
                )
        return {f"layer{layer}/imbalance": max(ratios) for layer, ratios in zip(self.layers, peak)}


class Monitors:
    """The window since the last log step and the counters that outlive it."""

    def __init__(self, cfg: JobConfig, process: JobProcess, flops: TrainFlops, peak_tflops: float | None):
        t, moe = cfg.train, cfg.model.moe
        self.cfg, self.process = cfg, process
        self.flops, self.peak_tflops = flops, peak_tflops
        self.bad_counts: dict[str, int] = {}
        self.nonfinite = NonFiniteTracker(t.max_nonfinite_steps)
        self.collapse = CollapseMonitor(cfg.model.moe_layers, MODALITY_NAMES, moe.num_experts, share=t.collapse_share,
                                        window=t.collapse_window, partition=moe.modality_partition)
        self.imbalance = ImbalanceGuard(cfg.model.moe_layers, moe.imbalance_warn_ratio, moe.imbalance_cap_ratio,
                                        process.rank, process.world)
        self.run_stats: list[RoutingStats] | None = None  # the last logged window's routing stats (the report)
        self.reset_window()

    def reset_window(self) -> None:
        self.sums: dict[str, float] = {}
        self.stats: list[RoutingStats] = []
        self.steps, self.tokens, self.t0 = 0, 0, time.perf_counter()

    # ---- each step ----------------------------------------------------------------------------

    def count_bad(self, batch) -> None:
        for reason, c in getattr(batch, "bad_counts", {}).items():
            self.bad_counts[reason] = self.bad_counts.get(reason, 0) + c

    def record(self, scalars: dict[str, float], stats: list[RoutingStats], tokens: int) -> None:
        """A step that updated the weights."""
        self.nonfinite.record(False)
        self.steps += 1
        self.tokens += tokens
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.imbalance.record(stats)
        self.stats = stats if not self.stats else [a + b for a, b in zip(self.stats, stats)]

    def skip(self, step: int, scalars: dict[str, float]) -> bool:
        """A step skipped for a non-finite loss or gradient; True when too many came in a row."""
        stop = self.nonfinite.record(True)
        if self.process.is_main:
            log.warning("step %d skipped: non-finite %s (%d in a row, %d in all)", step, _what(scalars),
                        self.nonfinite.in_row, self.nonfinite.total)
        return stop

    def nonfinite_error(self, step: int, scalars: dict[str, float], batch, checkpoint) -> NonFiniteError:
        keys = list(getattr(batch, "keys", []))[:4]
        return NonFiniteError(
            f"{self.nonfinite.in_row} steps in a row (train.max_nonfinite_steps) had a non-finite loss or gradient, "
            f"the last at step {step} ({_what(scalars)}; batch keys {keys}); the last finite state is saved in "
            f"{checkpoint} for inspection. Lower train.lr or raise train.warmup_steps, check the data, then resume "
            "(the run folder continues from there); or raise train.max_nonfinite_steps"
        )

    # ---- each log step ------------------------------------------------------------------------

    def window_metrics(self, step: int, lr: float) -> dict:
        """The window's record (collectives over the data-parallel group: every rank calls it), then a new window."""
        stats = self._reduce(self.stats)
        seconds = time.perf_counter() - self.t0
        n = self.steps
        m = {k: v / n for k, v in self.sums.items()}
        m["lr"] = lr
        m["tokens_per_s"] = self.tokens / max(seconds, 1e-9)
        # model FLOPs of the window's samples (every dp replica's), shared by every rank of the job
        samples = n * self.cfg.data.batch_size * self.process.dp_size
        flops = self.flops.for_window(self.tokens, samples, self.cfg.model.max_text_len)
        m.update(throughput_metrics(flops, seconds, self.process.world, self.peak_tflops))
        if stats:
            m.update(self._routing(stats))
        bad = self.process.dp_sum(torch.tensor([self.bad_counts.get(r, 0) for r in BAD_REASONS], dtype=torch.long))
        for reason, count in zip(BAD_REASONS, bad.tolist()):
            if count:
                m[f"data/bad/{reason}"] = count
        m["nonfinite/skipped"] = self.nonfinite.take_window()
        m["nonfinite/total"] = self.nonfinite.total
        m.update(self.imbalance.check(self.collapse.last_step + 1, step))
        m.update(self.collapse.update(step, stats))
        self.run_stats = stats or self.run_stats
        self.reset_window()
        return m

    def _reduce(self, stats: list[RoutingStats]) -> list[RoutingStats]:
        """Sum each layer's routing stats over the data-parallel replicas (in place)."""
        if self.process.dp_size > 1:
            for s in stats:
                for x in s.tensors():
                    x.copy_(self.process.dp_sum(x))
        return stats

    def _routing(self, stats: list[RoutingStats]) -> dict[str, float]:
        m = {
            "balance": sum(s.balance() for s in stats) / len(stats),
            "routing/specialisation": sum(specialisation_index(s.load_ME) for s in stats) / len(stats),
        }
        for mi, name in enumerate(MODALITY_NAMES):
            m[f"routing/entropy/{name}"] = sum(float(s.entropy_M()[mi]) for s in stats) / len(stats)
            m[f"routing/dropped/{name}"] = sum(float(s.dropped_fraction_M()[mi]) for s in stats) / len(stats)
        for layer, s in zip(self.cfg.model.moe_layers, stats):
            for k, v in s.summary(MODALITY_NAMES).items():
                m[f"layer{layer}/{k}"] = v
        return m

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"bad_counts": dict(self.bad_counts), "nonfinite": self.nonfinite.state_dict(),
                "collapse": self.collapse.state_dict(), "imbalance_warned": sorted(self.imbalance.warned)}

    def load_state_dict(self, sd: dict) -> None:
        self.bad_counts = dict(sd["bad_counts"])
        self.nonfinite.load_state_dict(sd.get("nonfinite", {}))
        self.collapse.load_state_dict(sd.get("collapse", {}))
        self.imbalance.warned = {(int(a), int(b)) for a, b in sd.get("imbalance_warned", [])}
