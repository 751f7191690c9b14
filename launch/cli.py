"""The ``modalmoe`` command: ``train``, ``plan``, ``data make-demo|tokenizer|convert``, ``checkpoint consolidate``, ``study``.

Every launcher (plain python, deepspeed, srun, mpirun) ends here. Bad flags and configs stop with
``error: ...`` naming the field and the fix, before any data is read or process group created.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
from pathlib import Path

__all__ = ["main", "build_job_config"]

DEFAULT_DEMO_DIR = "data/demo"


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: the smoke preset on the embedded demo data)")
    p.add_argument("--config", help="YAML config file (default: the --preset's file)")
    p.add_argument("--preset", default="smoke", help="smoke | small | base (used when --config is not given)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set moe.top_k=1 train.steps=50 (dotted paths)")
    p.add_argument("--demo-dir", default=DEFAULT_DEMO_DIR,
                   help="where the embedded demo data set lives (built there if absent) when data.train_shards is empty")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict each rank's memory for a config and layout, and whether it fits")
    p.add_argument("--config", help="YAML config file (default: the --preset's file)")
    p.add_argument("--preset", default="smoke", help="smoke | small | base (used when --config is not given)")
    p.add_argument("--world", type=int, default=1, help="ranks the job would be launched on")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, as for train")
    p.add_argument("--device-memory", help="memory per rank to check against: 80GB, 80GiB, 24G (plain numbers are GB)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="the device the job runs on (default: train.device, auto = this machine's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _plan(args) -> int:
    from ..runtime.config import ConfigError
    from ..train.job_config import load_job_config
    from ..train.memory_plan import format_plan, parse_memory, plan_memory

    if args.world < 1:
        raise ConfigError(f"--world: must be >= 1 ranks, got {args.world}")
    budget = parse_memory(args.device_memory) if args.device_memory is not None else None
    cfg = load_job_config(_resolve_config_path(args), args.overrides).validate(check_paths=False)
    plan = plan_memory(cfg, args.world, args.device)
    if args.json:
        out = plan.to_dict()
        if budget is not None:
            out.update(device_memory=budget, fits=plan.peak <= budget, fits_worst=plan.peak_worst <= budget)
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(plan, budget, cfg))
    return 0


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="data tools: the demo data set, tokenizers, shard conversion")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    d = dsub.add_parser("make-demo", help="write the embedded demo image-text data set as webdataset shards")
    d.add_argument("out_dir")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-train", type=int, default=None)
    d.add_argument("--n-eval", type=int, default=None)
    t = dsub.add_parser("tokenizer", help="train a sentencepiece tokenizer on the captions of some shards")
    t.add_argument("--shards", nargs="+", required=True, help="shard paths or brace patterns")
    t.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--vocab-size", type=int, default=8000)
    c = dsub.add_parser("convert", help="convert a folder of images + a captions CSV/JSONL into shards")
    c.add_argument("--images", required=True, help="folder holding the image files")
    c.add_argument("--captions", required=True, help="CSV with columns file,caption or JSONL with {file, caption}")
    c.add_argument("--out", required=True, help="output shard pattern, e.g. shards/train-%%06d.tar")
    c.add_argument("--samples-per-shard", type=int, default=1000)


def _checkpoint_parser(sub) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_cmd", required=True)
    c = csub.add_parser("consolidate", help="gather a checkpoint of any layout into one safetensors file (+ config)")
    c.add_argument("checkpoint", help="a step_* folder, or a checkpoints/ folder (its latest)")
    c.add_argument("--out", required=True, help="output folder: model.safetensors, optimizer.safetensors, config.yaml")


def _checkpoint(args) -> int:
    from ..runtime.consolidate import consolidate

    out = consolidate(args.checkpoint, args.out)
    print(f"wrote {out}/model.safetensors; start a run of any layout from it with --set train.init_from={out}")
    return 0


def _study_parser(sub) -> None:
    p = sub.add_parser("study", help="run a routing study (a grid of small trainings) and write its report")
    p.add_argument("name", help="a study in launch/studies (e.g. modality-routing) or a study YAML path")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="training-config overrides for every run (model.hidden_size=256); study.KEY=VALUE for the study's own fields")
    p.add_argument("--out", help="study folder (default: studies/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel as subprocesses (one GPU each when several)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs, train nothing")


def _study(args) -> int:
    from ..study import run_study

    print(f"report: {run_study(args.name, args.overrides, args.out, jobs=args.jobs, report_only=args.report_only)}")
    return 0


def _resolve_config_path(args) -> Path:
    if args.config:
        return Path(args.config)
    from .presets import preset_path

    return preset_path(args.preset)


def build_job_config(args):
    """Config file + overrides (+ the demo data when no shards are named) → a JobConfig, not yet
    validated: the Trainer validates it, once."""
    from ..runtime.metrics import get_logger
    from ..train.job_config import load_job_config

    cfg = load_job_config(_resolve_config_path(args), args.overrides)
    if not cfg.data.train_shards:
        from ..runtime.data import demo_paths, make_demo

        demo = Path(args.demo_dir)
        demo.mkdir(parents=True, exist_ok=True)
        # the ranks of one node may all get here at once: the first builds, the others wait and reuse
        with open(demo / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            paths = demo_paths(demo)
            if paths is None:
                get_logger("modalmoe.cli").info("no data.train_shards given: building the embedded demo data set in %s", demo)
                make_demo(demo)
                paths = demo_paths(demo)
            else:
                get_logger("modalmoe.cli").info("no data.train_shards given: using the embedded demo data set in %s", demo)
        cfg.data.train_shards = paths["train"]
        cfg.data.eval_shards = cfg.data.eval_shards or paths["eval"]
        cfg.data.tokenizer = cfg.data.tokenizer or paths["tokenizer"]
    return cfg


def _train(args) -> int:
    from ..runtime.metrics import get_logger
    from .environment import setup_environment

    log = get_logger("modalmoe.launch")
    launch = setup_environment(args.local_rank)
    log.info(launch.describe())
    cfg = build_job_config(args)
    if args.print_config:
        print(cfg.validate().to_yaml())
        return 0
    from ..runtime.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionHandler
    from ..train.trainer import Trainer

    try:
        with PreemptionHandler():
            summary = Trainer(cfg, launch=launch).fit()
    except Preempted as e:
        log.warning("%s", e)
        return PREEMPTED_EXIT_CODE
    if launch.is_main:
        print(json.dumps(summary["eval"], indent=1))
    return 0


def _data(args) -> int:
    from ..runtime import data

    if args.data_cmd == "make-demo":
        kw = {k: v for k, v in (("n_train", args.n_train), ("n_eval", args.n_eval)) if v is not None}
        data.make_demo(args.out_dir, seed=args.seed, **kw)
        print(json.dumps(data.demo_paths(Path(args.out_dir)), indent=1))
    elif args.data_cmd == "tokenizer":
        urls = data.expand_shards(args.shards)
        data.train_tokenizer(urls, args.out, vocab_size=args.vocab_size)
        print(f"wrote {args.out}.model and {args.out}.vocab")
    elif args.data_cmd == "convert":
        data.convert_folder(args.images, args.captions, args.out, samples_per_shard=args.samples_per_shard)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modalmoe", description="multimodal MoE training runtime")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    _plan_parser(sub)
    _data_parser(sub)
    _checkpoint_parser(sub)
    _study_parser(sub)
    args = parser.parse_args(argv)
    from ..runtime.checkpoint import CheckpointError
    from ..runtime.config import ConfigError
    from ..runtime.faults import JOB_ERRORS, describe, exit_code_for
    from ..runtime.metrics import get_logger

    get_logger()
    try:
        return {"train": _train, "plan": _plan, "data": _data, "checkpoint": _checkpoint, "study": _study}[args.cmd](args)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JOB_ERRORS as e:  # bad data, non-finite steps, a lost rank: exit codes in runtime/faults.py
        print(f"error: {describe(e)}", file=sys.stderr)
        return exit_code_for(e)


if __name__ == "__main__":
    sys.exit(main())
