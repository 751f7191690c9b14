"""The report sections of the separation, compute-per-modality and concept experiments.

``report.py`` writes the frame and the other sections; each function here returns markdown lines
and draws its plots into ``plots``. They read only what the runner wrote (``separation.json``, the
runs' ``config.yaml`` / ``analysis.json`` / ``routes.npz`` / ``concepts.json``), like the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..runtime.config import from_dict
from ..runtime.modality import MODALITY_NAMES
from .concepts import SPECIALIST_U
from .plots import arm_label, plot_concepts, plot_frontier, plot_separation
from .separation import SeparationSpec, summarise, verdict
from .spec import StudySpec, run_dir_name

__all__ = ["compute_section", "concepts_section", "separation_section"]


def _fmt(v: list, digits: int = 3) -> str:
    m, s = v[0], v[1]
    if m is None or not math.isfinite(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _table(*columns: str) -> list[str]:
    """A markdown table's header and rule."""
    return [_row(*columns), "|" + "---|" * len(columns)]


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def separation_section(spec: StudySpec, out: Path, plots: Path) -> list[str]:
    path = out / "separation.json"
    if not path.is_file():
        return ["(not run yet: the study's `separation` block runs before the trainings)", ""]
    saved = json.loads(path.read_text())
    sep = from_dict(SeparationSpec, saved["spec"], "separation")
    summary = summarise(sep, saved)
    K = sep.experts // sep.modalities
    md = [f"Synthetic tokens in R^{sep.hidden}, {sep.modalities} modalities × {K} Gaussian components, "
          f"{sep.experts} experts; a token's expert is fixed by its modality (which half) and component (which "
          f"expert in it). Component means {sep.component_sep:g} noise units from the origin, shared directions; "
          f"modality-specific covariances (eigenvalue ratio {sep.anisotropy:g}); the *modality offset* s separates "
          "the modalities' means (s = 0: only the covariance tells them apart, which no linear gate can read). "
          f"Linear routers of rank r = {min(sep.all_ranks())}..{max(sep.all_ranks())} trained on the known routing "
          f"({sep.n_train} tokens, {sep.steps} full-batch Adam steps), evaluated on {sep.n_eval} fresh tokens; "
          f"{len(sep.seeds)} seeds, each its own draw of the problem and init. *params needed* = per seed the "
          f"smallest router reaching routing accuracy {sep.target_accuracy:g} (or eval cross-entropy "
          f"≤ {sep.target_loss:g} nats), mean ± std over the seeds that reach it. Definitions: `study/separation.py`; "
          f"{saved.get('seconds', 0):.0f} s on this machine.", "",
          *_table("offset s", "arm", "params needed (acc.)", "params needed (loss)", "best accuracy",
                  "accuracy at full rank", "loss at full rank", "agreement with Bayes routing")]

    def needed(n: dict) -> str:
        if not n["reached"]:
            return "never"
        return f"{n['params'][0]:.0f} ± {n['params'][1]:.0f}" + ("" if n["reached"] == n["seeds"] else f" ({n['reached']}/{n['seeds']})")

    for key, entry in summary.items():
        for arm, a in entry["arms"].items():
            fr = a["full_rank"]
            md.append(_row(key, arm, needed(a["needed"]["accuracy"]), needed(a["needed"]["loss"]), _fmt(a["best_accuracy"]),
                           _fmt(fr["accuracy"]), _fmt(fr["loss"]), _fmt(fr["agreement_bayes"])))
        b = entry["bayes"]
        md.append(_row(key, "Bayes-optimal", "", "", "", f"{_fmt(b['aware_accuracy'])} with m / {_fmt(b['agnostic_accuracy'])} without",
                       f"{_fmt(b['aware_loss'])} / {_fmt(b['agnostic_loss'])}", ""))
    md += [""] + [f"- {line}" for line in verdict(sep, summary)] + [""]
    plot_separation(summary, sep.target_accuracy, plots / "separation.png")
    return md + ["![routing accuracy vs router parameters](plots/separation.png)", ""]


def compute_section(spec: StudySpec, arms: dict, names: list[str], plots: Path) -> list[str]:
    """Per-modality top-k: the capacity table and the quality / compute frontier."""
    shown = [a for a in names if a in arms and "moe_flops" in arms[a]]
    if not shown:
        return ["(no finished run of these arms yet)", ""]
    im, tx = MODALITY_NAMES[0], MODALITY_NAMES[1]
    md = ["*MoE MFLOPs* = forward FLOPs (2 per multiply-add) of the routed experts (top-k of the token's modality × one "
          "expert's matmuls), the shared experts and the router, summed over the MoE layers, per token; attention, dense "
          "layers, embeddings and the LM head are the same in every arm and not counted (`study/compute.py`). "
          "*Slots/token* and *slot share* are measured on the eval probe tokens (dropless): the expert slots each modality "
          "routes per token and its share of all slots (mean over MoE layers); *token share* is its share of the tokens. "
          "Quality on the image side: *loss the image explains* (caption loss with other samples' images minus the "
          "caption loss) and R@1.", "",
          *_table("arm", f"top-k {im} / {tx}", f"slots/token {im} / {tx}", f"token share {im}", f"slot share {im}",
                  f"MoE MFLOPs per {im} / {tx} token", "mean MoE MFLOPs/token", "caption loss", "loss the image explains", "R@1")]
    for a in shown:
        r = arms[a]
        md.append(_row(arm_label(spec, a), f"{r[f'top_k_{im}'][0]:.0f} / {r[f'top_k_{tx}'][0]:.0f}",
                       f"{r[f'slots_per_token_{im}'][0]:.2f} / {r[f'slots_per_token_{tx}'][0]:.2f}", f"{r[f'token_share_{im}'][0]:.2f}",
                       _fmt(r[f"slot_share_{im}"]), f"{r[f'moe_flops_{im}'][0] / 1e6:.3f} / {r[f'moe_flops_{tx}'][0] / 1e6:.3f}",
                       f"{r['moe_flops'][0] / 1e6:.3f}", *(_fmt(r.get(k, [math.nan] * 2)) for k in
                                                           ("caption_loss", "image_explained_loss", "retrieval_r1"))))
    plot_frontier(spec, arms, shown, plots / "frontier.png")
    return md + ["", "![quality vs expert compute per token](plots/frontier.png)", ""]


