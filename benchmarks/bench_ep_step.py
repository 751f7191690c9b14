"""Smoke-model training steps on CPU as ``fit()`` runs them: EP=2 over EP=1 at equal samples per rank.

Each run is ``Trainer.fit()`` under ``torchrun`` (1 or 2 processes, one intra-op thread per rank)
on demo webdataset shards, so a step includes everything a job's step does: the loader (its
worker processes decoding JPEGs and tokenising), the signal agreement, the watchdog's heartbeat
thread, the metrics window and its log line, and, under EP=2, the all-to-alls, the data-parallel
all-reduce of the dense gradients and DeepSpeed's step. Every rank records the wall time from one
step's start to the next's; a step's time is the max over ranks (the slowest rank sets the pace),
and a run's figure is the median over its steps after the first ``--warmup``. The EP=1 and EP=2
runs alternate, ``--repeats`` times at each of ``--batch`` samples per rank, so drift on the shared
host hits both; every pair's ratio is printed and then the median and range per batch size.
``--extras`` adds EP=1 on the DeepSpeed engine (how much of the ratio is the engine) and EP=2 with
``parallel.bind_cores=false``. Then the dispatch-bytes benchmark (``bench_dispatch_bytes.py``)
prints modalmoe's all-to-all bytes over DeepSpeed-MoE's padded ones at capacity factor 1.25.

    python benchmarks/bench_ep_step.py [--batch 16 32 64] [--repeats 3] [--steps 14] [--extras]
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

HERE = Path(__file__).resolve().parent


def worker(args) -> None:
    from modalmoe.launch.presets import preset_path
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    overrides = [
        f"data.train_shards=[{args.demo}/train-000000.tar]", f"data.tokenizer={args.demo}/tokenizer.model",
        "data.eval_shards=[]", f"data.batch_size={args.batch[0]}", f"parallel.ep={args.ep}",
        f"train.run_dir={args.run_dir}", "train.progress=false", "train.tensorboard=false", "train.threads=1",
        f"train.steps={args.steps + args.warmup}", "train.save_every=0", "train.eval_every=0", "train.report=false",
        "train.check_memory=false", f"parallel.engine={args.engine}", *args.set,
    ]
    cfg = load_job_config(preset_path("smoke"), overrides).validate()
    trainer = Trainer(cfg)
    starts: list[float] = []
    step = trainer.train_step

    def timed_step(batch):
        starts.append(time.perf_counter())
        return step(batch)

    trainer.train_step = timed_step
    trainer.fit()
    starts.append(time.perf_counter())  # the last step ends where fit() would fetch the next batch
    # the final evaluate()/save() come after the loop; the last interval includes the loop's tail only
    Path(args.run_dir, f"step_times_rank{rank}.json").write_text(json.dumps(
        [b - a for a, b in zip(starts, starts[1:])][args.warmup:]))


def run(ep: int, batch: int, steps: int, warmup: int, demo: str, run_dir: Path, engine: str = "auto",
        overrides: tuple[str, ...] = ()) -> float:
    """Median over steps of the max over ranks of the step's wall time, in seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ep}",
           str(Path(__file__).resolve()), "--worker", f"--ep={ep}", f"--batch={batch}", f"--steps={steps}",
           f"--warmup={warmup}", f"--demo={demo}", f"--run-dir={run_dir}", f"--engine={engine}",
           *[f"--set={o}" for o in overrides]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"EP={ep} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    per_rank = [json.loads((run_dir / f"step_times_rank{r}.json").read_text()) for r in range(ep)]
    return statistics.median(max(ts) for ts in zip(*per_rank))


def _summary(ratios: list[float]) -> str:
    return f"median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} pairs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 32, 64], help="samples per rank (the smoke preset's is 32)")
    ap.add_argument("--repeats", type=int, default=3, help="EP=1/EP=2 pairs per batch size, alternated")
    ap.add_argument("--steps", type=int, default=14, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps per run")
    ap.add_argument("--extras", action="store_true", help="also EP=1 on the DeepSpeed engine and EP=2 unbound")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--demo", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from modalmoe.runtime.data import make_demo

    print(f"smoke model, fit() steps, 1 thread per rank, the preset's data loader workers; median over {args.steps} "
          f"steps (after {args.warmup}) of the max over ranks; shared {os.cpu_count()}-core host, runs alternated")
    with tempfile.TemporaryDirectory() as tmp:
        demo = f"{tmp}/demo"
        make_demo(demo, n_train=256, n_eval=16, samples_per_shard=256)
        n = 0

        def timed(ep: int, batch: int, **kw) -> float:
            nonlocal n
            n += 1
            return run(ep, batch, args.steps, args.warmup, demo, Path(tmp) / f"run{n}", **kw)

        ratios: dict[int, list[float]] = {b: [] for b in args.batch}
        extras: dict[int, list[tuple[float, float]]] = {b: [] for b in args.batch}
        for rep in range(args.repeats):
            for b in args.batch:
                t1, t2 = timed(1, b), timed(2, b)
                ratios[b].append(t2 / t1)
                line = f"[{rep + 1}/{args.repeats}] {b} samples/rank: EP=1 {t1 * 1e3:.1f} ms/step, EP=2 {t2 * 1e3:.1f} ms/step, EP=2/EP=1 {t2 / t1:.2f}"
                if args.extras:
                    t1_ds = timed(1, b, engine="deepspeed")
                    t2_free = timed(2, b, overrides=("parallel.bind_cores=false",))
                    extras[b].append((t2 / t1_ds, t2_free / t1))
                    line += f" | EP=2/(EP=1 on DeepSpeed) {t2 / t1_ds:.2f} | EP=2 unbound / EP=1 {t2_free / t1:.2f}"
                print(line, flush=True)
    for b in args.batch:
        line = f"{b} samples/rank: EP=2/EP=1 {_summary(ratios[b])} (target <= 1.3)"
        if args.extras:
            line += f"; over EP=1 on DeepSpeed {_summary([e[0] for e in extras[b]])}; unbound {_summary([e[1] for e in extras[b]])}"
        print(line)
    subprocess.run([sys.executable, str(HERE / "bench_dispatch_bytes.py"), "--ep", "2"], check=True)


if __name__ == "__main__":
    main()
