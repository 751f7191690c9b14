"""Shared pieces of the parity tests: a tiny model config, fixed global batches, a training run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from modalmoe.runtime.data.batch import Batch
from modalmoe.train.job_config import load_job_config

STEPS = 20
GLOBAL_BATCH = 8
MODEL = [
    "model.vocab_size=32", "model.hidden_size=32", "model.num_heads=4", "model.num_layers=2",
    "model.ffn_hidden_size=64", "model.moe_every=2", "model.moe.ffn_hidden_size=32",
    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.lb_coef=0.01", "model.moe.z_loss_coef=0.001",
    "model.image_size=16", "model.patch_size=8", "model.max_text_len=12",
    "train.steps=20", "train.log_every=1", "train.warmup_steps=3", "train.lr=3e-3", "train.grad_clip=0.5",
    "train.progress=false", "train.tensorboard=false", "train.report=false", "train.threads=1",
    "data.eval_shards=[]", "data.num_workers=0",
]


class FixedBatches:
    """This replica's slice of a fixed list of global batches; resumable like the shard loader."""

    def __init__(self, batches: list[Batch], dp_rank: int, dp_size: int, start: int = 0):
        per = GLOBAL_BATCH // dp_size
        self.batches = [slice_batch(b, dp_rank * per, (dp_rank + 1) * per) for b in batches]
        self.i = start

    def __iter__(self):
        while self.i < len(self.batches):
            self.i += 1
            yield self.batches[self.i - 1]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, sd: dict) -> None:
        self.i = sd["i"]


def slice_batch(b: Batch, lo: int, hi: int) -> Batch:
    return Batch(b.patches[lo:hi], b.text[lo:hi], b.text_mask[lo:hi], b.modality[lo:hi], b.mask[lo:hi], b.keys[lo:hi])


def global_batches(seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    P, D, L = 4, 8 * 8 * 3, 12
    out = []
    for step in range(STEPS):
        lengths = torch.randint(4, L + 1, (GLOBAL_BATCH,), generator=g)
        text = torch.randint(4, 32, (GLOBAL_BATCH, L), generator=g)
        text[:, 0] = 2
        mask = torch.arange(L)[None] < lengths[:, None]
        text[torch.arange(GLOBAL_BATCH), lengths - 1] = 3
        text = text.masked_fill(~mask, 0)
        patches = torch.randn(GLOBAL_BATCH, P, D, generator=g)
        modality = torch.cat([torch.zeros(GLOBAL_BATCH, P, dtype=torch.long), torch.ones(GLOBAL_BATCH, L, dtype=torch.long)], 1)
        full_mask = torch.cat([torch.ones(GLOBAL_BATCH, P, dtype=torch.bool), mask], 1)
        out.append(Batch(patches, text, mask, modality, full_mask, [f"{step}-{i}" for i in range(GLOBAL_BATCH)]))
    return out


def train_run(rank: int, world: int, overrides: list[str], run_dir: str, start: int = 0) -> list[tuple[float, float]] | None:
    from modalmoe.train.trainer import Trainer

    cfg = load_job_config(None, MODEL + overrides + [f"train.run_dir={run_dir}"]).validate()
    dp = world // cfg.parallel.tp
    tp_rank_stride = cfg.parallel.tp
    trainer = Trainer(cfg, train_data=FixedBatches(global_batches(), rank // tp_rank_stride, dp, start))
    trainer.fit()
    if rank != 0:
        return None
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if r["split"] == "train"]




def data_overrides(demo: Path) -> list[str]:
    return [f"data.train_shards=[{demo}/train-000000.tar]", f"data.tokenizer={demo}/tokenizer.model"]
