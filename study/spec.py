"""The study file: a YAML grid over the ordinary training config.

A study names a base training config (a preset or a YAML path) plus overrides for every run, the
data sets, the seeds, and the arms: each arm is a set of training-config overrides, optionally
trained longer (``steps_mult``), on another data set (``data``), or with its per-modality
load-balance target derived from another arm's measured expert utilisation (``target_from``).
Every (arm, seed) is one ordinary training run. ``--set study.KEY=VALUE`` overrides study fields,
any other ``--set KEY=VALUE`` overrides the training config of every run (arms' own settings win).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..runtime.config import ConfigError, apply_overrides, check, from_dict, load_yaml
from ..train.job_config import JobConfig, load_job_config
from .separation import SeparationSpec
from .shifted_data import ShiftSpec

__all__ = [
    "STUDY_DIR",
    "DataSpec",
    "ProbeSpec",
    "SeparationSpec",
    "ArmSpec",
    "TransferSpec",
    "ExperimentSpec",
    "StudySpec",
    "study_path",
    "list_studies",
    "load_study",
    "split_overrides",
    "run_dir_name",
]

STUDY_DIR = Path(__file__).resolve().parent.parent / "launch" / "studies"


def run_dir_name(arm: str, seed: int) -> str:
    """The folder of one (arm, seed) run under ``<study>/runs/``."""
    return f"{arm}-s{seed}"


@dataclass
class DataSpec:
    """One data set: the embedded demo set, its shifted variant, or your own shards."""

    kind: Literal["demo", "shifted", "shards"] = "demo"
    seed: int = 0
    n_train: int = 2000
    n_eval: int = 300
    source: str = ""  # shifted: the data set whose tokenizer (vocabulary) it shares
    shift: ShiftSpec = field(default_factory=ShiftSpec)
    train_shards: list[str] = field(default_factory=list)  # shards: your own
    eval_shards: list[str] = field(default_factory=list)
    tokenizer: str = ""


@dataclass
class ProbeSpec:
    """The fixed probe tokens: the first ``batches`` eval batches of each data set, same for every run."""

    batches: int = 4
    batch_size: int = 32
    cka_tokens: int = 512  # tokens fed through every expert for CKA (evenly spaced over the probe)
    datasets: list[str] = field(default_factory=list)  # default: every data set of the study


@dataclass
class ArmSpec:
    set: dict[str, Any] = field(default_factory=dict)  # training-config overrides, dotted keys
    steps_mult: float = 1.0  # train.steps = study steps × this
    data: str = ""  # the data set it trains on (default: the study's first)
    target_from: str = ""  # lb_modality_target ← this arm's measured per-modality utilisation
    label: str = ""  # a longer name for the report


@dataclass
class TransferSpec:
    """Routing learned on the training set, evaluated on ``to``; ``trained_on_target`` names, per
    transferred arm, the arm trained on ``to`` itself (the in-distribution reference)."""

    to: str = ""
    arms: list[str] = field(default_factory=list)
    trained_on_target: dict[str, str] = field(default_factory=dict)


@dataclass
class ExperimentSpec:
    title: str = ""
    question: str = ""
    # compare | dynamics | cka | transfer | separation (the synthetic router-capacity experiment, the
    # study's `separation` block) | compute (quality vs active FLOPs per modality) | concepts (expert/concept MI)
    kind: Literal["compare", "dynamics", "cka", "transfer", "separation", "compute", "concepts"] = "compare"
    arms: list[str] = field(default_factory=list)


@dataclass
class StudySpec:
    name: str = ""
    description: str = ""
    base: str = "smoke"  # preset name (launch/configs) or YAML path
    set: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 300
    track_points: int = 5  # checkpoints per run kept and probed for the curves over steps
    keep_tracked_checkpoints: bool = False  # False: once probed, only each run's final checkpoint stays
    data: dict[str, DataSpec] = field(default_factory=lambda: {"source": DataSpec()})
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    arms: dict[str, ArmSpec] = field(default_factory=dict)
    reference: str = ""  # routing similarity is measured against this arm (same seed)
    transfer: TransferSpec | None = None
    separation: SeparationSpec | None = None  # the synthetic experiment, run before the trainings
    experiments: list[ExperimentSpec] = field(default_factory=list)
    job_overrides: list[str] = field(default_factory=list)  # from the command line, for every run

    @property
    def primary_data(self) -> str:
        return next(iter(self.data))

    def arm_data(self, arm: str) -> str:
        return self.arms[arm].data or self.primary_data

    def arm_steps(self, arm: str) -> int:
        return max(1, round(self.steps * self.arms[arm].steps_mult))

    def probe_datasets(self) -> list[str]:
        return list(self.probe.datasets or self.data)

    def validate(self) -> StudySpec:
        check(bool(self.name) and "/" not in self.name, "study.name", f"must be a non-empty name without '/', got {self.name!r}")
        check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "study.seeds", f"must be distinct integers, got {self.seeds}")
        check(self.steps > 0, "study.steps", f"must be > 0, got {self.steps}")
        check(self.track_points >= 1, "study.track_points", f"must be >= 1, got {self.track_points}")
        check(bool(self.data), "study.data", "needs at least one data set")
        check(bool(self.arms), "study.arms", "needs at least one arm")
        for name, d in self.data.items():
            if d.kind == "shifted":
                check(d.source in self.data and self.data[d.source].kind != "shifted", f"study.data.{name}.source",
                      f"must name a demo or shards data set of this study, got {d.source!r}")
            if d.kind == "shards":
                check(bool(d.train_shards and d.eval_shards and d.tokenizer), f"study.data.{name}",
                      "a shards data set needs train_shards, eval_shards and tokenizer")
            check(d.n_train > 0 and d.n_eval > 0, f"study.data.{name}", "n_train and n_eval must be > 0")
            if d.kind == "shifted":
                d.shift.validate(f"study.data.{name}.shift")
        for p in self.probe.datasets:
            check(p in self.data, "study.probe.datasets", f"{p!r} is not a data set of this study ({list(self.data)})")
        check(self.probe.batches >= 1 and self.probe.batch_size >= 1 and self.probe.cka_tokens >= 2,
              "study.probe", "batches, batch_size must be >= 1 and cka_tokens >= 2")
        for where, values in [("study.set", self.set)] + [(f"study.arms.{n}.set", a.set) for n, a in self.arms.items()]:
            nested = [k for k, v in values.items() if isinstance(v, dict)]
            check(not nested, where, f"takes dotted keys with plain values (model.moe.top_k: 2), got a mapping under {nested}; "
                  "edit a copy of the study file rather than --set study.arms.X.set.a.b=...")
        for name, arm in self.arms.items():
            check(bool(name) and "/" not in name and "-s" not in name, f"study.arms.{name}",
                  "arm names must be non-empty, without '/' or '-s' (run folders are <arm>-s<seed>)")
            check(arm.steps_mult > 0, f"study.arms.{name}.steps_mult", f"must be > 0, got {arm.steps_mult}")
            check(not arm.data or arm.data in self.data, f"study.arms.{name}.data", f"{arm.data!r} is not a data set of this study")
            if arm.target_from:
                src = self.arms.get(arm.target_from)
                check(src is not None, f"study.arms.{name}.target_from", f"{arm.target_from!r} is not an arm of this study")
                check(not src.target_from, f"study.arms.{name}.target_from", "must name an arm without a derived target itself")
        check(not self.reference or self.reference in self.arms, "study.reference", f"{self.reference!r} is not an arm")
        if self.transfer is not None:
            t = self.transfer
            check(t.to in self.data, "study.transfer.to", f"{t.to!r} is not a data set of this study")
            check(t.to in self.probe_datasets(), "study.transfer.to", "must be one of the probe data sets")
            for a in list(t.arms) + list(t.trained_on_target.values()):
                check(a in self.arms, "study.transfer", f"{a!r} is not an arm")
        if self.separation is not None:
            self.separation.validate("study.separation")
        for e in self.experiments:
            for a in e.arms:
                check(a in self.arms, f"study.experiments[{e.title!r}]", f"{a!r} is not an arm")
            check(e.kind != "separation" or self.separation is not None, f"study.experiments[{e.title!r}]",
                  "kind separation needs the study's `separation:` block (its data, ranks and seeds)")
            check(e.kind not in ("compute", "concepts") or bool(e.arms), f"study.experiments[{e.title!r}]",
                  f"kind {e.kind} needs the arms to compare")
        return self

    def job_config(self, arm: str, seed: int, run_dir: Path, data_paths: dict[str, dict], target: list[list[float]] | None) -> JobConfig:
        """The ordinary training config of one (arm, seed) run, not yet validated: the run's Trainer
        validates it, once."""
        from ..launch.presets import preset_path

        base = Path(self.base)
        path = base if base.suffix in (".yaml", ".yml") else preset_path(self.base)
        a = self.arms[arm]
        steps = self.arm_steps(arm)
        every = max(1, steps // self.track_points)
        paths = data_paths[self.arm_data(arm)]
        overrides = _as_overrides(self.set) + list(self.job_overrides) + _as_overrides(a.set) + _as_overrides({
            "train.name": f"{self.name}-{arm}-s{seed}",
            "train.run_dir": str(run_dir),
            "train.seed": seed,
            "data.seed": seed,
            "train.steps": steps,
            "train.resume": True,
            "train.save_every": every,
            "train.eval_every": every,
            "train.keep_checkpoints": self.track_points + 1,
            "data.train_shards": paths["train"],
            "data.eval_shards": paths["eval"],
            "data.tokenizer": paths["tokenizer"],
        })
        if target is not None:
            overrides += _as_overrides({"model.moe.lb_modality_target": target})
        return load_job_config(path, overrides)


def _as_overrides(values: dict[str, Any]) -> list[str]:
    """``{"a.b": v}`` → ``["a.b=<v as JSON>"]`` (JSON is YAML, so the loader reads the same value back)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def list_studies() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def study_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    path = STUDY_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no study named {str(name_or_path)!r} in {STUDY_DIR}; choose one of {list_studies()} or pass a YAML path")
    return path


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(``study.``-prefixed overrides with the prefix stripped, the others: training-config overrides)."""
    study, job = [], []
    for o in overrides:
        (study if o.startswith("study.") else job).append(o.removeprefix("study.") if o.startswith("study.") else o)
    return study, job


def load_study(name_or_path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Study YAML + ``--set`` overrides → a validated StudySpec."""
    study_over, job_over = split_overrides(overrides or [])
    data = load_yaml(study_path(name_or_path))
    apply_overrides(data, study_over)
    try:
        spec = from_dict(StudySpec, data, "study")
    except TypeError as e:
        raise ConfigError(str(e)) from e
    spec.job_overrides = list(spec.job_overrides) + job_over
    return spec.validate()
