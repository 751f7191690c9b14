"""Smoke-model training step on CPU: EP=2 over EP=1 at equal tokens per rank, side by side.

Both runs start under ``torchrun`` (1 and 2 processes, one intra-op thread per rank so the two ranks
of the EP=2 run do not share cores with each other) and time ``Trainer.train_step`` on the same
synthetic batches (B samples per rank, by default the smoke preset's 32; 16 image patches + up to
24 caption tokens each). The EP=2 step includes what expert parallelism costs: the all-to-alls,
the data-parallel gradient all-reduce of the dense weights and DeepSpeed's step. The median of the timed steps is reported.
Then the dispatch-bytes benchmark (``bench_dispatch_bytes.py``) prints modalmoe's all-to-all bytes
over DeepSpeed-MoE's padded ones at capacity factor 1.25.

The EP=1 run uses the single-process engine a one-process job gets; a third run puts EP=1 on the
DeepSpeed engine as well, to show how much of the ratio is the engine rather than the exchanges,
and a fourth runs EP=2 with ``parallel.bind_cores=false`` (no core binding, gloo's I/O threads left
at normal priority) to show what those buy.

    python benchmarks/bench_ep_step.py [--batch N] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _batches(n: int, batch: int, seed: int):
    from modalmoe.runtime.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    P, D, L = 16, 8 * 8 * 3, 24
    for _ in range(n):
        lengths = torch.randint(8, L + 1, (batch,), generator=g)
        text = torch.randint(4, 22, (batch, L), generator=g)
        mask = torch.arange(L)[None] < lengths[:, None]
        text = text.masked_fill(~mask, 0)
        modality = torch.cat([torch.zeros(batch, P, dtype=torch.long), torch.ones(batch, L, dtype=torch.long)], 1)
        yield Batch(torch.randn(batch, P, D, generator=g), text, mask, modality,
                    torch.cat([torch.ones(batch, P, dtype=torch.bool), mask], 1), [""] * batch)


def worker(args) -> None:
    from modalmoe.launch.presets import preset_path
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    overrides = [
        f"data.train_shards=[{args.demo}/train-000000.tar]", f"data.tokenizer={args.demo}/tokenizer.model",
        "data.eval_shards=[]", f"data.batch_size={args.batch}", f"parallel.ep={args.ep}",
        f"train.run_dir={args.run_dir}", "train.progress=false", "train.tensorboard=false", "train.threads=1",
        f"train.steps={args.steps + 3}", f"parallel.engine={args.engine}", *args.set,
    ]
    cfg = load_job_config(preset_path("smoke"), overrides).validate()
    trainer = Trainer(cfg, train_data=[])
    times = []
    for i, b in enumerate(_batches(args.steps + 3, args.batch, seed=rank)):
        t0 = time.perf_counter()
        trainer.train_step(b)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print("RESULT " + json.dumps({"ep": args.ep, "median_s": statistics.median(times)}), flush=True)


def run(ep: int, batch: int, steps: int, demo: str, tmp: str, engine: str = "auto", overrides: tuple[str, ...] = ()) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ep}",
           str(Path(__file__).resolve()), "--worker", f"--ep={ep}", f"--batch={batch}", f"--steps={steps}",
           f"--demo={demo}", f"--run-dir={tmp}/run-ep{ep}-{engine}-{len(overrides)}", f"--engine={engine}",
           *[f"--set={o}" for o in overrides]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"EP={ep} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["median_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="samples per rank (default: the smoke preset's data.batch_size)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--demo", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.batch is None:
        from modalmoe.launch.presets import preset_path
        from modalmoe.train.job_config import load_job_config

        args.batch = load_job_config(preset_path("smoke"), []).data.batch_size
    from modalmoe.runtime.data import make_demo

    with tempfile.TemporaryDirectory() as tmp:
        make_demo(f"{tmp}/demo", n_train=64, n_eval=16, samples_per_shard=64)
        t1 = run(1, args.batch, args.steps, f"{tmp}/demo", tmp)
        t2 = run(2, args.batch, args.steps, f"{tmp}/demo", tmp)
        t1_ds = run(1, args.batch, args.steps, f"{tmp}/demo", tmp, engine="deepspeed")
        t2_free = run(2, args.batch, args.steps, f"{tmp}/demo", tmp, overrides=("parallel.bind_cores=false",))
    tokens = args.batch * 40
    print(f"smoke model, {args.batch} samples (~{tokens} tokens) per rank, 1 thread per rank, median of {args.steps} steps")
    print(f"EP=1: {t1 * 1e3:.1f} ms/step | EP=2: {t2 * 1e3:.1f} ms/step | EP=2 / EP=1 = {t2 / t1:.2f} (target <= 1.3)")
    print(f"EP=1 on the DeepSpeed engine too (as EP=2 is): {t1_ds * 1e3:.1f} ms/step | EP=2 / that = {t2 / t1_ds:.2f}")
    print(f"EP=2 with parallel.bind_cores=false: {t2_free * 1e3:.1f} ms/step | over EP=1 = {t2_free / t1:.2f}")
    subprocess.run([sys.executable, str(HERE / "bench_dispatch_bytes.py"), "--ep", "2"], check=True)


if __name__ == "__main__":
    main()
