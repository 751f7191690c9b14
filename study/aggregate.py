"""Collect a finished study: per-run numbers, cross-run routing similarity, mean ± std per arm.

Reads only what the runs wrote (``summary.json``, ``metrics.jsonl``, ``analysis.json``,
``routes.npz``), so the report can be rebuilt at any time without training or probing again.
Probe metrics of a run (specialisation, balance, CKA) are measured on the probe tokens of the data
set it was trained on. Routing similarity between runs is the Hungarian-matched top-1 agreement on
identical probe tokens (the study's first data set), layer by layer; every arm is compared with
every seed of the reference arm (the reference arm with its *other* seeds: seed-to-seed agreement).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..runtime.modality import MODALITY_NAMES
from ..train.job_config import load_job_config
from . import metrics as sm
from .compute import capacity_record
from .spec import StudySpec, run_dir_name

__all__ = ["collect", "mean_std", "HEADLINE"]

# (key in a run record, column title, lower is better?)
HEADLINE = [
    ("caption_loss", "eval caption loss", True),
    ("image_ablated_loss", "loss w/ other images", True),  # the caption-only baseline (train/evaluate.py)
    ("image_explained_loss", "loss the image explains", False),
    ("retrieval_r1", "R@1", False),
    ("spec", "spec. index", False),
    ("cv_image", "CV image", True),
    ("cv_text", "CV text", True),
    ("dropped_image", "dropped image", True),
    ("dropped_text", "dropped text", True),
    ("agreement", "agreement w/ ref.", False),
    ("cka", "expert CKA", True),
    ("wall_s", "wall s", True),
]


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std (ddof 1; 0 for one value), count) over the finite values."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one row per (split, step): a resumed run may have re-logged steps; the last wins."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r.get("split"), r.get("step"))] = r
    return sorted(rows.values(), key=lambda r: (r["step"], r["split"]))


def _routes(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "routes.npz") as z:
        return {k.replace("__", "/"): z[k] for k in z.files}


def _agreement(a_LN: np.ndarray, b_LN: np.ndarray, E: int) -> list[float]:
    return [sm.matched_agreement(a, b, E)[0] for a, b in zip(a_LN, b_LN)]


class _Runs:
    """Lazy access to the finished runs of a study."""

    def __init__(self, spec: StudySpec, out: Path):
        self.spec, self.out = spec, out
        self._analysis: dict = {}
        self._routes: dict = {}

    def dir(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / run_dir_name(arm, seed)

    def analysis(self, arm: str, seed: int) -> dict | None:
        key = (arm, seed)
        if key not in self._analysis:
            p = self.dir(arm, seed) / "analysis.json"
            self._analysis[key] = json.loads(p.read_text()) if p.is_file() else None
        return self._analysis[key]

    def routes(self, arm: str, seed: int) -> dict[str, np.ndarray]:
        key = (arm, seed)
        if key not in self._routes:
            self._routes[key] = _routes(self.dir(arm, seed))
        return self._routes[key]


def _run_record(runs: _Runs, arm: str, seed: int) -> dict | None:
    spec = runs.spec
    a = runs.analysis(arm, seed)
    if a is None:
        return None
    E = a["num_experts"]
    primary = spec.primary_data
    own = spec.arm_data(arm)
    probe_ds = own if own in a["probe"] else primary  # tested where it was trained
    layers = a["probe"][probe_ds]["layers"]
    ev = a["eval"].get(own, {})
    rows = _rows(runs.dir(arm, seed))
    train = [r for r in rows if r["split"] == "train"]
    tail = train[-max(1, len(train) // 5):]
    rec: dict = {
        "arm": arm, "seed": seed, "data": own, "steps": a["step"],
        "caption_loss": ev.get("caption_loss"), "retrieval_r1": ev.get("retrieval_r1"),
        "retrieval_r5": ev.get("retrieval_r5"), "unigram_loss": ev.get("unigram_loss"),
        "image_ablated_loss": ev.get("image_ablated_loss"), "image_explained_loss": ev.get("image_explained_loss"),
        "spec": float(np.mean([lay["specialisation"] for lay in layers])),
        "spec_layers": [lay["specialisation"] for lay in layers],
        "wall_s": a.get("timing", {}).get("train_s"),
        "layers": a["moe_layers"],
    }
    for name in MODALITY_NAMES:
        rec[f"cv_{name}"] = float(np.mean([lay["cv"][name] for lay in layers]))
        rec[f"max_mean_{name}"] = float(np.mean([lay["max_mean"][name] for lay in layers]))
        rec[f"eff_{name}"] = float(np.mean([lay["effective_experts"][name] for lay in layers]))
        rec[f"dropped_{name}"] = float(np.mean([r.get(f"routing/dropped/{name}", 0.0) for r in tail])) if tail else None
    if all("cka_mean_offdiag" in lay for lay in layers):
        rec["cka"] = float(np.mean([lay["cka_mean_offdiag"]["all"] for lay in layers]))
        rec["cka_layers"] = [lay["cka_mean_offdiag"]["all"] for lay in layers]
        for name in MODALITY_NAMES:
            rec[f"cka_{name}"] = float(np.mean([lay["cka_mean_offdiag"].get(name, float("nan")) for lay in layers]))
    rec["curves"] = {
        "eval_loss": [[r["step"], r["caption_loss"]] for r in rows if r["split"] == "eval" and "caption_loss" in r],
        "train_spec": [[r["step"], r["routing/specialisation"]] for r in train if "routing/specialisation" in r],
        "track_spec": [[t["step"], [lay["specialisation"] for lay in t["layers"]]] for t in a["track"]],
    }
    cfg_path = runs.dir(arm, seed) / "config.yaml"
    if cfg_path.is_file():  # expert compute and capacity per modality (study/compute.py)
        rec.update(capacity_record(load_job_config(cfg_path).model, layers, runs.routes(arm, seed)[f"modality/{probe_ds}"]))
    _similarity(runs, rec, E)
    _transfer(runs, rec, a, E)
    return rec


def _similarity(runs: _Runs, rec: dict, E: int) -> None:
    """Matched top-1 agreement with the reference arm's final routing on the primary probe tokens."""
    spec, arm, seed = runs.spec, rec["arm"], rec["seed"]
    ref = spec.reference
    if not ref:
        return
    primary = spec.primary_data
    mine = runs.routes(arm, seed)
    ref_seeds = [s for s in spec.seeds if runs.analysis(ref, s) is not None and not (arm == ref and s == seed)]
    if not ref_seeds:
        return
    per_layer, shuffled, share = [], [], []
    modality = mine[f"modality/{primary}"]
    for s in ref_seeds:
        theirs = runs.routes(ref, s)[f"final/{primary}"]
        per_layer.append(_agreement(mine[f"final/{primary}"], theirs, E))
        shuffled.append([sm.shuffled_agreement(a, b, modality, E, seed=s) for a, b in zip(mine[f"final/{primary}"], theirs)])
        ref_layers = runs.analysis(ref, s)["probe"][primary]["layers"]
        my_layers = runs.analysis(arm, seed)["probe"][primary]["layers"]
        share.append([sm.share_similarity(m["load_ME"], r["load_ME"], sm.matched_agreement(a, b, E)[1])
                      for m, r, a, b in zip(my_layers, ref_layers, mine[f"final/{primary}"], theirs)])
    rec["agreement_layers"] = np.mean(per_layer, axis=0).tolist()
    rec["agreement"] = float(np.mean(per_layer))
    rec["agreement_shuffled"] = float(np.mean(shuffled))
    rec["share_similarity"] = float(np.mean(share))
    track = []
    for key in sorted((k for k in mine if k.startswith("track/")), key=lambda k: int(k.split("/")[1])):
        step = int(key.split("/")[1])
        vals = [_agreement(mine[key], runs.routes(ref, s)[f"final/{primary}"], E) for s in ref_seeds]
        track.append([step, np.mean(vals, axis=0).tolist()])
    rec["curves"]["track_agreement"] = track


