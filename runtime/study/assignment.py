"""Optimal assignment (the Hungarian method): match the experts of two independently trained models.

Expert ids are arbitrary labels: expert 3 of one model has nothing to do with expert 3 of another.
Before two routers can be compared token by token, their experts are put in correspondence by the
permutation that maximises agreement; this solves that n×n problem exactly in O(n³), with no
dependency beyond numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["min_cost_assignment", "max_weight_assignment"]


def min_cost_assignment(cost_NN: np.ndarray) -> np.ndarray:
    """Permutation ``perm`` (row i ↦ column perm[i]) minimising Σ_i cost[i, perm[i]] of a square matrix.

    Shortest augmenting paths with row/column potentials (Kuhn–Munkres, Jonker–Volgenant style):
    rows are inserted one at a time; each insertion grows a Dijkstra-like tree over columns using the
    reduced costs cost[i, j] − u[i] − v[j] ≥ 0, then flips the alternating path it found.
    """
    cost = np.asarray(cost_NN, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"the assignment needs a square cost matrix, got shape {cost.shape}")
    if not np.all(np.isfinite(cost)):
        raise ValueError("the cost matrix must be finite")
    n = cost.shape[0]
    # 1-based bookkeeping: column 0 is a virtual column holding the row being inserted
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    row_of_col = np.zeros(n + 1, dtype=np.int64)  # 0 = free column
    prev_col = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of_col[0] = i
        j0 = 0
        dist = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of_col[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < dist[1:])
            dist[1:][better] = reduced[better]
            prev_col[1:][better] = j0
            candidates = np.where(free, dist[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[row_of_col[used]] += delta
            v[used] -= delta
            dist[1:][free] -= delta
            j0 = j1
            if row_of_col[j0] == 0:
                break
        while j0 != 0:  # flip the augmenting path back to the virtual column
            j1 = prev_col[j0]
            row_of_col[j0] = row_of_col[j1]
            j0 = j1
    perm = np.empty(n, dtype=np.int64)
    for j in range(1, n + 1):
        perm[row_of_col[j] - 1] = j - 1
    return perm


def max_weight_assignment(weight_NN: np.ndarray) -> np.ndarray:
    """Permutation maximising Σ_i weight[i, perm[i]] (e.g. a co-occurrence table of expert choices)."""
    w = np.asarray(weight_NN, dtype=np.float64)
    return min_cost_assignment(w.max() - w if w.size else w)
