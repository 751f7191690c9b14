"""The routing report of a run: PNG heatmaps of expert load per layer and modality, and a summary.

Reads what the trainer accumulated (one RoutingStats per MoE layer, summed over the logged window
or the whole run) and the metrics history; writes ``routing_report.md`` and ``routing_*.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..runtime.moe.stats import RoutingStats, specialisation_index  # noqa: E402

__all__ = ["write_routing_report"]


def _heatmaps(stats: list[RoutingStats], layers: list[int], names: list[str], path: Path) -> None:
    n = len(stats)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 1.2 + 0.5 * len(names) * rows + 0.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, s, layer in zip(axes.flat, stats, layers):
        share = s.load_share_ME().cpu().numpy()
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(share.max()), 1e-6))
        ax.set_title(f"layer {layer}: load share")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("fraction of each modality's routed tokens per expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(metrics_path: Path, names: list[str], path: Path) -> bool:
    if not metrics_path.exists():
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == "train"]
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [r.get("loss") for r in rows], label="loss")
    a.set_xlabel("step")
    a.set_title("training loss")
    for name in names:
        key = f"routing/entropy/{name}"
        if key in rows[0]:
            b.plot(steps, [r.get(key) for r in rows], label=f"entropy {name}")
    if "routing/specialisation" in rows[0]:
        b.plot(steps, [r.get("routing/specialisation") for r in rows], label="specialisation", linestyle="--")
    b.set_xlabel("step")
    b.set_title("routing (mean over MoE layers)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_routing_report(run_dir: Path, stats: list[RoutingStats], layers: list[int], names: list[str]) -> Path:
    run_dir = Path(run_dir)
    md = ["# Routing report", ""]
    if stats:
        _heatmaps(stats, layers, names, run_dir / "routing_load.png")
        md += ["![expert load per layer and modality](routing_load.png)", ""]
    if _curves(run_dir / "metrics.jsonl", names, run_dir / "routing_curves.png"):
        md += ["![loss and routing over training](routing_curves.png)", ""]
    md += [
        "Per MoE layer, over the tokens of the final logging window. *entropy*: mean per-token routing",
        "entropy in nats (log E is uniform); *max share*: the busiest expert's share of the modality's",
        "routed tokens (1/E is even); *dropped*: fraction of routed slots over capacity; *spec.*:",
        "I(modality; expert) / H(modality), 0 when experts ignore modality, 1 when they reveal it.",
        "",
        "| layer | modality | tokens | entropy | max share | busiest expert | dropped | spec. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, layer in zip(stats, layers):
        share, ent, drop = s.load_share_ME(), s.entropy_M(), s.dropped_fraction_M()
        spec = specialisation_index(s.load_ME)
        for m, name in enumerate(names):
            md.append(
                f"| {layer} | {name} | {int(s.tokens_M[m])} | {float(ent[m]):.3f} | {float(share[m].max()):.3f} | "
                f"{int(share[m].argmax())} | {float(drop[m]):.3f} | {spec:.3f} |"
            )
    out = run_dir / "routing_report.md"
    out.write_text("\n".join(md) + "\n")
    return out
