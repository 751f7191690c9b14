"""Run a study: build its data sets, train every (arm, seed), probe each run, write the report.

Each run is an ordinary training run in ``<out>/runs/<arm>-s<seed>/`` with ``train.resume=true``:
a run whose ``summary.json`` exists is complete and skipped, an interrupted one continues from its
latest checkpoint, and a run folder made from a different config is refused rather than mixed.
Arms with a derived load-balance target run after the arm they take it from (as soon as it is done,
not after the whole grid). Runs execute one after another in this process, or (``jobs > 1``) as parallel ``modalmoe train`` subprocesses, one GPU
each when several are visible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..runtime.config import ConfigError, to_dict
from ..runtime.data import Tokenizer, build_loader, make_demo
from ..runtime.modality import MODALITY_NAMES
from ..train.evaluate import evaluate
from ..train.job_config import JobConfig
from ..train.trainer import Trainer
from . import metrics as sm
from .concepts import concept_analysis, probe_concepts
from .probe import (
    ProbeBatches,
    list_checkpoints,
    load_model,
    load_probe_batches,
    probe_model,
    summarise_layer,
)
from .separation import run_separation
from .shifted_data import make_shifted_demo
from .report import write_study_report
from .spec import StudySpec, run_dir_name

__all__ = ["RunPlan", "StudyRunner", "ANALYSIS_VERSION", "CONCEPTS_VERSION", "SEPARATION_VERSION"]

ANALYSIS_VERSION = 1
SEPARATION_VERSION = 1
CONCEPTS_VERSION = 2  # 2: each specialist says in which modality it specialises
# fields that may differ between invocations without changing what a run computes
_IGNORED = {("train", "progress"), ("train", "tensorboard"), ("train", "threads"), ("train", "report"),
            ("train", "device"), ("data", "num_workers"), ("data", "prefetch_factor"),
            ("train", "cpu_grad_buffers"),  # memory only: the same kernels and losses either way
            # folders written before the data sizes were derived from the model still list them
            ("data", "image_size"), ("data", "patch_size"), ("data", "max_text_len")}


@dataclass
class RunPlan:
    arm: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return run_dir_name(self.arm, self.seed)


def _comparable(cfg_yaml: str) -> dict:
    d = yaml.safe_load(cfg_yaml)
    for section, key in _IGNORED:
        d.get(section, {}).pop(key, None)
    return d


class StudyRunner:
    """Runs a :class:`StudySpec` into ``out_dir`` (default ``studies/<name>``)."""

    def __init__(self, spec: StudySpec, out_dir: str | Path | None = None, *, jobs: int = 1,
                 log: Callable[[str], None] = print):
        self.spec = spec
        self.out = Path(out_dir or Path("studies") / spec.name)
        self.jobs = max(1, jobs)
        self.log = log
        self._data_paths: dict[str, dict] | None = None
        self._probes: dict[tuple, ProbeBatches] = {}
        self._concept_labels: dict[tuple, np.ndarray | None] = {}

    # ---- plan ---------------------------------------------------------------------------------

    def plans(self) -> list[RunPlan]:
        """Every (arm, seed) in the study's arm order, except that an arm with a derived target comes
        right after the arm it takes it from (so it need not wait for the whole grid)."""
        arms = []
        for a, arm in self.spec.arms.items():
            if not arm.target_from:
                arms += [a] + [d for d, x in self.spec.arms.items() if x.target_from == a]
        return [RunPlan(a, s, self.out / "runs" / run_dir_name(a, s)) for a in arms for s in self.spec.seeds]

    @staticmethod
    def is_complete(plan: RunPlan) -> bool:
        return (plan.run_dir / "summary.json").is_file()

    @staticmethod
    def is_analysed(plan: RunPlan) -> bool:
        try:
            return json.loads((plan.run_dir / "analysis.json").read_text()).get("version") == ANALYSIS_VERSION
        except (OSError, ValueError):
            return False

    # ---- data ---------------------------------------------------------------------------------

    def data_paths(self) -> dict[str, dict]:
        """Build (or reuse) every data set; {name: {"train": [...], "eval": [...], "tokenizer": path}}."""
        if self._data_paths is not None:
            return self._data_paths
        image_size = self._base_config().model.image_size
        built = {}
        for name, d in self.spec.data.items():
            if d.kind == "shards":
                built[name] = {"train": list(d.train_shards), "eval": list(d.eval_shards), "tokenizer": d.tokenizer}
            elif d.kind == "demo":
                folder = self.out / "data" / name
                demo = make_demo(folder, seed=d.seed, n_train=d.n_train, n_eval=d.n_eval, image_size=image_size)
                built[name] = {"train": demo.train_shards, "eval": demo.eval_shards, "tokenizer": demo.tokenizer, "demo": demo}
        for name, d in self.spec.data.items():
            if d.kind == "shifted":
                src = built[d.source]
                source_demo = src.get("demo") or _as_demo(src)
                shifted = make_shifted_demo(self.out / "data" / name, source_demo, seed=d.seed, n_train=d.n_train,
                                            n_eval=d.n_eval, image_size=image_size, shift=d.shift)
                built[name] = {"train": shifted.train_shards, "eval": shifted.eval_shards, "tokenizer": shifted.tokenizer}
        self._data_paths = {n: {k: v for k, v in built[n].items() if k != "demo"} for n in self.spec.data}
        return self._data_paths

    def _base_config(self) -> JobConfig:
        """The first arm's config without data paths: for sizes the data sets must agree with."""
        from ..launch.presets import preset_path
        from ..train.job_config import load_job_config
        from .spec import _as_overrides

        base = Path(self.spec.base)
        path = base if base.suffix in (".yaml", ".yml") else preset_path(self.spec.base)
        return load_job_config(path, _as_overrides(self.spec.set) + list(self.spec.job_overrides))

    # ---- derived target -------------------------------------------------------------------------

    def derived_target(self, arm: str) -> list[list[float]]:
        """Experiment 2: the target arm's final per-modality utilisation on the probe tokens, over all
        its seeds and MoE layers, canonicalised (see :func:`metrics.canonical_target`)."""
        src = self.spec.arms[arm].target_from
        ds = self.spec.arm_data(src)
        tables = []
        for seed in self.spec.seeds:
            path = self.out / "runs" / run_dir_name(src, seed) / "analysis.json"
            if not path.is_file():
                raise RuntimeError(f"arm {arm!r} needs the utilisation of {src!r}, but {path} is missing")
            analysis = json.loads(path.read_text())
            tables += [layer["load_ME"] for layer in analysis["probe"][ds]["layers"]]
        target = sm.canonical_target(tables)
        folder = self.out / "targets"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{arm}.json").write_text(json.dumps({"from": src, "data": ds, "target_ME": target}, indent=1) + "\n")
        return target

    def job_config(self, plan: RunPlan) -> JobConfig:
        target = self.derived_target(plan.arm) if self.spec.arms[plan.arm].target_from else None
        return self.spec.job_config(plan.arm, plan.seed, plan.run_dir, self.data_paths(), target)

    # ---- train --------------------------------------------------------------------------------

    def _check_same_config(self, plan: RunPlan, cfg: JobConfig) -> None:
        saved = plan.run_dir / "study_job.yaml"
        if saved.is_file() and _comparable(saved.read_text()) != _comparable(cfg.to_yaml()):
            raise ConfigError(
                f"run folder {plan.run_dir} was made from a different config than this study now gives "
                f"{plan.name}; delete that folder to retrain it, or write the study elsewhere with --out"
            )

    def train(self, plan: RunPlan) -> str:
        """Train one run unless complete; returns what happened, for the log."""
        cfg = self.job_config(plan)
        self._check_same_config(plan, cfg)
        if self.is_complete(plan):
            return "complete, skipped"
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        job_yaml = plan.run_dir / "study_job.yaml"
        job_yaml.write_text(cfg.to_yaml())
        resumed = (plan.run_dir / "checkpoints" / "latest").is_file()
        t0 = time.perf_counter()
        if self.jobs > 1:
            self._train_subprocess(plan, job_yaml)
        else:
            Trainer(cfg).fit()
        seconds = time.perf_counter() - t0
        (plan.run_dir / "timing.json").write_text(json.dumps({"train_s": seconds, "resumed": resumed}) + "\n")
        return f"trained in {seconds:.1f} s" + (" (resumed)" if resumed else "")

    def _train_subprocess(self, plan: RunPlan, job_yaml: Path) -> None:
        env = dict(os.environ)
        n_gpu = torch.cuda.device_count()
        if n_gpu > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            slot = self.plans().index(plan) % n_gpu
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        log_path = plan.run_dir / "train.log"
        with open(log_path, "a") as logf:
            done = subprocess.run([sys.executable, "-m", "modalmoe.launch.train", "--config", str(job_yaml)],
                                  stdout=logf, stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"run {plan.name} failed (exit {done.returncode}); see {log_path}")

    # ---- analyse ------------------------------------------------------------------------------

    def _probe_batches(self, ds: str, cfg: JobConfig) -> ProbeBatches:
        d = cfg.data
        key = (ds, d.image_size, d.patch_size, d.max_text_len, tuple(d.mean), tuple(d.std))
        if key not in self._probes:
            paths = self.data_paths()[ds]
            p = self.spec.probe
            self._probes[key] = load_probe_batches(d, paths["eval"], paths["tokenizer"], p.batches, p.batch_size)
        return self._probes[key]

    def analyse(self, plan: RunPlan) -> str:
        """Probe the final checkpoint on every probe data set (routing, CKA), the tracked checkpoints
        on the primary one (curves over steps), and evaluate on the data sets it was not trained on."""
        if self.is_analysed(plan):
            return "analysed, skipped"
        ckpts = list_checkpoints(plan.run_dir)
        if not ckpts:
            raise RuntimeError(f"run {plan.name} has no checkpoint to probe in {plan.run_dir / 'checkpoints'}")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        spec, names = self.spec, MODALITY_NAMES
        final_step, final_path = ckpts[-1]
        model, cfg = load_model(plan.run_dir, final_path, device)
        if device == "cuda" and cfg.train.device == "cpu":
            model, device = model.cpu(), "cpu"
        routes: dict[str, np.ndarray] = {}
        probe, evals = {}, {}
        for ds in spec.probe_datasets():
            batches = self._probe_batches(ds, cfg)
            layers = probe_model(model, batches, cka_tokens=spec.probe.cka_tokens, modality_names=names, device=device)
            probe[ds] = {"tokens": int(batches.modality_N.size), "layers": [summarise_layer(p, names) for p in layers]}
            routes[f"final/{ds}"] = np.stack([p.top1_N for p in layers])
            routes[f"modality/{ds}"] = batches.modality_N
            if ds != spec.arm_data(plan.arm):
                evals[ds] = self._evaluate_on(model, cfg, ds, device)
        track = []
        primary = spec.primary_data
        for step, path in ckpts:
            at_step = model if step == final_step else load_model(plan.run_dir, path, device)[0].to(device)
            layers = probe_model(at_step, self._probe_batches(primary, cfg), device=device)
            track.append({"step": step, "layers": [summarise_layer(p, names) for p in layers]})
            routes[f"track/{step}"] = np.stack([p.top1_N for p in layers])
        summary = json.loads((plan.run_dir / "summary.json").read_text())
        evals[spec.arm_data(plan.arm)] = summary["eval"]
        timing_path = plan.run_dir / "timing.json"
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
        np.savez_compressed(plan.run_dir / "routes.npz", **{k.replace("/", "__"): v for k, v in routes.items()})
        analysis = {
            "version": ANALYSIS_VERSION, "arm": plan.arm, "seed": plan.seed, "data": spec.arm_data(plan.arm),
            "step": final_step, "num_experts": cfg.model.moe.num_experts, "moe_layers": cfg.model.moe_layers,
            "probe": probe, "track": track, "eval": evals, "timing": timing,
            "lb_modality_target": cfg.model.moe.lb_modality_target,
        }
        (plan.run_dir / "analysis.json").write_text(json.dumps(analysis) + "\n")
        return f"probed {len(ckpts)} checkpoint(s)"

    def concepts(self, plan: RunPlan) -> str:
        """Expert / concept mutual information of the final checkpoint on the primary probe tokens, into
        ``concepts.json`` (its own file, so runs analysed before it existed gain it without a re-probe)."""
        path = plan.run_dir / "concepts.json"
        try:
            if json.loads(path.read_text()).get("version") == CONCEPTS_VERSION:
                return "concepts skipped"
        except (OSError, ValueError):
            pass
        ckpts = list_checkpoints(plan.run_dir)
        if not ckpts:
            raise RuntimeError(f"run {plan.name} has no checkpoint to probe in {plan.run_dir / 'checkpoints'}")
        model, cfg = load_model(plan.run_dir, ckpts[-1][1], "cpu")
        ds = self.spec.primary_data
        batches = self._probe_batches(ds, cfg)
        d = cfg.data
        key = (ds, d.image_size, d.patch_size, d.max_text_len)
        if key not in self._concept_labels:
            paths = self.data_paths()[ds]
            self._concept_labels[key] = probe_concepts(batches.batches, paths["eval"], paths["tokenizer"], d.image_size, d.patch_size)
        labels = self._concept_labels[key]
        out = {"version": CONCEPTS_VERSION, "data": ds, "available": labels is not None}
        if labels is not None:
            layers = probe_model(model, batches)
            out.update(concept_analysis([p.routed_NE for p in layers], labels, batches.modality_N, [p.layer for p in layers]))
        path.write_text(json.dumps(out) + "\n")
        return "concepts measured" if labels is not None else "no concept labels (not a demo set)"

    def prune(self, plan: RunPlan) -> None:
        """Once a run is probed its tracked checkpoints have served; keep only the final (resume) one."""
        if self.spec.keep_tracked_checkpoints or not self.is_analysed(plan):
            return
        latest = plan.run_dir / "checkpoints" / "latest"
        final = latest.read_text().strip() if latest.is_file() else None
        for _, path in list_checkpoints(plan.run_dir):
            if final is not None and path.name != final:
                shutil.rmtree(path, ignore_errors=True)

    def _evaluate_on(self, model, cfg: JobConfig, ds: str, device: str) -> dict[str, float]:
        paths = self.data_paths()[ds]
        data = cfg.data.__class__(**{**cfg.data.__dict__, "eval_shards": paths["eval"], "tokenizer": paths["tokenizer"], "num_workers": 0})
        tok = Tokenizer(paths["tokenizer"])
        loader = build_loader(data, split="eval", dp_rank=0, dp_size=1, tokenizer=tok)
        return evaluate(model, loader, torch.device(device), max_batches=cfg.train.eval_batches,
                        retrieval_size=cfg.train.retrieval_size, pad_id=tok.pad_id, vocab_size=cfg.model.vocab_size)

    # ---- the synthetic separation experiment -----------------------------------------------------

    def separation(self) -> str:
        """Run the study's ``separation`` block into ``separation.json``, unless that file holds the
        result of the same block already (change a field and it reruns; it takes a minute or two)."""
        sep = self.spec.separation
        if sep is None:
            return "no separation experiment"
        path = self.out / "separation.json"
        want = to_dict(sep)
        try:
            old = json.loads(path.read_text())
            if old.get("version") == SEPARATION_VERSION and old.get("spec") == want:
                return "separation: same block, skipped"
        except (OSError, ValueError):
            pass
        t0 = time.perf_counter()
        result = run_separation(sep, log=self.log)
        seconds = time.perf_counter() - t0
        path.write_text(json.dumps({"version": SEPARATION_VERSION, "spec": want, "seconds": seconds, **result}) + "\n")
        return f"separation: {len(result['fits'])} routers trained in {seconds:.0f} s"

    # ---- the whole study ------------------------------------------------------------------------

    def _one(self, plan: RunPlan, index: int, total: int) -> bool:
        try:
            trained = self.train(plan)
            analysed = self.analyse(plan)
            concepts = self.concepts(plan)
            self.prune(plan)
        except Exception as e:  # said at once: with --jobs the exception surfaces only when the grid is done
            self.log(f"[{index}/{total}] {plan.name}: failed: {type(e).__name__}: {e}")
            raise
        self.log(f"[{index}/{total}] {plan.name}: {trained}; {analysed}; {concepts}")
        return trained.startswith("trained")

    def _after(self, sources: list, plan: RunPlan, index: int, total: int) -> bool:
        for f in sources:
            f.result()
        return self._one(plan, index, total)

    def run(self, *, report: bool = True) -> Path | None:
        """Everything: data, runs (skipping complete ones), analysis, report. Returns the report path."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "study.yaml").write_text(yaml.safe_dump(_spec_dict(self.spec), sort_keys=False))
        self.log(self.separation())
        self.data_paths()
        plans = self.plans()
        t0 = time.perf_counter()
        if self.jobs > 1:
            # a derived arm's runs wait for every run of their source arm; those were submitted earlier,
            # so (first in, first out) they already hold a worker and the wait cannot deadlock
            futures: dict[str, list] = {}
            with ThreadPoolExecutor(self.jobs) as pool:
                for i, p in enumerate(plans, 1):
                    sources = futures.get(self.spec.arms[p.arm].target_from, [])
                    futures.setdefault(p.arm, []).append(pool.submit(self._after, sources, p, i, len(plans)))
                trained = sum(f.result() for fs in futures.values() for f in fs)
        else:
            trained = sum(self._one(p, i, len(plans)) for i, p in enumerate(plans, 1))
        seconds = time.perf_counter() - t0
        self.log(f"all {len(plans)} runs done in {seconds:.0f} s ({trained} trained now)")
        if trained:  # the end-to-end time of the last invocation that trained something, for the report
            (self.out / "timing.json").write_text(json.dumps({"wall_s": seconds, "trained_runs": trained, "jobs": self.jobs}) + "\n")
        if not report:
            return None
        return write_study_report(self.spec, self.out)


def _as_demo(paths: dict):
    from ..runtime.data.demo import DemoData

    return DemoData(out_dir="", train_shards=paths["train"], eval_shards=paths["eval"], tokenizer=paths["tokenizer"])


def _spec_dict(spec: StudySpec) -> dict:
    from ..runtime.config import to_dict

    return to_dict(spec)
