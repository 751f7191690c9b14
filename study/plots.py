"""The study report's plots (PNG): bars of the per-arm means, curves with seed bands, routing load
and expert-similarity heatmaps, the transfer experiment. ``report.py`` writes the text around them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ..runtime.modality import MODALITY_NAMES
from .spec import StudySpec, run_dir_name

__all__ = ["arm_colour", "arm_label", "n_layers", "plot_bars", "plot_cka", "plot_eval_curves", "plot_load", "plot_per_layer",
           "plot_concepts", "plot_frontier", "plot_separation", "plot_transfer"]

_DPI = 110
_COLOURS = plt.get_cmap("tab10").colors


def _save(fig, path: Path, **kwargs) -> None:
    """Save as a 256-colour PNG: plots have few colours, and the file is about 3x smaller."""
    from PIL import Image

    fig.savefig(path, dpi=_DPI, **kwargs)
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def arm_label(spec: StudySpec, arm: str) -> str:
    return spec.arms[arm].label or arm


def arm_colour(spec: StudySpec, arm: str):
    return _COLOURS[list(spec.arms).index(arm) % len(_COLOURS)]


def _band(ax, series: list[list], colour, label: str, layer: int | None = None) -> None:
    """Mean ± std over seeds of [[step, value-or-per-layer-list], ...] curves, on common steps."""
    by_step: dict[int, list[float]] = {}
    for curve in series:
        for step, v in curve:
            val = v[layer] if layer is not None else v
            if val is not None and math.isfinite(val):
                by_step.setdefault(int(step), []).append(val)
    if not by_step:
        return
    steps = sorted(by_step)
    mean = np.array([np.mean(by_step[s]) for s in steps])
    std = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in steps])
    ax.plot(steps, mean, color=colour, label=label, marker="o", markersize=3, linewidth=1.6)
    ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)


def _curves_of(records: list[dict], arm: str, name: str) -> list[list]:
    return [r["curves"].get(name, []) for r in records if r["arm"] == arm]


def plot_bars(spec: StudySpec, arms: dict, path: Path) -> None:
    panels = [("caption_loss", "eval caption loss (nats/token)"), ("retrieval_r1", "retrieval R@1"),
              ("spec", "specialisation index I(m;e)/H(m)"), ("cv", "load CV per modality (0 = even)"),
              ("agreement", f"top-1 agreement with {spec.reference or 'ref.'}"), ("cka", "mean pairwise expert CKA")]
    names = [a for a in spec.arms if a in arms]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    x = np.arange(len(names))
    for ax, (key, title) in zip(axes.flat, panels):
        if key == "cv":
            for j, m in enumerate(MODALITY_NAMES):
                vals = [arms[a].get(f"cv_{m}", [math.nan, 0, 0]) for a in names]
                ax.bar(x + (j - 0.5) * 0.38, [v[0] for v in vals], 0.38, yerr=[v[1] for v in vals], capsize=3,
                       label=m, color=["#4477aa", "#ee6677"][j % 2])
            ax.legend(fontsize=8)
        else:
            vals = [arms[a].get(key, [math.nan, 0, 0]) for a in names]
            ax.bar(x, [v[0] for v in vals], 0.7, yerr=[v[1] for v in vals], capsize=3,
                   color=[arm_colour(spec, a) for a in names])
            finite = [v[0] for v in vals if math.isfinite(v[0])]
            if finite and key == "caption_loss":
                lo = min(v[0] - v[1] for v in vals if math.isfinite(v[0]))
                ax.set_ylim(max(0.0, lo * 0.9), max(v[0] + v[1] for v in vals if math.isfinite(v[0])) * 1.05)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, [arm_label(spec, a) for a in names], rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{spec.name}: mean ± std over {len(spec.seeds)} seeds", fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_eval_curves(spec: StudySpec, records: list[dict], path: Path, dynamics_arms: list[str]) -> None:
    base = [a for a in spec.arms if spec.arms[a].steps_mult == 1 and spec.arm_data(a) == spec.primary_data]
    fig, axes = plt.subplots(1, 2 if dynamics_arms else 1, figsize=(13 if dynamics_arms else 7, 4.2), squeeze=False)
    panels = [(base, f"held-out caption loss over training ({spec.steps} steps)")]
    if dynamics_arms:
        panels.append((dynamics_arms, "longer training (the dynamics experiment's arms)"))
    for ax, (names, title) in zip(axes[0], panels):
        for a in names:
            _band(ax, _curves_of(records, a, "eval_loss"), arm_colour(spec, a), arm_label(spec, a))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(f"caption loss on {spec.primary_data} (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def n_layers(records: list[dict]) -> list[int]:
    return records[0]["layers"] if records else []


def plot_per_layer(spec: StudySpec, records: list[dict], arms_shown: list[str], curve: str, ylabel: str,
                    path: Path, hlines: dict[str, list[float]] | None = None) -> None:
    layers = n_layers(records)
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 4), squeeze=False)
    for li, (ax, layer) in enumerate(zip(axes[0], layers)):
        for a in arms_shown:
            _band(ax, _curves_of(records, a, curve), arm_colour(spec, a), arm_label(spec, a), layer=li)
        for text, values in (hlines or {}).items():
            if li < len(values) and math.isfinite(values[li]):
                ax.axhline(values[li], linestyle="--", color="grey", linewidth=1)
                ax.text(ax.get_xlim()[0], values[li], " " + text, fontsize=7, va="bottom", color="dimgrey")
        ax.set_title(f"MoE layer {layer}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _sorted_experts(load_ME: np.ndarray) -> np.ndarray:
    s = load_ME / np.maximum(load_ME.sum(1, keepdims=True), 1e-12)
    return np.argsort(-(s[0] - s[1:].mean(0)), kind="stable")


def plot_load(spec: StudySpec, out: Path, arms_shown: list[str], path: Path) -> None:
    seed, analyses = _first_seed_analyses(spec, out, arms_shown)
    if not analyses:
        return
    n_layers = len(next(iter(analyses.values()))["probe"][spec.primary_data]["layers"])
    fig, axes = plt.subplots(len(analyses), n_layers, figsize=(4.2 * n_layers, 1.5 + 1.1 * len(analyses)), squeeze=False)
    for r, (a, an) in enumerate(analyses.items()):
        for c, lay in enumerate(an["probe"][spec.primary_data]["layers"]):
            load = np.array(lay["load_ME"])
            share = load / np.maximum(load.sum(1, keepdims=True), 1e-12)
            order = _sorted_experts(load)
            ax = axes[r, c]
            im = ax.imshow(share[:, order], aspect="auto", cmap="viridis", vmin=0, vmax=max(0.5, float(share.max())))
            ax.set_yticks(range(len(MODALITY_NAMES)), MODALITY_NAMES, fontsize=8)
            ax.set_xticks(range(share.shape[1]), [str(e) for e in order], fontsize=7)
            ax.set_title(f"{arm_label(spec, a)} — layer {lay['layer']} (spec. {lay['specialisation']:.2f})", fontsize=9)
            if r == len(analyses) - 1:
                ax.set_xlabel("expert (sorted by image lean)", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(f"share of each modality's routed slots per expert (probe tokens, seed {seed})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _analysis(out: Path, arm: str, seed: int) -> dict | None:
    p = out / "runs" / run_dir_name(arm, seed) / "analysis.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _first_seed_analyses(spec: StudySpec, out: Path, arms_shown: list[str]) -> tuple[int, dict[str, dict]]:
    """The first seed and the analyses its runs of ``arms_shown`` wrote (arms without one left out)."""
    seed = spec.seeds[0]
    analyses = {a: _analysis(out, a, seed) for a in arms_shown}
    return seed, {a: v for a, v in analyses.items() if v is not None}


def plot_cka(spec: StudySpec, out: Path, arms: dict, arms_shown: list[str], path: Path, bars_path: Path) -> None:
    """Heatmaps (rows: arms, columns: MoE layers, seed of the first run) and a bar chart of the means."""
    seed, analyses = _first_seed_analyses(spec, out, arms_shown)
    if not analyses:
        return
    n = len(next(iter(analyses.values()))["probe"][spec.primary_data]["layers"])
    fig, axes = plt.subplots(len(analyses), n, figsize=(3.3 * n + 0.8, 3.3 * len(analyses) + 0.4), squeeze=False,
                             layout="constrained")
    im = None
    for r, (a, an) in enumerate(analyses.items()):
        for c, lay in enumerate(an["probe"][spec.primary_data]["layers"]):
            ax = axes[r, c]
            order = _sorted_experts(np.array(lay["load_ME"]))
            im = ax.imshow(np.array(lay["cka"]["all"])[np.ix_(order, order)], cmap="magma", vmin=0, vmax=1)
            ax.set_title(f"{arm_label(spec, a)}, layer {lay['layer']}\nmean off-diagonal {lay['cka_mean_offdiag']['all']:.2f}", fontsize=9)
            ax.set_xticks(range(len(order)), [str(e) for e in order], fontsize=7)
            ax.set_yticks(range(len(order)), [str(e) for e in order], fontsize=7)
            ax.set_xlabel("expert (image-leaning first)", fontsize=8)
            ax.set_ylabel("expert", fontsize=8)
    fig.colorbar(im, ax=axes, fraction=0.03)
    fig.suptitle(f"linear CKA between experts' outputs on the same probe tokens (seed {seed})", fontsize=10)
    _save(fig, path, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.6 * len(arms_shown) + 3, 3.8))
    x = np.arange(len(arms_shown))
    for j, key in enumerate(["cka"] + [f"cka_{m}" for m in MODALITY_NAMES]):
        vals = [arms.get(a, {}).get(key, [math.nan, 0, 0]) for a in arms_shown]
        ax.bar(x + (j - 1) * 0.27, [v[0] for v in vals], 0.27, yerr=[v[1] for v in vals], capsize=2,
               label={"cka": "all probe tokens"}.get(key, key.removeprefix("cka_") + " tokens only"))
    ax.set_xticks(x, [arm_label(spec, a) for a in arms_shown], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mean CKA between distinct experts")
    ax.set_title(f"expert similarity (lower = more distinct), mean ± std over {len(spec.seeds)} seeds", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, bars_path)
    plt.close(fig)


def plot_transfer(spec: StudySpec, arms: dict, path: Path) -> None:
    t = spec.transfer
    names = [a for a in t.arms if a in arms]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = np.arange(len(names))
    for ax, (key, tkey, title) in zip(axes, [("caption_loss", "caption_loss", "eval caption loss"),
                                             ("retrieval_r1", "retrieval_r1", "retrieval R@1"),
                                             ("spec", "spec", "specialisation index")]):
        src = [arms[a].get(key, [math.nan, 0, 0]) for a in names]
        dst = [arms[a]["transfer"].get(tkey, [math.nan, 0, 0]) for a in names]
        own = [arms.get(t.trained_on_target.get(a, ""), {}).get(key, [math.nan, 0, 0]) for a in names]
        ax.bar(x - 0.27, [v[0] for v in src], 0.27, yerr=[v[1] for v in src], capsize=3, label=f"trained & tested on {spec.primary_data}")
        ax.bar(x, [v[0] for v in dst], 0.27, yerr=[v[1] for v in dst], capsize=3, label=f"trained on {spec.primary_data}, tested on {t.to}")
        ax.bar(x + 0.27, [v[0] for v in own], 0.27, yerr=[v[1] for v in own], capsize=3, label=f"trained & tested on {t.to}")
        ax.set_xticks(x, [arm_label(spec, a) for a in names], fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_separation(summary: dict, target: float, path: Path) -> None:
    """Per modality offset: routing accuracy vs router parameters (mean ± std over seeds), the
    target and the Bayes-optimal accuracies; last panel: the parameters each arm needs vs the offset."""
    offsets = list(summary)
    arms = list(next(iter(summary.values()))["arms"])
    fig, axes = plt.subplots(1, len(offsets) + 1, figsize=(3.6 * (len(offsets) + 1), 3.6), squeeze=False)
    for ax, key in zip(axes[0], offsets):
        entry = summary[key]
        for j, arm in enumerate(arms):
            c = entry["arms"][arm]["curve"]
            x = np.array([p["params"] for p in c])
            m = np.array([p["accuracy"][0] for p in c])
            sd = np.array([p["accuracy"][1] for p in c])
            ax.plot(x, m, marker="o", markersize=2.5, color=_COLOURS[j], label=arm, linewidth=1.4)
            ax.fill_between(x, m - sd, m + sd, color=_COLOURS[j], alpha=0.2, linewidth=0)
        b = entry["bayes"]
        ax.axhline(target, color="black", linewidth=0.8, linestyle=":")
        ax.axhline(b["aware_accuracy"][0], color="grey", linewidth=0.8, linestyle="--")
        ax.axhline(b["agnostic_accuracy"][0], color="grey", linewidth=0.8, linestyle="-.")
        ax.set_title(f"modality offset {key}\n(Bayes: -- with modality, -. without)", fontsize=9)
        ax.set_xlabel("router parameters")
        ax.set_ylabel("routing accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    ax = axes[0][-1]
    xs = [float(k) for k in offsets]
    for j, arm in enumerate(arms):
        need = [summary[k]["arms"][arm]["needed"]["accuracy"] for k in offsets]
        m = [n["params"][0] if n["reached"] else math.nan for n in need]
        sd = [n["params"][1] if n["reached"] else 0.0 for n in need]
        ax.errorbar(np.array(xs) + 0.08 * (j - 1), m, yerr=sd, marker="o", capsize=3, color=_COLOURS[j], label=arm)
        for x, n in zip(xs, need):
            if not n["reached"]:
                ax.annotate("never", (x + 0.08 * (j - 1), 0.5 - 0.07 * j), color=_COLOURS[j], fontsize=7,
                            xycoords=("data", "axes fraction"), ha="center")
    ax.set_xlabel("modality offset s (noise units)")
    ax.set_ylabel(f"parameters to reach accuracy {target:g}")
    ax.set_title("router parameters needed", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _frontier(xs: list[float], ys: list[float], lower_is_better: bool) -> list[int]:
    """Indices of the points no other point beats at no more compute, by compute."""
    sign = 1 if lower_is_better else -1
    order = sorted(range(len(xs)), key=lambda i: (xs[i], sign * ys[i]))
    keep, best = [], math.inf
    for i in order:
        if math.isfinite(ys[i]) and sign * ys[i] < best:
            keep.append(i)
            best = sign * ys[i]
    return keep


def plot_frontier(spec: StudySpec, arms: dict, names: list[str], path: Path) -> None:
    """Quality against the MoE FLOPs per token, overall and per modality, with the Pareto frontier."""
    names = [a for a in names if a in arms and "moe_flops" in arms[a]]
    if not names:
        return
    panels = [("moe_flops", "caption_loss", "eval caption loss", True, "mean over the probe's tokens"),
              ("moe_flops_text", "caption_loss", "eval caption loss", True, "per text token"),
              ("moe_flops_image", "image_explained_loss", "loss the image explains", False, "per image token"),
              ("moe_flops_image", "retrieval_r1", "retrieval R@1", False, "per image token")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (xk, yk, ylabel, lower, xtitle) in zip(axes, panels):
        xs = [arms[a][xk][0] / 1e6 for a in names]
        ys = [arms[a].get(yk, [math.nan, 0, 0])[0] for a in names]
        es = [arms[a].get(yk, [math.nan, 0, 0])[1] for a in names]
        for a, x, y, e in zip(names, xs, ys, es):
            ax.errorbar([x], [y], yerr=[e], marker="o", capsize=3, color=arm_colour(spec, a), label=arm_label(spec, a))
        front = _frontier(xs, ys, lower)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="black", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"MoE MFLOPs (forward) {xtitle}", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"quality vs expert compute, mean ± std over {len(spec.seeds)} seeds (dashed: the frontier)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_concepts(spec: StudySpec, out: Path, arms_shown: list[str], path: Path) -> None:
    """Per arm (first seed) and MoE layer: expert × concept normalised MI, overall and within modality."""
    seed = spec.seeds[0]
    runs = {}
    for a in arms_shown:
        p = out / "runs" / run_dir_name(a, seed) / "concepts.json"
        an = _analysis(out, a, seed)
        if p.is_file() and an is not None and json.loads(p.read_text()).get("available"):
            runs[a] = (json.loads(p.read_text()), an)
    if not runs:
        return
    n = len(next(iter(runs.values()))[0]["layers"])
    rows = [(a, kind) for a in runs for kind in ("u", "cu")]
    names = next(iter(runs.values()))[0]["concepts"]
    fig, axes = plt.subplots(len(rows), n, figsize=(0.32 * len(names) * n + 1.5, 0.3 * 8 * len(rows) + 1.6),
                             squeeze=False, layout="constrained")
    vmax = max(0.2, max(float(np.max(lay[k])) for c, _ in runs.values() for lay in c["layers"] for k in ("u", "cu")))
    im = None
    for r, (a, kind) in enumerate(rows):
        c, an = runs[a]
        for li, lay in enumerate(c["layers"]):
            load = np.array(an["probe"][c["data"]]["layers"][li]["load_ME"])
            order = _sorted_experts(load)
            ax = axes[r, li]
            im = ax.imshow(np.array(lay[kind])[order], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
            ax.set_yticks(range(len(order)), [str(e) for e in order], fontsize=6)
            ax.set_xticks(range(len(names)), [x.split(":")[1] for x in names], fontsize=6, rotation=90)
            what = "u(e; c)" if kind == "u" else "u(e; c | modality)"
            ax.set_title(f"{arm_label(spec, a)}, layer {lay['layer']}: {what}", fontsize=8)
            ax.set_ylabel("expert (image-leaning first)", fontsize=7)
    fig.colorbar(im, ax=axes, fraction=0.02)
    fig.suptitle(f"normalised mutual information between routing to an expert and a concept (seed {seed})", fontsize=9)
    _save(fig, path, bbox_inches="tight")
    plt.close(fig)
