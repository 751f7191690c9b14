"""Meta-device build with sharded materialisation against the whole model sliced.

Every rank of a TP=2, EP=2 and TP=2 x EP=2 layout (gloo, CPU) builds its model twice: on the
meta device, sharded there and then allocated shard by shard (the trainer's path), and whole then
sliced (the reference). Every parameter and buffer must be bit-identical, and equal to the slice of
the single-process model cut here by hand; the meta path must allocate only the local shards (no
tensor the size of a full expert weight is ever created), and loading a consolidated checkpoint
must read only this rank's slices of the file.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from dist_utils import run_distributed
from modalmoe.models import ModelConfig, MultimodalTransformer, build_model
from modalmoe.runtime.moe import MoEConfig
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SEED = 7


def tiny_config(router: str = "random", **overrides) -> ModelConfig:
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=4, top_k=2, activation="swiglu",
                    num_shared_experts=1, router=router)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48,
                      moe_every=2, image_size=8, patch_size=4, max_text_len=8, activation="swiglu",
                      contrastive_coef=0.1, tie_embeddings=True, moe=moe)
    return dataclasses.replace(cfg, **overrides).validate()


class LargestTensor(TorchDispatchMode):
    """The most elements of any real (non-meta) tensor an op returned while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.numel = max(self.numel, t.numel())
        return out


class SliceSpy:
    """Wraps ``safe_open``: counts the elements every ``get_slice(...)[...]`` returned and every
    whole-tensor read."""

    def __init__(self, real):
        self.real, self.sliced, self.whole = real, 0, 0

    def __call__(self, *args, **kwargs):
        spy, handle = self, self.real(*args, **kwargs)

        class Slice:
            def __init__(self, sl):
                self.sl = sl

            def get_shape(self):
                return self.sl.get_shape()

            def __getitem__(self, idx):
                t = self.sl[idx]
                spy.sliced += t.numel()
                return t

        class Handle:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, key):
                return Slice(self.f.get_slice(key))

            def get_tensor(self, key):
                t = self.f.get_tensor(key)
                spy.whole += t.numel()
                return t

        return Handle()


def _by_hand(full: dict[str, torch.Tensor], local, state) -> dict[str, torch.Tensor]:
    """The single-process tensors cut for this rank without the placement code: TP by each module's
    spec, routed experts [r·L, (r+1)·L) by EP rank."""
    from modalmoe.runtime.tensor_parallel import tp_shard_specs

    specs = tp_shard_specs(local)
    tp_rank, tp = state.rank_in("tp"), state.size("tp")
    ep_rank, ep = state.rank_in("ep"), state.size("ep")
    out = {}
    for name, t in full.items():
        if ".experts.w" in name:
            L = t.shape[0] // ep
            t = t[ep_rank * L : (ep_rank + 1) * L]
        if name in specs and tp > 1:
            t = specs[name].shard(t, tp_rank, tp)
        out[name] = t
    return out


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def _layout_worker(rank: int, world: int, tp: int, ep: int, expert_tp: bool, ckpt: str) -> dict:
    import modalmoe.runtime.consolidate as consolidate
    from modalmoe.models.parallelize import build_local_model
    from modalmoe.runtime.parallel_state import Layout, ParallelState

    cfg = tiny_config()
    state = ParallelState.build(Layout(world, tp=tp, ep=ep))
    with LargestTensor() as meta_mode:
        meta = build_local_model(cfg, state, expert_tp=expert_tp, seed=SEED)
    with LargestTensor() as whole_mode:
        ref = build_local_model(cfg, state, expert_tp=expert_tp, seed=SEED, meta=False)
    single = _tensors(build_model(cfg, seed=SEED))
    got, want, cut = _tensors(meta), _tensors(ref), _by_hand(single, meta, state)
    assert sorted(got) == sorted(want) == sorted(cut)
    for name in got:
        assert not got[name].is_meta, name
        assert torch.equal(got[name], want[name]), f"rank {rank}: {name} differs from the whole-then-sliced build"
        assert torch.equal(got[name], cut[name]), f"rank {rank}: {name} is not the slice of the single-process tensor"
    attrs = ("allreduce", "group_name", "tensor_model_parallel")
    for (name, p), (_, q) in zip(meta.named_parameters(), ref.named_parameters(), strict=True):
        assert p.requires_grad == q.requires_grad, name
        assert {a: getattr(p, a, None) for a in attrs} == {a: getattr(q, a, None) for a in attrs}, name
    assert meta.lm_head.weight is meta.embed.tokens.weight

    local_numel = sum(p.numel() for p in meta.parameters())
    expert_full = max(t.numel() for n, t in single.items() if ".experts.w" in n)

    spy = SliceSpy(consolidate.safe_open)
    consolidate.safe_open = spy
    loaded = build_local_model(cfg, state, expert_tp=expert_tp, seed=SEED + 1, weights=consolidate.Consolidated(ckpt))
    consolidate.safe_open = spy.real
    from safetensors.torch import load_file

    file_cut = _by_hand(load_file(f"{ckpt}/model.safetensors"), loaded, state)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, file_cut[name]), f"rank {rank}: {name} loaded is not this rank's slice of the file"
    return {
        "local_numel": local_numel,
        "expected_numel": sum(cut[n].numel() for n, _ in meta.named_parameters()),
        "full_numel": sum(p.numel() for p in build_model(cfg, device="meta").parameters()),
        "expert_numel": sum(t.numel() for n, t in single.items() if ".experts.w" in n),
        "largest_meta": meta_mode.numel,
        "largest_whole": whole_mode.numel,
        "largest_local": max(p.numel() for p in meta.parameters()),
        "largest_full_dense": max(t.numel() for n, t in single.items() if ".experts.w" not in n),
        "expert_full": expert_full,
        "read_sliced": spy.sliced,
        "read_whole": spy.whole,
        "state_numel": sum(t.numel() for t in loaded.state_dict().values()),
        "file_numel": sum(t.numel() for t in load_file(f"{ckpt}/model.safetensors").values()),
    }