def _transfer(runs: _Runs, rec: dict, a: dict, E: int) -> None:
    """On the transfer data set: eval, specialisation, how the routing pattern moved (same model,
    so experts are aligned), and agreement with the arm trained on that data set."""
    spec, arm, seed = runs.spec, rec["arm"], rec["seed"]
    t = spec.transfer
    if t is None or t.to not in a["probe"]:
        return
    primary = spec.primary_data
    to_layers = a["probe"][t.to]["layers"]
    src_layers = a["probe"][primary]["layers"]
    ev = a["eval"].get(t.to, {})
    out = {
        "caption_loss": ev.get("caption_loss"), "retrieval_r1": ev.get("retrieval_r1"),
        "spec": float(np.mean([lay["specialisation"] for lay in to_layers])),
        "pattern_similarity": float(np.mean([sm.share_similarity(s["load_ME"], d["load_ME"]) for s, d in zip(src_layers, to_layers)])),
        "text_share": float(np.mean(runs.routes(arm, seed)[f"modality/{t.to}"] == 1)),
        "text_share_source": float(np.mean(runs.routes(arm, seed)[f"modality/{primary}"] == 1)),
    }
    target_arm = t.trained_on_target.get(arm)
    if target_arm:
        mine = runs.routes(arm, seed)[f"final/{t.to}"]
        vals = [np.mean(_agreement(mine, runs.routes(target_arm, s)[f"final/{t.to}"], E))
                for s in spec.seeds if runs.analysis(target_arm, s) is not None]
        if vals:
            out["agreement_with_target_trained"] = float(np.mean(vals))
    peers = [np.mean(_agreement(runs.routes(arm, seed)[f"final/{t.to}"], runs.routes(arm, s)[f"final/{t.to}"], E))
             for s in spec.seeds if s != seed and runs.analysis(arm, s) is not None]
    if peers:
        out["agreement_seed_to_seed"] = float(np.mean(peers))
    rec["transfer"] = out


def collect(spec: StudySpec, out: str | Path) -> dict:
    """{"runs": [record, ...], "arms": {arm: {key: [mean, std, n]}}, "missing": [...]}; also written
    to ``<out>/results.json``."""
    out = Path(out)
    runs = _Runs(spec, out)
    records, missing = [], []
    for arm in spec.arms:
        for seed in spec.seeds:
            r = _run_record(runs, arm, seed)
            (records if r is not None else missing).append(r if r is not None else run_dir_name(arm, seed))
    arms: dict[str, dict] = {}
    scalar_keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "seed"})
    for arm in spec.arms:
        mine = [r for r in records if r["arm"] == arm]
        if not mine:
            continue
        stats = {k: list(mean_std([r.get(k) for r in mine])) for k in scalar_keys}
        t_keys = sorted({k for r in mine for k in r.get("transfer", {})})
        stats["transfer"] = {k: list(mean_std([r["transfer"].get(k) for r in mine if "transfer" in r])) for k in t_keys}
        arms[arm] = stats
    result = {"study": spec.name, "runs": records, "arms": arms, "missing": missing}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
