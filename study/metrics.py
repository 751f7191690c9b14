"""The routing study's metrics, as pure functions of routing tables and representations.

Legend: M modalities, E experts, N probe tokens, D feature width. Formulas (also in
``docs/routing-study.md``); logs are natural unless said otherwise:

* specialisation index  S = I(m; e) / H(m), from the slot-count table C[m, e] (p = C / ΣC):
  0 when the chosen expert says nothing about the modality, 1 when it determines it.
* load balance per modality: shares s_m,e = C[m, e] / Σ_e C[m, e];
  CV_m = std_e(s_m) / mean_e(s_m) (0 = even; √(E−1) = one expert takes everything),
  max/mean_m = E · max_e s_m,e, effective experts_m = exp H(s_m) (E = even, 1 = one expert).
* share similarity  1 − JSD₂(s_a,m, s_b,m), Jensen–Shannon divergence in bits (so in [0, 1]),
  averaged over modalities weighted by their token counts.
* matched agreement  A(a, b) = max_π (1/N) Σ_t [π(e_a(t)) = e_b(t)] over expert permutations π, for
  top-1 choices of two routers on the same tokens; π is found by the Hungarian method on the E×E
  co-occurrence table (experts of independently trained models are unaligned).
* linear CKA (Kornblith et al. 2019) of X [N, D₁], Y [N, D₂] with centred columns:
  CKA = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F); invariant to orthogonal maps and isotropic scaling.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..runtime.moe.stats import specialisation_index as moe_specialisation_index

__all__ = [
    "specialisation_index",
    "load_shares",
    "load_cv",
    "max_mean_ratio",
    "effective_experts",
    "js_divergence_bits",
    "share_similarity",
    "cooccurrence",
    "matched_agreement",
    "shuffled_agreement",
    "linear_cka",
    "pairwise_cka",
    "mean_off_diagonal",
    "canonical_target",
]


def _table(counts_ME) -> np.ndarray:
    c = np.asarray(counts_ME, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"expected a [modalities, experts] table, got shape {c.shape}")
    if np.any(c < 0):
        raise ValueError("counts must be >= 0")
    return c


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(axis=axis)


def specialisation_index(counts_ME) -> float:
    """I(modality; expert) / H(modality) of a slot-count table (0 = independent, 1 = deterministic);
    the trainer's own metric (``runtime/moe/stats.py``), on numpy tables."""
    return min(max(moe_specialisation_index(torch.as_tensor(_table(counts_ME))), 0.0), 1.0)


def load_shares(counts_ME) -> np.ndarray:
    """[M, E] fraction of each modality's routed slots per expert (rows of empty modalities: 0)."""
    c = _table(counts_ME)
    return c / np.maximum(c.sum(1, keepdims=True), 1e-12)


def load_cv(counts_ME) -> np.ndarray:
    """[M] coefficient of variation of each modality's expert shares (0 = perfectly even)."""
    s = load_shares(counts_ME)
    mean = s.mean(1)
    return np.where(mean > 0, s.std(1) / np.maximum(mean, 1e-12), 0.0)


def max_mean_ratio(counts_ME) -> np.ndarray:
    """[M] busiest expert's share over the mean share, E · max_e s_m,e (1 = even)."""
    s = load_shares(counts_ME)
    return s.shape[1] * s.max(1)


def effective_experts(counts_ME) -> np.ndarray:
    """[M] exp of the entropy of each modality's shares: how many experts it really uses."""
    return np.exp(_entropy(load_shares(counts_ME)))


