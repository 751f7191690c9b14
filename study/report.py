"""The study report: ``report.md`` with mean ± std tables per experiment, and PNG plots.

Differences between two arms are called "within seed noise" when |Δ| < 2·SE, SE = √(s_a²/n_a + s_b²/n_b)
(sample standard deviations over seeds): with 3 seeds that is a rough screen, not a significance test,
and the report says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..runtime.modality import MODALITY_NAMES
from .aggregate import HEADLINE, collect
from .plots import arm_label, n_layers, plot_bars, plot_cka, plot_eval_curves, plot_load, plot_per_layer, plot_transfer
from .sections import compute_section, concepts_section, separation_section
from .spec import StudySpec, run_dir_name

__all__ = ["write_study_report", "delta"]

def _fmt(m: float, s: float | None = None, digits: int = 3) -> str:
    if m is None or not math.isfinite(m):
        return "–"
    if s is None or not math.isfinite(s):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def delta(arms: dict, a: str, b: str, key: str) -> tuple[float, float, bool]:
    """(mean_b − mean_a, its standard error, within seed noise?) for a scalar of two arms."""
    ma, sa, na = arms[a].get(key, [math.nan, math.nan, 0])
    mb, sb, nb = arms[b].get(key, [math.nan, math.nan, 0])
    if not (na and nb):
        return math.nan, math.nan, True
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    d = mb - ma
    return d, se, abs(d) < 2 * se or (se == 0 and d == 0)


# ---- tables ---------------------------------------------------------------------------------------


def _headline_table(spec: StudySpec, arms: dict, names: list[str], columns=HEADLINE) -> list[str]:
    cols = [c for c in columns if any(c[0] in arms.get(a, {}) for a in names)]
    md = ["| arm | steps | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for a in names:
        if a not in arms:
            md.append(f"| {arm_label(spec, a)} | – | " + " | ".join("–" for _ in cols) + " |")
            continue
        cells = []
        for key, _, _ in cols:
            m, s, _n = arms[a].get(key, [math.nan, math.nan, 0])
            cells.append(_fmt(m, s, 1 if key == "wall_s" else 3))
        md.append(f"| {arm_label(spec, a)} | {spec.arm_steps(a)} | " + " | ".join(cells) + " |")
    return md


def _verdicts(spec: StudySpec, arms: dict, base: str, others: list[str],
              keys=(("caption_loss", "eval caption loss"), ("retrieval_r1", "R@1"), ("spec", "specialisation index"))) -> list[str]:
    md = []
    for o in others:
        if o not in arms or base not in arms:
            continue
        parts = []
        for key, title in keys:
            d, se, noise = delta(arms, base, o, key)
            if math.isfinite(d):
                parts.append(f"{title} {d:+.3f} (SE {se:.3f}, {'within seed noise' if noise else 'beyond 2 SE'})")
        if parts:
            md.append(f"- {arm_label(spec, o)} − {arm_label(spec, base)}: " + "; ".join(parts))
    return md


# ---- the report -----------------------------------------------------------------------------------


def _grid_text(spec: StudySpec, out: Path, records: list[dict]) -> list[str]:
    cfg = None
    runs = out / "runs"
    first = next((runs / run_dir_name(a, s) for a in spec.arms for s in spec.seeds
                  if (runs / run_dir_name(a, s) / "config.yaml").is_file()), None)
    if first is not None:
        from ..train.job_config import load_job_config

        cfg = load_job_config(first / "config.yaml")
    total = sum(r["wall_s"] or 0 for r in records)
    timing_path = out / "timing.json"
    end_to_end = ""
    if timing_path.is_file():
        t = json.loads(timing_path.read_text())
        end_to_end = (f" End to end (training, probes, evaluations; the last invocation that trained, "
                      f"{t['trained_runs']} runs, {t.get('jobs', 1)} at a time): {t['wall_s'] / 60:.1f} min.")
    md = [f"**Grid.** {len(spec.arms)} arms × {len(spec.seeds)} seeds (seeds {spec.seeds}) = "
          f"{len(spec.arms) * len(spec.seeds)} runs; {spec.steps} steps per run unless an arm scales it; "
          f"base config `{spec.base}` + the study's overrides. Summed training wall time "
          f"{total / 60:.1f} min (as measured by the runner; shared CPUs make it noisy).{end_to_end}", ""]
    if cfg is not None:
        m = cfg.model
        md.append(f"**Model.** hidden {m.hidden_size}, {m.num_layers} layers (MoE layers {m.moe_layers}), "
                  f"{m.moe.num_experts} experts top-{m.moe.top_k}, expert FFN {m.moe.ffn_hidden_size}, "
                  f"{m.image_size}×{m.image_size} images in {m.num_patches} patches, captions ≤ {m.max_text_len} tokens; "
                  f"batch {cfg.data.batch_size}, lr {cfg.train.lr}, lb_coef {m.moe.lb_coef}, "
                  f"capacity factor {m.moe.capacity_factor or 'dropless'} (train) / "
                  f"{m.moe.eval_capacity_factor or 'dropless'} (eval); device {cfg.train.device}, {cfg.train.dtype}.")
        md.append("")
    ds = ", ".join(f"`{n}` ({d.kind}, {d.n_train} train / {d.n_eval} eval)" for n, d in spec.data.items())
    md.append(f"**Data.** {ds}. Probe tokens: the first {spec.probe.batches} eval batches of "
              f"{spec.probe.batch_size} samples of each data set, identical for every run.")
    return md


def write_study_report(spec: StudySpec, out: str | Path) -> Path:
    """Collect the runs and write ``report.md`` + ``plots/*.png`` into ``out``; returns the report path."""
    out = Path(out)
    result = collect(spec, out)
    records, arms = result["runs"], result["arms"]
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    dynamics_arms = next((e.arms for e in spec.experiments if e.kind == "dynamics"), [])
    md = [f"# Routing study `{spec.name}`", ""]
    if spec.description:
        md += [spec.description.strip(), ""]
    md += _grid_text(spec, out, records) + [""]
    md += [
        "Every number is the mean ± sample std over seeds. Δ lines compare two arms: *within seed noise* means",
        f"|Δ| < 2·SE with SE = √(s_a²/n_a + s_b²/n_b); with {len(spec.seeds)} seeds this is a screen, not a significance test.",
        "Definitions and formulas: `docs/routing-study.md`. *spec. index* = I(modality; expert)/H(modality) of",
        "the routed slots on the probe tokens of the data set the arm trained on (mean over MoE layers);",
        "*CV* = coefficient of variation of a modality's expert shares; *dropped* = fraction of routed slots",
        "over capacity (training, last 20% of logs); *agreement w/ ref.* = Hungarian-matched top-1 agreement",
        f"with the `{spec.reference}` arm's routing on the `{spec.primary_data}` probe tokens (for the reference itself:",
        "with its other seeds); *expert CKA* = mean linear CKA between distinct experts' outputs on the same",
        "tokens (lower = more distinct); *wall s* = training time as measured (noisy on a shared CPU).",
        "",
    ]
    if result["missing"]:
        md += [f"**Missing runs** (not finished or not analysed): {', '.join(result['missing'])}", ""]
    md += ["## All arms", ""] + _headline_table(spec, arms, list(spec.arms)) + [""]
    plot_bars(spec, arms, plots / "bars.png")
    plot_eval_curves(spec, records, plots / "eval_loss.png", [a for a in dynamics_arms if a in spec.arms])
    md += ["![headline metrics per arm](plots/bars.png)", "", "![held-out loss over training](plots/eval_loss.png)", ""]
    for e in spec.experiments:
        md += [f"## {e.title}", ""]
        if e.question:
            md += [f"*{e.question.strip()}*", ""]
        names = [a for a in e.arms if a in spec.arms]
        if e.kind == "compare":
            md += _headline_table(spec, arms, names) + [""]
            md += _verdicts(spec, arms, names[0], names[1:]) + [""]
            for a in names:
                if spec.arms[a].target_from:
                    tp = out / "targets" / f"{a}.json"
                    if tp.is_file():
                        t = json.loads(tp.read_text())["target_ME"]
                        md += [f"Target used by `{a}` (from `{spec.arms[a].target_from}`, experts sorted by image lean, "
                               "rows image / text):", "", "```", *[" ".join(f"{x:.3f}" for x in row) for row in t], "```", ""]
            if e is next((x for x in spec.experiments if x.kind == "compare"), None):
                plot_load(spec, out, [a for a in spec.arms if spec.arm_data(a) == spec.primary_data and spec.arms[a].steps_mult == 1],
                           plots / "load.png")
                md += ["![per-modality expert load](plots/load.png)", ""]
        elif e.kind == "dynamics":
            md += _dynamics(spec, arms, records, names, plots)
        elif e.kind == "cka":
            md += _cka_section(spec, arms, names, out, plots)
        elif e.kind == "transfer":
            md += _transfer_section(spec, arms, plots)
        elif e.kind == "separation":
            md += separation_section(spec, out, plots)
        elif e.kind == "concepts":
            md += concepts_section(spec, out, names, plots)
        elif e.kind == "compute":
            md += compute_section(spec, arms, names, plots)
            md += _verdicts(spec, arms, names[0], names[1:], keys=(("caption_loss", "eval caption loss"),
                            ("image_explained_loss", "loss the image explains"), ("retrieval_r1", "R@1"))) + [""]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _dynamics(spec: StudySpec, arms: dict, records: list[dict], names: list[str], plots: Path) -> list[str]:
    md = _headline_table(spec, arms, names) + [""]
    md += _verdicts(spec, arms, names[0], names[1:]) + [""]
    ref = spec.reference
    ceiling = [r["agreement_layers"] for r in records if r["arm"] == ref and "agreement_layers" in r]
    ceil_l = np.mean(ceiling, axis=0).tolist() if ceiling else []
    shuffled = [r.get("agreement_shuffled") for r in records if r["arm"] in names and r.get("agreement_shuffled") is not None]
    ref_spec = [r["spec_layers"] for r in records if r["arm"] == ref]
    ref_spec_l = np.mean(ref_spec, axis=0).tolist() if ref_spec else []
    plot_per_layer(spec, records, names, "track_spec", "specialisation index", plots / "specialisation.png",
                    {f"{ref} final": ref_spec_l})
    tracked = [a for a in names if a != ref]
    hl = {f"{ref} seed-to-seed": ceil_l}
    if shuffled:
        hl["modality-only baseline"] = [float(np.mean(shuffled))] * len(ceil_l)
    plot_per_layer(spec, records, tracked, "track_agreement", f"top-1 agreement with {ref} (final)",
                    plots / "agreement.png", hl)
    md += ["![specialisation per layer over training](plots/specialisation.png)", "",
           "![agreement with the reference router over training](plots/agreement.png)", ""]
    md += ["Per layer at each probed checkpoint (mean over seeds): specialisation index / agreement with "
           f"`{ref}`'s final routing. Seed-to-seed = `{ref}` vs its other seeds (how reproducible the reference "
           "pattern is); modality-only baseline = agreement after shuffling a router's choices among tokens of the "
           "same modality (what per-modality load shares alone explain).", ""]
    layers = n_layers(records)
    md += ["| arm | step | " + " | ".join(f"spec. L{lay}" for lay in layers) + " | "
           + " | ".join(f"agree L{lay}" for lay in layers) + " |", "|---|---|" + "---|" * (2 * len(layers))]
    for a in names:
        mine = [r for r in records if r["arm"] == a]
        steps = sorted({s for r in mine for s, _ in r["curves"]["track_spec"]})
        for st in steps:
            sp = [v for r in mine for s, v in r["curves"]["track_spec"] if s == st]
            ag = [v for r in mine for s, v in r["curves"].get("track_agreement", []) if s == st]
            row = [_fmt(float(np.mean([x[i] for x in sp]))) for i in range(len(layers))]
            row += [_fmt(float(np.mean([x[i] for x in ag]))) if ag else "–" for i in range(len(layers))]
            md.append(f"| {arm_label(spec, a)} | {st} | " + " | ".join(row) + " |")
    md += ["", f"`{ref}` seed-to-seed agreement per layer: " + ", ".join(_fmt(x) for x in ceil_l)
           + (f"; modality-only baseline ≈ {np.mean(shuffled):.3f}" if shuffled else ""), ""]
    return md


def _cka_section(spec: StudySpec, arms: dict, names: list[str], out: Path, plots: Path) -> list[str]:
    cols = [("cka", "CKA all tokens", True)] + [(f"cka_{m}", f"CKA {m} tokens", True) for m in MODALITY_NAMES] + \
           [(f"eff_{m}", f"effective experts {m}", False) for m in MODALITY_NAMES]
    md = _headline_table(spec, arms, names, cols) + [""]
    md += _verdicts(spec, arms, names[0], names[1:], keys=(("cka", "mean pairwise CKA"),) +
                    tuple((f"cka_{m}", f"CKA on {m} tokens") for m in MODALITY_NAMES)) + [""]
    plot_cka(spec, out, arms, names, plots / "cka.png", plots / "cka_bars.png")
    return md + ["![mean expert CKA per arm](plots/cka_bars.png)", "", "![expert CKA matrices](plots/cka.png)", ""]


def _transfer_section(spec: StudySpec, arms: dict, plots: Path) -> list[str]:
    t = spec.transfer
    if t is None:
        return ["(no transfer data set configured)", ""]
    src = spec.primary_data
    md = [f"Trained on `{src}`, evaluated and probed on `{t.to}`; the reference is the same arm trained on `{t.to}`. "
          "*pattern similarity* = 1 − JSD between the model's own per-modality expert shares on the two data sets "
          "(same model, experts aligned; 1 = unchanged); *agreement* columns are Hungarian-matched top-1 agreement "
          f"on `{t.to}` probe tokens.", "",
          f"| arm | loss on {src} | loss on {t.to} | loss, trained on {t.to} | R@1 on {t.to} | spec. on {src} | spec. on {t.to} "
          f"| pattern similarity | agreement w/ {t.to}-trained | seed-to-seed on {t.to} |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for a in t.arms:
        if a not in arms:
            continue
        tr = arms[a]["transfer"]
        own = arms.get(t.trained_on_target.get(a, ""), {})
        own_peer = own.get("transfer", {}).get("agreement_seed_to_seed") if own else None

        def g(d, k):
            return _fmt(*d.get(k, [math.nan, math.nan, 0])[:2])

        md.append(f"| {arm_label(spec, a)} | {g(arms[a], 'caption_loss')} | {g(tr, 'caption_loss')} | "
                  f"{g(own, 'caption_loss') if own else '–'} | {g(tr, 'retrieval_r1')} | {g(arms[a], 'spec')} | {g(tr, 'spec')} | "
                  f"{g(tr, 'pattern_similarity')} | {g(tr, 'agreement_with_target_trained')} | {g(tr, 'agreement_seed_to_seed')} |")
        if own_peer:
            md.append(f"| ↳ `{t.trained_on_target[a]}` (trained on {t.to}) | | | | | | {_fmt(*own['spec'][:2])} | | | "
                      f"{_fmt(*own_peer[:2])} |")
    shares = next((arms[a]["transfer"] for a in t.arms if a in arms and "text_share" in arms[a]["transfer"]), None)
    if shares:
        md.append("")
        md.append(f"Text tokens are {100 * shares['text_share_source'][0]:.0f}% of the `{src}` probe tokens and "
                  f"{100 * shares['text_share'][0]:.0f}% of the `{t.to}` ones.")
    md.append("")
    if len(t.arms) >= 2 and all(a in arms for a in t.arms[:2]):
        a, b = t.arms[:2]
        for key, title in (("caption_loss", f"caption loss on {t.to}"), ("pattern_similarity", "pattern similarity"),
                           ("agreement_with_target_trained", f"agreement with {t.to}-trained")):
            d, se, noise = delta({a: arms[a]["transfer"], b: arms[b]["transfer"]}, a, b, key)
            if math.isfinite(d):
                md.append(f"- {title}: {arm_label(spec, b)} − {arm_label(spec, a)} = {d:+.3f} (SE {se:.3f}, "
                          f"{'within seed noise' if noise else 'beyond 2 SE'})")
        md.append("")
    plot_transfer(spec, arms, plots / "transfer.png")
    return md + ["![transfer](plots/transfer.png)", ""]
