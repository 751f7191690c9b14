"""The whole training job's configuration: one typed tree, loaded from YAML plus ``--set`` overrides.

Sections: ``model`` (models.ModelConfig, with its ``moe``), ``data`` (runtime.data.DataConfig),
``train`` (the loop), ``parallel`` (the layout). Each fact has one owner: the image, patch and caption
sizes are the model's, and the data section carries a copy made when the config is built. Validation
only checks, and the job's entry point (the Trainer) runs it once, before anything is built.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..models.config import ModelConfig
from ..runtime.config import ConfigError, apply_overrides, check, from_dict, load_yaml, to_dict
from ..runtime.data.config import SIZE_FIELDS, DataConfig

__all__ = ["TrainConfig", "ParallelConfig", "JobConfig", "load_job_config"]


@dataclass
class TrainConfig:
    name: str = "smoke"
    run_dir: str = ""  # default: runs/<name>
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's; Adafactor has no first moment
    # adamw: two float32 moments per parameter (8 bytes). adafactor (torch.optim.Adafactor): a factored
    # second moment (a row and a column per matrix), about 0 bytes per parameter, for a model whose
    # AdamW state does not fit; its lr is relative to each tensor's RMS (runtime/optim.py)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    grad_clip: float = 1.0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    tf32: bool = True  # on CUDA, float32 matmuls and convolutions may use TF32 tensor cores
    # dense peak TFLOP/s per GPU for the mfu metric: None = look it up by GPU name (train/flops.py), 0 = no mfu
    peak_tflops: float | None = None
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    retrieval_size: int = 100  # images (and their captions) in the retrieval pool
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the run folder's latest checkpoint if there is one
    init_from: str = ""  # a folder from `modalmoe checkpoint consolidate`: start from it, any layout
    progress: bool = True
    tensorboard: bool = True
    report: bool = True
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    # recompute activations in backward instead of keeping them: none | moe (the MoE FFNs) |
    # attention (the attention sublayers) | full (whole blocks); models/activation_checkpoint.py
    activation_checkpointing: Literal["none", "moe", "attention", "full"] = "none"
    # refuse to start a job the memory planner (train/memory_plan.py) predicts cannot fit one rank's
    # device memory; 0 = the device's own (CUDA: its memory; CPU: available RAM / ranks on this node)
    device_memory_gb: float = 0.0
    check_memory: bool = True
    cpu_keep_freed_memory: bool = True  # on CPU, glibc keeps freed blocks for reuse (runtime/cpu_memory.py)
    # on CPU, each expert weight keeps its gradient buffers between steps (ops/grad_buffers.py): no page
    # faults for them each step, but with model.contrastive_coef > 0 (the MoE layers run twice a step)
    # they are two more copies of the expert weights beside .grad; false: nothing kept
    cpu_grad_buffers: bool = True
    # faults (README "When things go wrong")
    collective_timeout_s: float = 600.0  # a collective waiting longer than this fails (gloo/NCCL timeout)
    heartbeat_timeout_s: float = 60.0  # a rank silent this long is declared lost; 0 = no watchdog
    max_nonfinite_steps: int = 5  # this many non-finite (skipped) steps in a row stop the job
    collapse_share: float = 0.1  # expert starved below this fraction of the uniform share; 0 = no alarm
    collapse_window: int = 100  # ... for this many steps: warn once per (layer, modality, expert)

    def resolved_dtype(self, device_type: str) -> str:
        """The compute dtype: bf16 autocast over float32 weights, or plain float32."""
        if self.dtype == "auto":
            return "bfloat16" if device_type == "cuda" else "float32"
        return self.dtype

    def validate(self, prefix: str = "train") -> None:
        p = prefix
        check(bool(self.name) and "/" not in self.name, f"{p}.name", f"must be a non-empty name without '/', got {self.name!r}")
        check(self.steps > 0, f"{p}.steps", f"must be > 0, got {self.steps}")
        check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.warmup_steps >= 0, f"{p}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, f"{p}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas", f"must be two numbers in [0, 1), got {self.betas}")
        check(self.grad_clip >= 0, f"{p}.grad_clip", f"must be >= 0 (0 = no clipping), got {self.grad_clip}")
        for name in ("log_every", "eval_batches", "keep_checkpoints"):
            check(getattr(self, name) > 0, f"{p}.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "threads"):
            check(getattr(self, name) >= 0, f"{p}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.retrieval_size >= 5, f"{p}.retrieval_size", f"must be >= 5 (recall@5 needs 5 candidates), got {self.retrieval_size}")
        check(self.collective_timeout_s > 0, f"{p}.collective_timeout_s", f"must be > 0 seconds, got {self.collective_timeout_s}")
        check(
            self.heartbeat_timeout_s == 0 or self.heartbeat_timeout_s >= 1,
            f"{p}.heartbeat_timeout_s",
            f"must be 0 (no watchdog) or >= 1 second, got {self.heartbeat_timeout_s}",
        )
        check(self.max_nonfinite_steps >= 1, f"{p}.max_nonfinite_steps", f"must be >= 1, got {self.max_nonfinite_steps}")
        check(0 <= self.collapse_share < 1, f"{p}.collapse_share", f"must be in [0, 1) (0 = no alarm), got {self.collapse_share}")
        check(self.collapse_window >= 1, f"{p}.collapse_window", f"must be >= 1 step, got {self.collapse_window}")
        check(self.device_memory_gb >= 0, f"{p}.device_memory_gb",
              f"must be >= 0 (0 = the device's own memory), got {self.device_memory_gb}")
        check(
            self.peak_tflops is None or self.peak_tflops >= 0,
            f"{p}.peak_tflops",
            f"must be a GPU's peak TFLOP/s, 0 (no mfu) or null (look it up by GPU name), got {self.peak_tflops}",
        )

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or os.path.join("runs", self.name))


@dataclass
class ParallelConfig:
    dp: int = -1  # -1 = whatever the world size leaves after tp
    tp: int = 1
    ep: int = 1  # carved out of dp: ep must divide dp
    expert_tp: bool = False  # shard each expert over TP too (else experts stay whole on TP ranks)
    zero_stage: int = 0
    # gradient elements DeepSpeed flattens into one all-reduce (ZeRO-0) or stages in its reduce bucket
    # (ZeRO-1/2): 4 bytes each while held; smaller costs more collectives (DeepSpeed's default: 5e8)
    reduce_bucket_size: int = 500_000_000
    # auto: DeepSpeed when the job has several processes, plain PyTorch for one
    engine: Literal["auto", "torch", "deepspeed"] = "auto"
    busy_wait: bool = True  # gloo (CPU) collectives poll instead of sleeping, when ranks × threads fit the cores
    # CPU jobs, when ranks × threads fit the cores: each local rank and its gloo threads on cores of
    # their own, gloo's I/O threads under SCHED_IDLE (runtime/cpu_affinity.py). Off for shared cores.
    bind_cores: bool = True

    def validate(self, prefix: str = "parallel") -> None:
        check(self.tp >= 1, f"{prefix}.tp", f"must be >= 1, got {self.tp}")
        check(self.ep >= 1, f"{prefix}.ep", f"must be >= 1, got {self.ep}")
        check(self.dp == -1 or self.dp >= 1, f"{prefix}.dp", f"must be >= 1 or -1 (derived), got {self.dp}")
        check(self.reduce_bucket_size >= 1, f"{prefix}.reduce_bucket_size", f"must be >= 1 element, got {self.reduce_bucket_size}")
        check(
            self.zero_stage in (0, 1, 2),
            f"{prefix}.zero_stage",
            f"must be 0, 1 or 2, got {self.zero_stage} (ZeRO-3 is not supported with MoE here: its parameter "
            "partitioning is not proved against the single-process run; use 2)",
        )


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # sizes a loaded file or override set under `data:` ({name: value}), refused by validate(); not a
    # config key, so from_dict and to_dict leave it out
    data_sizes_given: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the one place the data pipeline's sizes are derived from the model's
        self.data = dataclasses.replace(self.data, **{name: getattr(self.model, name) for name in SIZE_FIELDS})

    def validate(self, check_paths: bool = True) -> JobConfig:
        """Raise ConfigError naming the first bad field; changes nothing."""
        for name in SIZE_FIELDS:
            check(name not in self.data_sizes_given, f"data.{name}",
                  f"the data pipeline takes its sizes from the model; set model.{name}="
                  f"{self.data_sizes_given.get(name)} instead and remove data.{name}")
        self.model.validate()
        self.train.validate()
        self.parallel.validate()
        check(self.train.optimizer == "adamw" or self.parallel.zero_stage == 0, "train.optimizer",
              f"adafactor needs parallel.zero_stage=0, got {self.parallel.zero_stage}: ZeRO-1/2 flatten the "
              "parameters into 1-D partitions, where Adafactor cannot factor its second moment (it would keep "
              "a full one, plus ZeRO's float32 master copy); use train.optimizer=adamw with ZeRO")
        for name in SIZE_FIELDS:
            m, d = getattr(self.model, name), getattr(self.data, name)
            check(m == d, f"data.{name}",
                  f"is {d} but model.{name} is {m}: the data sizes are copied from the model when the job "
                  f"config is built (load_job_config, JobConfig(...)); change model.{name} before that, not after")
        check(self.model.channels == 3, "model.channels",
              f"the data pipeline decodes RGB images (3 channels), got {self.model.channels}; set it to 3")
        self.data.validate(check_paths=check_paths, sizes_prefix="model")
        return self

    def to_yaml(self) -> str:
        """A file load_job_config reads back to an equal config: the data sizes stay the model's."""
        d = to_dict(self)
        for name in SIZE_FIELDS:
            del d["data"][name]
        return yaml.safe_dump(d, sort_keys=False)


def load_job_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """YAML file (or nothing: all defaults) + ``section.key=value`` overrides → JobConfig (not yet
    validated). Sizes set under ``data:`` are kept aside for validate() to refuse, naming the field."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    section = data.get("data")
    given = {name: section.pop(name) for name in SIZE_FIELDS if name in section} if isinstance(section, dict) else {}
    try:
        cfg = from_dict(JobConfig, data)
    except TypeError as e:  # a dataclass rejected its arguments
        raise ConfigError(str(e)) from e
    cfg.data_sizes_given = given
    return cfg