def js_divergence_bits(p, q) -> float:
    """Jensen–Shannon divergence of two distributions, base 2, in [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / max(p.sum(), 1e-12)
    q = q / max(q.sum(), 1e-12)
    m = 0.5 * (p + q)
    js = float(_entropy(m) - 0.5 * _entropy(p) - 0.5 * _entropy(q)) / np.log(2.0)
    return min(max(js, 0.0), 1.0)


def share_similarity(counts_a_ME, counts_b_ME, perm_E: np.ndarray | None = None) -> float:
    """1 − JSD₂ between two routers' per-modality load shares, weighted by modality token counts.

    ``perm_E`` maps router a's experts onto router b's (e.g. from :func:`matched_agreement`); without
    it the experts are taken as aligned (the same model on two data sets)."""
    a, b = _table(counts_a_ME), _table(counts_b_ME)
    if a.shape != b.shape:
        raise ValueError(f"tables differ in shape: {a.shape} vs {b.shape}")
    if perm_E is not None:
        aligned = np.zeros_like(a)
        aligned[:, np.asarray(perm_E)] = a
        a = aligned
    w = a.sum(1) + b.sum(1)
    if w.sum() <= 0:
        return 1.0
    sims = np.array([1.0 - js_divergence_bits(a[m], b[m]) if w[m] > 0 else 1.0 for m in range(a.shape[0])])
    return float((sims * w).sum() / w.sum())


def cooccurrence(choice_a_N, choice_b_N, num_experts: int) -> np.ndarray:
    """[E, E] count of tokens where router a chose expert i and router b chose expert j."""
    a = np.asarray(choice_a_N, dtype=np.int64)
    b = np.asarray(choice_b_N, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError("both routers must be probed on the same tokens")
    keep = (a >= 0) & (b >= 0)
    flat = a[keep] * num_experts + b[keep]
    return np.bincount(flat, minlength=num_experts * num_experts).reshape(num_experts, num_experts).astype(np.float64)


def matched_agreement(choice_a_N, choice_b_N, num_experts: int) -> tuple[float, np.ndarray]:
    """(agreement, perm): the fraction of tokens on which a's top-1 expert, relabelled by the best
    permutation ``perm`` (a's expert i ↦ b's expert perm[i]), equals b's. 1 = same partition."""
    co = cooccurrence(choice_a_N, choice_b_N, num_experts)
    total = co.sum()
    perm = linear_sum_assignment(co, maximize=True)[1]  # Hungarian: best relabelling of a's experts
    if total <= 0:
        return 0.0, perm
    return float(co[np.arange(num_experts), perm].sum() / total), perm


def shuffled_agreement(choice_a_N, choice_b_N, modality_N, num_experts: int, seed: int = 0) -> float:
    """Matched agreement after shuffling a's choices among tokens of the same modality: the level
    that per-modality load shares alone explain (a baseline for :func:`matched_agreement`)."""
    rng = np.random.default_rng(seed)
    a = np.asarray(choice_a_N, dtype=np.int64).copy()
    mod = np.asarray(modality_N)
    for m in np.unique(mod):
        idx = np.flatnonzero(mod == m)
        a[idx] = a[rng.permutation(idx)]
    return matched_agreement(a, choice_b_N, num_experts)[0]


def linear_cka(x_ND, y_ND) -> float:
    """Linear CKA between two representations of the same N items (rows)."""
    x = np.asarray(x_ND, dtype=np.float64)
    y = np.asarray(y_ND, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need [N, D] arrays over the same N items, got {x.shape} and {y.shape}")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def pairwise_cka(outputs_END) -> np.ndarray:
    """[E, E] linear CKA between every pair of experts' outputs on the same N tokens.

    Uses the Gram form ‖Yᵀ X‖²_F = ⟨K_X, K_Y⟩ with K = X Xᵀ of the centred outputs, so each
    expert's N×N Gram matrix is built once."""
    y = np.asarray(outputs_END, dtype=np.float64)
    y = y - y.mean(1, keepdims=True)
    grams = np.einsum("end,emd->enm", y, y)
    flat = grams.reshape(grams.shape[0], -1)
    hsic = flat @ flat.T
    norms = np.sqrt(np.clip(np.diag(hsic), 0, None))
    denom = np.outer(norms, norms)
    return np.where(denom > 0, hsic / np.where(denom > 0, denom, 1.0), 0.0)


def mean_off_diagonal(matrix_EE) -> float:
    """Mean of the entries off the diagonal (e.g. mean pairwise CKA between distinct experts)."""
    m = np.asarray(matrix_EE, dtype=np.float64)
    n = m.shape[0]
    if n < 2:
        return float("nan")
    return float((m.sum() - np.trace(m)) / (n * (n - 1)))


def canonical_target(tables_ME: list, floor: float = 1e-3) -> list[list[float]]:
    """A per-modality utilisation target [M][E] for ``moe.lb_modality_target`` from measured tables.

    Expert labels are arbitrary and differ between layers and seeds, so each table's experts are
    first sorted by how much more modality 0 uses them than the others (s₀,e − mean_{m>0} s_m,e,
    descending); the sorted shares are then averaged over tables, floored at ``floor`` (targets must
    be > 0) and renormalised per modality. The result keeps the shape of the measured pattern (which
    fraction of each modality lands on image-leaning vs text-leaning experts), not its labels."""
    if not tables_ME:
        raise ValueError("no utilisation tables to build a target from")
    sorted_shares = []
    for t in tables_ME:
        s = load_shares(t)
        lean = s[0] - (s[1:].mean(0) if s.shape[0] > 1 else 0.0)
        order = np.argsort(-lean, kind="stable")
        sorted_shares.append(s[:, order])
    mean = np.mean(sorted_shares, axis=0)
    mean = np.maximum(mean, floor)
    mean = mean / mean.sum(1, keepdims=True)
    return [[round(float(x), 6) for x in row] for row in mean]