LAYOUTS = {
    "tp2-expert_tp": (2, 2, 1, True),
    "ep2": (2, 1, 2, False),
    "tp2xep2": (4, 2, 2, False),
}


@pytest.fixture(scope="module")
def consolidated(tmp_path_factory):
    """A consolidated folder (the layout ``modalmoe checkpoint consolidate`` writes) of other weights."""
    out = tmp_path_factory.mktemp("consolidated")
    model = build_model(tiny_config(), seed=123)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "trainer.json").write_text(json.dumps({"step": 0, "optimizer": False}))
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_meta_build_holds_exactly_the_local_slices(name, consolidated):
    world, tp, ep, expert_tp = LAYOUTS[name]
    for r in run_distributed(_layout_worker, world, tp, ep, expert_tp, str(consolidated), timeout=240):
        assert r["local_numel"] == r["expected_numel"]
        if tp == 1:
            assert r["local_numel"] == r["full_numel"] - r["expert_numel"] * (ep - 1) // ep
        # the whole-then-slice build creates full expert weights; the meta build never does
        assert r["largest_whole"] >= r["expert_full"] > r["largest_meta"]
        if tp == 1:  # no TP: every tensor is drawn straight into its own storage, no transient
            assert r["largest_meta"] <= r["largest_local"]
        else:  # a TP-sharded weight is drawn whole, one at a time, and cut
            assert r["largest_meta"] <= r["largest_full_dense"]
        # the checkpoint: only this rank's slices were read, never a whole tensor
        assert r["read_whole"] == 0 and r["read_sliced"] == r["state_numel"] < r["file_numel"]


def test_single_process_build_is_deterministic_and_order_free():
    """``build_model`` (meta, then allocated) equals the eager constructor under the same global seed,
    and a parameter's value depends on its name and the seed only, not on what else was built."""
    for router in ("topk", "random", "noisy", "modality_gate", "modality"):
        cfg = tiny_config(router=router)
        torch.manual_seed(0)
        a = build_model(cfg)
        torch.manual_seed(0)
        b = MultimodalTransformer(cfg)
        for (n, p), (_, q) in zip(_tensors(a).items(), _tensors(b).items(), strict=True):
            assert torch.equal(p, q), (router, n)
    small, deeper = build_model(tiny_config(), seed=SEED), build_model(tiny_config(num_layers=4), seed=SEED)
    deep = dict(deeper.named_parameters())
    shared = [n for n, _ in small.named_parameters() if not n.endswith(("wo.weight", "down.weight"))]
    assert all(torch.equal(p, deep[n]) for n, p in small.named_parameters() if n in shared)
    other = build_model(tiny_config(), seed=SEED + 1)
    assert not torch.equal(small.layers[1].ffn.experts.w1_EHF, other.layers[1].ffn.experts.w1_EHF)
