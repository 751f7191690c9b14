"""Router collapse alarm: an expert that a modality has stopped using is a silent capacity loss.

Checked at each logging step on the routing statistics the trainer has already summed over the
window and the data-parallel replicas: expert e of modality m in a layer is *starved* when its
share of m's routed slots is below ``share`` × the uniform share (1 / the experts m may use, after
``modality_partition``). Starved for ``window`` consecutive steps, it is *collapsed*: one warning
per (layer, modality, expert), and counted in the metrics while it lasts.
"""

from __future__ import annotations

import logging

from ..runtime.moe.stats import RoutingStats

__all__ = ["CollapseMonitor"]

log = logging.getLogger("modalmoe.health")


class CollapseMonitor:
    def __init__(
        self,
        layers: list[int],
        modality_names: list[str],
        num_experts: int,
        *,
        share: float,
        window: int,
        partition: list[int] | None = None,
    ):
        self.layers = layers
        self.names = modality_names
        self.share = share
        self.window = window
        self.allowed: list[range] = []
        start = 0
        for m in range(len(modality_names)):
            if partition:
                self.allowed.append(range(start, start + partition[m]))
                start += partition[m]
            else:
                self.allowed.append(range(num_experts))
        self.starved_since: dict[tuple[int, int, int], int] = {}
        self.warned: set[tuple[int, int, int]] = set()
        self.last_step = 0

    @property
    def enabled(self) -> bool:
        return self.share > 0 and bool(self.layers)

    def update(self, step: int, stats: list[RoutingStats]) -> dict[str, float]:
        """Feed the routing stats of steps ``(last update, step]``; returns the collapse metrics."""
        first = self.last_step + 1
        self.last_step = step
        if not self.enabled:
            return {}
        counts: dict[str, float] = {}
        for layer, s in zip(self.layers, stats):
            load_ME = s.load_ME.detach().double().cpu()
            for m, name in enumerate(self.names):
                allowed = self.allowed[m]
                total = float(load_ME[m, list(allowed)].sum())
                if total <= 0:
                    continue  # the modality did not occur in this window: no evidence either way
                threshold = self.share / len(allowed)
                collapsed = 0
                for e in allowed:
                    key = (layer, m, e)
                    share = float(load_ME[m, e]) / total
                    if share >= threshold:
                        self.starved_since.pop(key, None)
                        continue
                    since = self.starved_since.setdefault(key, first)
                    if step - since + 1 < self.window:
                        continue
                    collapsed += 1
                    if key not in self.warned:
                        self.warned.add(key)
                        log.warning(
                            "router collapse: layer %d, modality %s, expert %d got %.2f%% of the %s slots "
                            "(< %.2f%%) for the last %d steps; raise model.moe.lb_coef or lb_modality_coef, "
                            "or lower the learning rate",
                            layer, name, e, 100 * share, name, 100 * threshold, step - since + 1,
                        )
                counts[f"layer{layer}/collapsed/{name}"] = collapsed
        out = dict(counts)
        for name in self.names:
            out[f"routing/collapsed/{name}"] = sum(v for k, v in counts.items() if k.endswith(f"/collapsed/{name}"))
        return out

    def state_dict(self) -> dict:
        return {
            "starved_since": [[*k, v] for k, v in sorted(self.starved_since.items())],
            "warned": [list(k) for k in sorted(self.warned)],
            "last_step": self.last_step,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.starved_since = {(a, b, c): v for a, b, c, v in sd.get("starved_since", [])}
        self.warned = {tuple(k) for k in sd.get("warned", [])}
        self.last_step = int(sd.get("last_step", 0))
