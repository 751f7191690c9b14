"""Saving and restoring one training job.

A checkpoint holds every rank's shard (model, engine, loop state) and the layout it was written
with; ``resume`` continues a run folder in that same layout. ``train.init_from`` starts a run of
any layout from a consolidated checkpoint instead: the weights (each rank reads only the slices
its sharded model holds), then the step, the LR schedule and, when saved, Adam's moments, sliced
exactly like the weights.
"""

from __future__ import annotations

from pathlib import Path

from ..runtime.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state
from ..runtime.consolidate import Consolidated, named_optimizer_state, shard_layout_meta
from ..runtime.metrics import get_logger
from ..runtime.tensor_parallel import tp_shard_specs
from .job_config import JobConfig
from .monitors import Monitors
from .process import JobProcess

__all__ = ["Checkpointing", "continue_from", "load_init"]

log = get_logger("modalmoe.train")


class Checkpointing:
    """This rank's checkpoints in ``run_dir/checkpoints``."""

    def __init__(self, cfg: JobConfig, run_dir: Path, process: JobProcess, engine):
        self.cfg, self.process, self.engine = cfg, process, engine
        self.manager = CheckpointManager(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)

    @property
    def stem(self) -> str:
        return f"rank{self.process.rank:05d}"

    def layout_meta(self) -> dict:
        p = self.cfg.parallel
        return {"world": self.process.world, "tp": p.tp, "ep": p.ep, "expert_tp": p.expert_tp,
                "zero_stage": p.zero_stage, "engine": type(self.engine).__name__}

    def latest(self) -> Path | None:
        return self.manager.latest()

    def save(self, step: int, data, monitors: Monitors) -> Path:
        model, state = self.engine.module, self.process.state
        rank_state = {
            "model": model.state_dict(),
            "engine": self.engine.state_dict(),
            "trainer": {"step": step, "rng": rng_state(), "data": data.state_dict(), **monitors.state_dict()},
            "named_optimizer": named_optimizer_state(model, self.engine.optimizer),
        }
        tp_specs = tp_shard_specs(model) if state is not None and state.size("tp") > 1 else {}
        meta = {"config": self.cfg.to_yaml(), "layout": self.layout_meta(), "shards": shard_layout_meta(model, tp_specs)}
        return self.manager.save(step, {self.stem: rank_state}, meta=meta, rank=self.process.rank, barrier=self.process.barrier)

    def resume(self, data, monitors: Monitors) -> int | None:
        """Restore the latest checkpoint of the run folder; its step, or None when there is none."""
        latest = self.manager.latest()
        if latest is None:
            return None
        saved = CheckpointManager.verify(latest)["meta"].get("layout")
        if saved != self.layout_meta():
            raise CheckpointError(
                f"checkpoint {latest} was written with layout {saved}, this job runs {self.layout_meta()}; "
                "resume with the same layout, or start a new run folder from a consolidated checkpoint "
                "(modalmoe checkpoint consolidate)"
            )
        states, _ = CheckpointManager.load(latest, map_location=self.process.device, stems=[self.stem])
        st = states[self.stem]
        self.engine.module.load_state_dict(st["model"])
        self.engine.load_state_dict(st["engine"])
        tr = st["trainer"]
        data.load_state_dict(tr["data"])
        monitors.load_state_dict(tr)
        set_rng_state(tr["rng"])
        if self.process.is_main:
            log.info("resumed from %s at step %d", latest, int(tr["step"]))
        return int(tr["step"])


def load_init(cfg: JobConfig) -> Consolidated | None:
    """The consolidated checkpoint ``train.init_from`` names, opened for sliced reads, or None."""
    return Consolidated(cfg.train.init_from) if cfg.train.init_from else None


def continue_from(init: Consolidated, cfg: JobConfig, engine, process: JobProcess) -> int:
    """After ``train.init_from`` loaded the weights: put the LR schedule at the saved step and,
    when the checkpoint has them, restore Adam's moments, this rank's slices of them read by the
    placements of its own (sharded) parameters, exactly like the weights. Returns the step."""
    info = init.info
    step = int(info["step"])
    opt = engine.optimizer
    adamw = cfg.train.optimizer == "adamw"  # Adafactor's factored statistics are not saved: they restart
    if adamw and init.has_moments and isinstance(getattr(opt, "state", None), dict) and cfg.parallel.zero_stage == 0:
        moments = init.moments(engine.module)
        for name, p in engine.module.named_parameters():
            m = moments[name]
            opt.state[p] = {
                "step": m["step"].reshape(()).clone(),
                "exp_avg": m["exp_avg"].to(p.device),
                "exp_avg_sq": m["exp_avg_sq"].to(p.device),
            }
    elif process.is_main:
        log.warning("train.init_from %s: optimizer moments not restored (not in the checkpoint, ZeRO %d, or %s); "
                    "the optimizer restarts", cfg.train.init_from, cfg.parallel.zero_stage, cfg.train.optimizer)
    engine.set_schedule_step(step)
    if process.is_main:
        log.info("initialised from %s (step %d of %s)", cfg.train.init_from, step, info.get("layout"))
    return step
