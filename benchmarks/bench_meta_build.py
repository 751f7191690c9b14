"""Peak memory per rank: the meta-device build (each rank allocates only its own shards) against the
whole-model build (every rank builds everything, then slices), EP=2 on 2 gloo ranks, side by side.

Rows, each run under ``torchrun`` (2 processes, gloo, CPU, one intra-op thread per rank):
- build, base.yaml: ``build_local_model`` (meta, shard, allocate + init this rank's part) vs the
  whole build then ``parallelize`` (what the trainer did before); the ranks take turns (a barrier
  between them), so the whole build never runs twice at once on a shared machine;
- train: ``Trainer`` + 3 ``train_step`` calls of a scaled-down base (``--set`` overrides, by default
  model.num_layers=2 and 2 samples per rank: base's whole AdamW state, ≈16 bytes/parameter, does not
  fit one small machine twice), with the meta build, with the whole build, and the whole model in
  one process (what a rank would need without sharding), all at the same per-rank batch.

Peak = the process's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs where the
kernel allows, else from the process start) minus its RSS just before the measured part, so the
interpreter and torch are not counted.

    python benchmarks/bench_meta_build.py [--skip-build] [--skip-train] [--set model.num_layers=2 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _start_peak() -> int:
    """Reset the high-water mark where possible; returns the RSS the measured part starts from."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def _batches(n: int, batch: int, cfg, seed: int):
    from modalmoe.runtime.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    P, C, L = cfg.num_patches, cfg.patch_dim, min(32, cfg.max_text_len)
    for _ in range(n):
        lengths = torch.randint(8, L + 1, (batch,), generator=g)
        mask = torch.arange(L)[None] < lengths[:, None]
        text = torch.randint(4, 200, (batch, L), generator=g).masked_fill(~mask, 0)
        modality = torch.cat([torch.zeros(batch, P, dtype=torch.long), torch.ones(batch, L, dtype=torch.long)], 1)
        yield Batch(torch.randn(batch, P, C, generator=g), text, mask, modality,
                    torch.cat([torch.ones(batch, P, dtype=torch.bool), mask], 1), [""] * batch)


def _config(args, extra: list[str]):
    from modalmoe.launch.presets import preset_path
    from modalmoe.train.job_config import load_job_config

    overrides = [
        f"data.train_shards=[{args.demo}/train-000000.tar]", f"data.tokenizer={args.demo}/tokenizer.model",
        "data.eval_shards=[]", f"parallel.ep={args.ep}", f"train.run_dir={args.run_dir}", "train.progress=false",
        "train.tensorboard=false", "train.threads=1", *extra,
    ]
    return load_job_config(preset_path("base"), overrides).validate()


def build_worker(args) -> dict:
    import torch.distributed as dist
    from modalmoe.models.parallelize import build_local_model
    from modalmoe.runtime.parallel_state import Layout, ParallelState

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = _config(args, [])
    state = ParallelState.build(Layout(world, ep=args.ep))
    out = {}
    for turn in range(world):  # one rank builds at a time; the others wait here
        if turn == rank:
            gc.collect()
            before = _start_peak()
            t0 = time.perf_counter()
            model = build_local_model(cfg.model, state, seed=0, meta=args.worker == "build-meta")
            seconds = time.perf_counter() - t0
            out = {"peak": _status("VmHWM") - before, "seconds": seconds,
                   "local_params": sum(p.numel() for p in model.parameters())}
            del model
            gc.collect()
        dist.barrier()
    dist.destroy_process_group()
    return out


def train_worker(args) -> dict:
    from modalmoe.train.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    cfg = _config(args, args.set)
    if args.worker == "train-whole":  # the previous path: the whole model on every rank, then sliced
        import functools

        import modalmoe.train.trainer as trainer_module

        trainer_module.build_local_model = functools.partial(trainer_module.build_local_model, meta=False)
    gc.collect()
    before = _start_peak()
    trainer = Trainer(cfg, train_data=[])
    built = _status("VmHWM") - before
    losses = [trainer.train_step(b)[0]["loss"] for b in _batches(3, cfg.data.batch_size, cfg.model, seed=rank)]
    return {"peak": _status("VmHWM") - before, "build_peak": built, "losses": losses,
            "local_params": sum(p.numel() for p in trainer.model.parameters()), "total_params": trainer.total_params}


def run(mode: str, ranks: int, args, tmp: str, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(Path(__file__).resolve()), "--worker", mode, f"--ep={ranks}", f"--demo={tmp}/demo",
           f"--run-dir={tmp}/run-{mode}-{ranks}", *[f"--set={o}" for o in extra]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(rows) != ranks:
        sys.exit(f"{mode} on {ranks} ranks failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--demo", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=None, help="overrides for the training rows")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        out = (build_worker if args.worker.startswith("build") else train_worker)(args)
        print("RESULT " + json.dumps({"rank": int(os.environ.get("RANK", "0")), **out}), flush=True)
        return
    train_set = args.set or ["model.num_layers=2", "data.batch_size=2"]
    from modalmoe.runtime.data import make_demo

    with tempfile.TemporaryDirectory(prefix="bench_meta_") as tmp:
        make_demo(f"{tmp}/demo", n_train=8, n_eval=8, samples_per_shard=8)
        print(f"{'row':58s} {'rank':>4s} {'params':>10s} {'peak GiB':>9s} {'ratio':>6s}")
        if not args.skip_build:
            meta, whole = run("build-meta", 2, args, tmp, []), run("build-whole", 2, args, tmp, [])
            for what, rows in (("build base.yaml EP=2: meta, shard, allocate own part", meta),
                               ("build base.yaml EP=2: whole model, then slice (before)", whole)):
                for r, ref in zip(rows, whole, strict=True):
                    print(f"{what:58s} {r['rank']:4d} {r['local_params']:10.3e} {_gib(r['peak']):>9s} "
                          f"{r['peak'] / ref['peak']:6.3f}   ({r['seconds']:.1f} s)")
        if not args.skip_train:
            label = "base " + " ".join(train_set)
            meta = run("train-meta", 2, args, tmp, train_set)
            whole = run("train-whole", 2, args, tmp, train_set)
            single = run("train-meta", 1, args, tmp, train_set)
            for what, rows in ((f"3 steps EP=2 meta build; {label}", meta),
                               (f"3 steps EP=2 whole build then slice; {label}", whole),
                               (f"3 steps 1 process, whole model; {label}", single)):
                for r in rows:
                    print(f"{what:58s} {r['rank']:4d} {r['local_params']:10.3e} {_gib(r['peak']):>9s} "
                          f"{r['peak'] / single[0]['peak']:6.3f}   (build part {_gib(r['build_peak'])} GiB, "
                          f"losses {', '.join(f'{x:.3f}' for x in r['losses'])})")
        print("ratio: peak over the whole-model build's (build rows) or the one-process whole model's (train rows)")


if __name__ == "__main__":
    main()
