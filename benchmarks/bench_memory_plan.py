"""The memory planner's prediction against the measured peak of real training steps, on CPU.

Each config runs in fresh processes (one per rank; EP=2 on 2 gloo ranks): imports first, then the
baseline resident size (VmRSS), then the Trainer (planner check included) and a few train steps on
fixed full-length batches (every caption token real, as the planner assumes), then the high-water mark
(VmHWM); the last step runs under torch's profiler, whose memory timeline gives the most bytes of
tensors alive at once. Measured RSS = VmHWM − baseline: every byte the job touched beyond the
interpreter and its libraries. Each config runs twice: ``train.cpu_keep_freed_memory=false`` (glibc's
defaults: large blocks are mmapped and returned when freed) and ``true`` (the trainer's default: freed
blocks stay in the heap for reuse, so the resident size also holds the heap's fragmentation). The
planner predicts tensor bytes, so the live-tensor peak is what it is checked against; the RSS columns
say what the operating system sees on top.

    python benchmarks/bench_memory_plan.py            # the table (and the base.yaml predictions)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 3
COMMON = ["train.progress=false", "train.tensorboard=false", "train.report=false", "train.threads=1",
          "data.eval_shards=[]", "data.num_workers=0", "train.warmup_steps=1", "parallel.bind_cores=false"]
CONFIGS = {
    "smoke model, batch 96": (1, ["--config", "launch/configs/smoke.yaml"], ["data.batch_size=96"]),
    "D=512, 4 layers, 8 experts, V=8000, batch 24": (1, [], [
        "model.hidden_size=512", "model.num_heads=8", "model.num_layers=4", "model.ffn_hidden_size=1024",
        "model.moe.ffn_hidden_size=1024", "model.moe.num_experts=8", "model.vocab_size=8000",
        "model.image_size=64", "model.patch_size=8", "model.max_text_len=32", "data.batch_size=24"]),
    "EP=2 (2 gloo ranks), D=256, 8 experts, batch 32": (2, [], [
        "model.hidden_size=256", "model.num_heads=4", "model.num_layers=4", "model.ffn_hidden_size=512",
        "model.moe.ffn_hidden_size=512", "model.moe.num_experts=8", "model.vocab_size=4000",
        "model.image_size=64", "model.patch_size=8", "model.max_text_len=32", "data.batch_size=32",
        "parallel.ep=2"]),
    "EP=2, ZeRO-2 (2 gloo ranks), same model": (2, [], [
        "model.hidden_size=256", "model.num_heads=4", "model.num_layers=4", "model.ffn_hidden_size=512",
        "model.moe.ffn_hidden_size=512", "model.moe.num_experts=8", "model.vocab_size=4000",
        "model.image_size=64", "model.patch_size=8", "model.max_text_len=32", "data.batch_size=32",
        "parallel.ep=2", "parallel.zero_stage=2"]),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _live_peak(prof) -> int:
    """The most bytes of CPU tensors alive at once in a profiled step (torch's memory timeline, the one
    ``export_memory_timeline`` draws; tensors from before the profile, weights and moments, included)."""
    from torch.profiler._memory_profiler import Action, MemoryProfile

    cur = peak = 0
    for _, action, (key, _), size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if key.device.type != "cpu":
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return peak


def child(config_args: list[str], overrides: list[str], demo: str, run_dir: str) -> None:
    """One rank: import, take the baseline, train a few steps, print the measured and predicted bytes.
    The last step runs under the profiler for the live-tensor peak, after the resident peak is read."""
    import deepspeed  # noqa: F401  (imported before the baseline: a library, not the job)
    import torch
    from modalmoe.runtime.data.batch import Batch
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.memory_plan import REDUCE_BUCKET_ELEMENTS, plan_memory
    from modalmoe.train.trainer import Trainer

    path = config_args[1] if config_args else None
    cfg = load_job_config(path, COMMON + overrides + [
        f"data.train_shards=[{demo}/train-000000.tar]", f"data.tokenizer={demo}/tokenizer.model",
        f"train.run_dir={run_dir}/rank{os.environ.get('RANK', '0')}"])
    m = cfg.model
    B, P, L = cfg.data.batch_size, m.num_patches, m.max_text_len
    g = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    batches = []
    for _ in range(STEPS):
        text = torch.randint(4, m.vocab_size, (B, L), generator=g)
        modality = torch.cat([torch.zeros(B, P, dtype=torch.long), torch.ones(B, L, dtype=torch.long)], 1)
        batches.append(Batch(torch.randn(B, P, m.patch_dim, generator=g), text, torch.ones(B, L, dtype=torch.bool),
                             modality, torch.ones(B, P + L, dtype=torch.bool), [str(i) for i in range(B)]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = plan_memory(cfg, world, "cpu")
    base = _status_kib("VmRSS") * 1024
    trainer = Trainer(cfg, train_data=batches)
    trainer.model.train()
    from torch.profiler import ProfilerActivity, profile

    for batch in batches[:-1]:
        trainer.train_step(batch)
    peak = _status_kib("VmHWM") * 1024
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        trainer.train_step(batches[-1])
    r = plan.ranks[0]
    # DeepSpeed's ZeRO-1/2 reduce bucket is one torch.empty of 5e8 float32: the profiler counts all of
    # it, the CPU touches (and the planner counts) only the part the gradients fill
    untouched = (REDUCE_BUCKET_ELEMENTS * 4 - r.grad_buffers) if cfg.parallel.zero_stage else 0
    print(json.dumps({"rss": peak - base, "live": _live_peak(prof) - untouched, "predicted": plan.peak,
                      "phases": r.phases()}), flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def run(name: str, world: int, config_args: list[str], overrides: list[str], demo: str, tmp: str) -> list[dict]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world):
        e = dict(env)
        if world > 1:
            e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        args = [sys.executable, __file__, "--child", json.dumps([config_args, overrides, demo, tmp])]
        procs.append(subprocess.Popen(args, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{name}: rank failed:\n{stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def base_predictions() -> list[str]:
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.memory_plan import plan_memory

    lines = ["", "planner predictions for launch/configs/base.yaml (CUDA, bf16 autocast, batch 256 per rank), GiB:",
             "| layout | params | grads | optimizer | activations | peak balanced | peak worst case |",
             "|---|---|---|---|---|---|---|"]
    for label, world, sets in [("1 process (whole model)", 1, []), ("world 2, ep=2", 2, ["parallel.ep=2"]),
                               ("world 2, ep=2, zero_stage=2", 2, ["parallel.ep=2", "parallel.zero_stage=2"]),
                               ("world 2, ep=2, checkpointing full", 2, ["parallel.ep=2", "train.activation_checkpointing=full"])]:
        plan = plan_memory(load_job_config("launch/configs/base.yaml", sets).validate(check_paths=False), world, "cuda")
        r = plan.ranks[0]
        g = [x / 2**30 for x in (r.params, r.grads, r.optimizer, r.activations, plan.peak, plan.peak_worst)]
        lines.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in g) + " |")
    return lines


def main() -> None:
    from modalmoe.launch.cli import main as cli

    rows = ["| config | rank | predicted peak | live tensors (profiler) | error | RSS, keep_freed false | error "
            "| RSS, keep_freed true | error |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bench_memory_plan_") as tmp:
        demo = str(Path(tmp) / "demo")
        cli(["data", "make-demo", demo, "--n-train", "64", "--n-eval", "16"])
        for name, (world, config_args, overrides) in CONFIGS.items():
            runs = [run(name, world, config_args, overrides + [f"train.cpu_keep_freed_memory={keep}"], demo, tmp)
                    for keep in ("false", "true")]
            for rank, (lean, kept) in enumerate(zip(*runs)):
                pred = lean["predicted"]
                cells = [f"{pred / 2**30:.3f}"]
                for got in (lean["live"], lean["rss"], kept["rss"]):
                    cells += [f"{got / 2**30:.3f}", f"{(pred - got) / got:+.1%}"]
                rows.append(f"| {name} | {rank} | " + " | ".join(cells) + " |")
                print(rows[-1], json.dumps(lean["phases"]), file=sys.stderr, flush=True)
    print("\n".join(rows + base_predictions()))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(*json.loads(sys.argv[2]))
    else:
        main()