def _concepts_of(out: Path, arm: str, seed: int) -> dict | None:
    p = out / "runs" / run_dir_name(arm, seed) / "concepts.json"
    c = json.loads(p.read_text()) if p.is_file() else None
    return c if c and c.get("available") else None


def _with_parts(listed: list[tuple]) -> list[tuple]:
    """Specialist rows with the per-modality split flattened (files of CONCEPTS_VERSION 1 lack it)."""
    return [(*t[:7], *(t[7] if len(t) > 7 else [math.nan, math.nan])) for t in listed]


def concepts_section(spec: StudySpec, out: Path, names: list[str], plots: Path, max_listed: int = 25) -> list[str]:
    """Expert / concept MI: per arm the strongest association over layers, and every specialist."""
    found = {a: {s: c for s in spec.seeds if (c := _concepts_of(out, a, s)) is not None} for a in names}
    found = {a: v for a, v in found.items() if v}
    if not found:
        return ["(no concept labels measured: the primary data set carries no scene metadata, or no run is finished)", ""]
    im, tx = MODALITY_NAMES[0], MODALITY_NAMES[1]
    md = ["Per MoE layer, expert e and concept c, with r_e = \"routed to e in one of its top-k slots\" on the primary "
          "probe tokens: u(e; c) = I(r_e; c) / min(H(r_e), H(c)) ∈ [0, 1] and the within-modality "
          "u(e; c | m) = I(r_e; c | m) / min(H(r_e | m), H(c | m)), which removes what the modality alone explains "
          "(a text expert has u(e; red) > 0 only because the word red is text); u(e; m) is the same score for the modality. "
          f"Concepts: colour, shape and size words and the image patches at least 25% covered by such an object; relation "
          f"words (text only). An expert *specialises to a concept* when u(e; c | m) ≥ {SPECIALIST_U} and exceeds u(e; m) "
          "(`study/concepts.py`). Table: per run the largest value over experts and concepts, mean over MoE layers, then "
          "mean ± std over seeds.", "",
          *_table("arm", "max u(e; c)", "max u(e; c \\| m)", "max u(e; m)", "specialists per run")]
    listed = []
    for a, by_seed in found.items():
        stats = {k: [] for k in ("u", "cu", "um", "n")}
        for seed, c in by_seed.items():
            stats["u"].append(np.mean([np.max(lay["u"]) for lay in c["layers"]]))
            stats["cu"].append(np.mean([np.max(lay["cu"]) for lay in c["layers"]]))
            stats["um"].append(np.mean([np.max(lay["u_modality"]) for lay in c["layers"]]))
            stats["n"].append(sum(len(lay["specialists"]) for lay in c["layers"]))
            listed += [(a, seed, lay["layer"], *sp) for lay in c["layers"] for sp in lay["specialists"]]
        ms = {k: [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0] for k, v in stats.items()}
        md.append(_row(arm_label(spec, a), _fmt(ms["u"]), _fmt(ms["cu"]), _fmt(ms["um"]), _fmt(ms["n"], 1)))
    md.append("")
    if listed:
        listed.sort(key=lambda t: -t[5])
        rows = _with_parts(listed)
        md += [f"Experts that specialise to a concept ({len(listed)} over all runs and layers"
               + (f"; the {max_listed} strongest listed" if len(listed) > max_listed else "")
               + f"); the last column splits u's numerator: p(m)·I(r_e; c | m) on {im} and on {tx} tokens:", "",
               *_table("arm", "seed", "layer", "expert", "concept", "u(e; c \\| m)", "u(e; m)", f"in {im} / {tx} tokens (bits)")]
        md += [_row(arm_label(spec, a), s, lay, e, c, f"{cu:.3f}", f"{um:.3f}", " / ".join(f"{x:.3f}" for x in parts[:2]))
               for a, s, lay, e, c, cu, um, *parts in rows[:max_listed]]
        counts: dict[str, int] = {}
        for t in listed:
            counts[t[4]] = counts.get(t[4], 0) + 1
        on_image = sum(1 for t in rows if t[7] > t[8])
        on_text = sum(1 for t in rows if t[8] >= t[7])
        md += ["", "By concept: " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
               + f". Mostly on {im} tokens: {on_image}; on {tx} tokens: {on_text}.", ""]
    else:
        md += [f"No expert of any run specialises to a concept by this rule (u(e; c | m) ≥ {SPECIALIST_U} and above u(e; m)).", ""]
    plot_concepts(spec, out, list(found), plots / "concepts.png")
    return md + ["![expert / concept mutual information](plots/concepts.png)", ""]
