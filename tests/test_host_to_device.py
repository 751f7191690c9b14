"""Host→device batch copies: pinned loader memory only for a CUDA job, and a non_blocking ``.to``."""

from __future__ import annotations

import pytest
import torch
from modalmoe.runtime.data import Batch, DataConfig, build_loader, make_demo
from modalmoe.train import trainer
from test_train_job import _train, demo_dir  # noqa: F401  (demo_dir is a fixture)
from torch.overrides import TorchFunctionMode


class _ToCalls(TorchFunctionMode):
    """Records the keyword arguments of every ``Tensor.to``."""

    def __init__(self):
        super().__init__()
        self.kwargs: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            self.kwargs.append(dict(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _batch() -> Batch:
    return Batch(patches=torch.zeros(2, 4, 3), text=torch.zeros(2, 5, dtype=torch.long),
                 text_mask=torch.ones(2, 5, dtype=torch.bool), modality=torch.zeros(2, 9, dtype=torch.long),
                 mask=torch.ones(2, 9, dtype=torch.bool), keys=["a", "b"])


def test_batch_to_forwards_non_blocking():
    for flag in (True, False):
        with _ToCalls() as spy:
            _batch().to("cpu", non_blocking=flag)
        assert len(spy.kwargs) == 5 and all(k.get("non_blocking") is flag for k in spy.kwargs)


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # CPU-only torch
def test_loader_pins_only_when_asked(tmp_path, monkeypatch):
    demo = make_demo(tmp_path, n_train=8, n_eval=8, samples_per_shard=8, image_size=16)
    cfg = DataConfig(train_shards=demo.train_shards, eval_shards=demo.eval_shards, tokenizer=demo.tokenizer,
                     image_size=16, batch_size=4, num_workers=0)
    seen = []
    real = torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **kw: seen.append(kw["pin_memory"]) or real(*a, **kw))
    for pin in (False, True):
        loader = build_loader(cfg, split="eval", dp_rank=0, dp_size=1, tokenizer=cfg.tokenizer, pin_memory=pin)
        next(iter(loader))
    assert seen == [False, True]


def test_cpu_trainer_does_not_pin_and_copies_non_blocking(demo_dir, tmp_path, monkeypatch):  # noqa: F811
    pins, to_calls = [], []
    real_build, real_to = trainer.build_loader, Batch.to
    monkeypatch.setattr(trainer, "build_loader", lambda *a, **kw: pins.append(kw.get("pin_memory")) or real_build(*a, **kw))
    monkeypatch.setattr(Batch, "to", lambda self, device, non_blocking=False: to_calls.append(non_blocking) or real_to(self, device, non_blocking))
    assert _train(demo_dir, tmp_path / "run", "train.steps=2", "train.eval_batches=1", "train.report=false",
                  "train.tensorboard=false", "train.device=cpu") == 0
    assert pins and all(p is False for p in pins)  # train and eval loaders: pinned memory only for CUDA
    assert to_calls[:2] == [True, True]  # the training steps' copies
