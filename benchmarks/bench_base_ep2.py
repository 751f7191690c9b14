"""``launch/configs/base.yaml`` itself (1.31e9 parameters, 224 px, 77 caption tokens) trained for 3
steps under EP=2 on 2 gloo ranks, each rank's peak memory against what the whole model needs.

Rows, each in fresh processes under ``torchrun`` (gloo, CPU, one intra-op thread per rank), both with
the same settings, the lean ones that let base train on a small machine: ``train.optimizer=adafactor``
(AdamW's two float32 moments, 8 bytes per parameter, are what does not fit), ``data.batch_size=2``
per rank, no activation checkpointing (at 2 samples the gradient phase, not the activations, is the
peak), ``train.cpu_grad_buffers=false`` (base's contrastive pass runs the MoE layers twice a step, and
the kept expert-gradient buffers would be two more copies of the expert weights),
``train.cpu_keep_freed_memory=false`` (glibc's defaults: large blocks go back to the system when freed;
kept, the heap grew by 0.7 GiB per EP rank in the first optimizer step of a 4-layer base, after the
all-reduce's buckets), and on the EP ranks ``parallel.reduce_bucket_size=1e7`` (DeepSpeed's ZeRO-0 all-reduce would
flatten 5e8 gradient elements at once, 2 GB):
- EP=2: the ``Trainer`` as a user runs it (meta-device build: each rank allocates its 8 of the 16
  experts per layer and the replicated parts), DeepSpeed ZeRO-0;
- whole model: one process building the whole model as every rank did before the meta build
  (``build_local_model(meta=False)``), plain engine, the same 3 steps of the same batches.

Each step's batch is full length (every caption token real, 256 patches + 77 tokens per sample).
Peak = the process's RSS high-water mark (VmHWM) minus its RSS after the imports, before the Trainer:
every byte the build and the 3 steps touched, glibc's kept heap included. The rows run one after the
other, and a row starts only when MemAvailable is at least 1.3 × the planner's prediction for all of
its processes (the machine may be shared); otherwise the script stops and says so.

    python benchmarks/bench_base_ep2.py [--set key=value ...]
    python benchmarks/bench_base_ep2.py --rows ep2 --results r.json; ... --rows whole --results r.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
LIMIT = 0.6  # the bar: each rank's peak <= 0.6 x the whole model's
STEPS = 3
LEAN = ["train.optimizer=adafactor", "train.lr=1e-2", "data.batch_size=2", "train.activation_checkpointing=none",
        "train.cpu_grad_buffers=false", "train.cpu_keep_freed_memory=false"]
EP_ONLY = ["parallel.ep=2", "parallel.reduce_bucket_size=10000000"]
COMMON = ["train.progress=false", "train.tensorboard=false", "train.report=false", "train.threads=1",
          "train.warmup_steps=1", f"train.steps={STEPS}", "data.eval_shards=[]", "data.num_workers=0",
          "parallel.bind_cores=false"]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _config(demo: str, run_dir: str, overrides: list[str]):
    from modalmoe.launch.presets import preset_path
    from modalmoe.train.job_config import load_job_config

    return load_job_config(preset_path("base"), [
        f"data.train_shards=[{demo}/train-000000.tar]", f"data.tokenizer={demo}/tokenizer.model",
        f"train.run_dir={run_dir}", *COMMON, *overrides]).validate()


def _batches(cfg, seed: int):
    """Full-length batches: every caption token real, as the planner assumes."""
    import torch
    from modalmoe.runtime.data.batch import Batch

    m, B = cfg.model, cfg.data.batch_size
    P, L = m.num_patches, m.max_text_len
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        text = torch.randint(4, m.vocab_size, (B, L), generator=g)
        modality = torch.cat([torch.zeros(B, P, dtype=torch.long), torch.ones(B, L, dtype=torch.long)], 1)
        yield Batch(torch.randn(B, P, m.patch_dim, generator=g), text, torch.ones(B, L, dtype=torch.bool),
                    modality, torch.ones(B, P + L, dtype=torch.bool), [str(i) for i in range(B)])


def worker(args) -> dict:
    import deepspeed  # noqa: F401  (a library, imported before the baseline like torch)
    import torch
    import modalmoe.train.trainer as trainer_module
    from modalmoe.train.memory_plan import plan_memory

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cfg = _config(args.demo, args.run_dir, args.set)
    if args.worker == "whole":  # the path before the meta build: the whole model, allocated and drawn
        import functools

        trainer_module.build_local_model = functools.partial(trainer_module.build_local_model, meta=False)
    predicted = plan_memory(cfg, world, "cpu").peak
    batches = list(_batches(cfg, seed=rank))
    before = _status("VmRSS")
    trainer = trainer_module.Trainer(cfg, train_data=[])
    built = _status("VmHWM") - before
    losses = [trainer.train_step(b)[0]["loss"] for b in batches]
    return {"rank": rank, "peak": _status("VmHWM") - before, "build_peak": built, "losses": losses,
            "predicted": predicted, "engine": type(trainer.engine).__name__,
            "optimizer": type(trainer.engine.optimizer).__name__,
            "local_params": sum(p.numel() for p in trainer.model.parameters()), "total_params": trainer.total_params}


def run(mode: str, ranks: int, demo: str, tmp: str, overrides: list[str], wait_s: float) -> list[dict]:
    from modalmoe.train.memory_plan import plan_memory

    cfg = _config(demo, f"{tmp}/plan", overrides)
    need = 1.3 * plan_memory(cfg, ranks, "cpu").peak * ranks
    deadline = time.monotonic() + wait_s
    while (have := _available()) < need:
        if time.monotonic() > deadline:
            sys.exit(f"{mode}: not started: MemAvailable {have / GIB:.1f} GiB < 1.3 x the planner's "
                     f"{need / 1.3 / GIB:.1f} GiB for {ranks} process(es); free memory and rerun")
        time.sleep(5)
    print(f"{mode}: starting with MemAvailable {have / GIB:.1f} GiB (need {need / GIB:.1f})", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(Path(__file__).resolve()), "--worker", mode, f"--demo={demo}", f"--run-dir={tmp}/run-{mode}",
           *[f"--set={o}" for o in overrides]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(rows) != ranks:
        sys.exit(f"{mode} on {ranks} ranks failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--demo", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help="more overrides for both rows")
    ap.add_argument("--rows", choices=["both", "ep2", "whole"], default="both",
                    help="run one row only, its results kept in --results for a later run of the other")
    ap.add_argument("--results", default="", help="JSON file the rows are read from and written to")
    ap.add_argument("--wait-s", type=float, default=0, help="wait this long for the memory a row needs")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    from modalmoe.runtime.data import make_demo
    from modalmoe.train.memory_plan import plan_memory

    settings = LEAN + args.set
    saved = json.loads(Path(args.results).read_text()) if args.results and Path(args.results).is_file() else {}
    if saved and saved.get("set") != args.set:
        sys.exit(f"{args.results} holds rows run with --set {saved.get('set')}, not {args.set}")
    with tempfile.TemporaryDirectory(prefix="bench_base_ep2_") as tmp:
        demo = f"{tmp}/demo"
        make_demo(demo, n_train=8, n_eval=8, samples_per_shard=8)
        if args.rows in ("both", "ep2"):
            saved["ep2"] = run("ep2", 2, demo, tmp, settings + EP_ONLY, args.wait_s)
        if args.rows in ("both", "whole"):
            saved["whole"] = run("whole", 1, demo, tmp, settings, args.wait_s)
        adamw = plan_memory(_config(demo, f"{tmp}/plan", [o for o in settings if not o.startswith("train.optimizer")]), 1, "cpu")
    if args.results:
        Path(args.results).write_text(json.dumps({**saved, "set": args.set}))
    if "ep2" not in saved or "whole" not in saved:
        print(json.dumps(saved.get("ep2") or saved.get("whole"), indent=1))
        return
    ep, whole = saved["ep2"], saved["whole"][0]
    print(f"{'row':52s} {'rank':>4s} {'params':>10s} {'peak GiB':>9s} {'planner':>8s} {'ratio':>6s}  losses")
    for label, rows in ((f"base EP=2, 2 gloo ranks ({ep[0]['engine']}, {ep[0]['optimizer']})", ep),
                        (f"base whole model, 1 process ({whole['engine']}, {whole['optimizer']})", [whole])):
        for r in rows:
            print(f"{label:52s} {r['rank']:4d} {r['local_params']:10.3e} {r['peak'] / GIB:9.2f} {r['predicted'] / GIB:8.2f} "
                  f"{r['peak'] / whole['peak']:6.3f}  {', '.join(f'{x:.3f}' for x in r['losses'])} "
                  f"(build part {r['build_peak'] / GIB:.2f} GiB)")
    print(f"not run: the whole model with AdamW (base.yaml's optimizer), same batch: the planner predicts "
          f"{adamw.peak / GIB:.2f} GiB for its one process")
    worst = max(r["peak"] for r in ep) / whole["peak"]
    per_rank = " / ".join(f"{r['peak'] / GIB:.2f}" for r in ep)
    what = (f"base.yaml with --set {' '.join(args.set)}" if args.set else
            "base.yaml as written (1.31e9 parameters, 224 px, 77 tokens; sizes not reduced)")
    print(f"verdict: {what}, 3 steps, with train.optimizer=adafactor, data.batch_size=2, activation checkpointing "
          f"none, train.cpu_grad_buffers=false, train.cpu_keep_freed_memory=false and on the EP ranks parallel.reduce_bucket_size=1e7: EP=2 per-rank peak RSS {per_rank} GiB vs "
          f"{whole['peak'] / GIB:.2f} GiB for the whole model in one process with the same settings: worst rank "
          f"{worst:.3f}x, {'MET' if worst <= LIMIT else 'NOT MET'} (bar {LIMIT}x)")


if __name__ == "__main__":
    main()
