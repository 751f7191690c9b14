"""The separation experiment: is modality-awareness structural, or does it only save router capacity?

Synthetic two-modality tokens whose best routing is known by construction. Modality m has K = E / M
Gaussian components; component k of modality m has mean a·u_k + (m − (M−1)/2)·s·d and covariance
Σ_m = R_m diag(λ) R_mᵀ (a random rotation per modality, eigenvalues geometric in [c^-½, c^½]). The
component directions u_k are shared by the modalities and orthogonal to the modality direction d,
and the token's expert is e*(m, k) = m·K + k: the modality decides which half of the experts, the
component which expert in it. So a gate that sees the modality needs only the K component
directions, and one that does not must read the modality from x (the offset s along d, and the
covariance, which no linear gate can use).

Routers are linear with rank-r weights, logits = U V x + b (U [E, r], V [r, H]), r = 1..H, trained
by cross-entropy on e* (full batch, Adam). *agnostic* sees x only; *aware_embedding* adds a learned
modality embedding to its input, U V (x + w_m) + b, as the study's ``modality`` router does;
*aware_bias* adds a per-modality logit bias, U V x + b_m. Parameters: r(H + E) for U and V, plus
E biases (agnostic), E biases and the M·H embedding (aware_embedding), or M·E biases (aware_bias).
Bayes-optimal routing (the true densities)
gives the ceilings: argmax_k p(k | x, m) with the modality, argmax_(m,k) p(m, k | x) without.

Legend: N tokens, H input width, E experts, M modalities, K components per modality, r rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime.config import check

__all__ = ["ARMS", "SeparationSpec", "SeparationData", "make_data", "bayes_routing", "fit_routers",
           "router_params", "run_separation", "summarise", "verdict"]

ARMS = ("agnostic", "aware_embedding", "aware_bias")


@dataclass
class SeparationSpec:
    hidden: int = 16  # H: input width, and the largest rank
    experts: int = 8  # E (K = E / modalities components per modality)
    modalities: int = 2
    ranks: list[int] = field(default_factory=list)  # default 1..hidden
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # each: its own data draw and init
    n_train: int = 2048
    n_eval: int = 2048
    steps: int = 200
    lr: float = 0.05
    component_sep: float = 4.0  # a: distance of a component's mean from the origin, in noise units
    # s: distance between the modalities' means along d, in noise units (0: only the covariance tells
    # them apart); one experiment per value, from a modality no linear gate can read to an obvious one
    modality_offsets: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0, 8.0])
    anisotropy: float = 4.0  # c: largest / smallest eigenvalue of each modality's covariance
    target_accuracy: float = 0.9  # report the router parameters needed to reach this routing accuracy
    target_loss: float = 0.3  # ... and this eval cross-entropy (nats)

    def all_ranks(self) -> list[int]:
        return sorted(self.ranks) if self.ranks else list(range(1, self.hidden + 1))

    def validate(self, prefix: str = "separation") -> SeparationSpec:
        p = prefix
        check(self.hidden >= 2, f"{p}.hidden", f"must be >= 2, got {self.hidden}")
        check(self.modalities >= 2, f"{p}.modalities", f"must be >= 2 (the question is about modalities), got {self.modalities}")
        check(self.experts >= self.modalities and self.experts % self.modalities == 0, f"{p}.experts",
              f"must be a multiple of modalities={self.modalities} (K = experts / modalities components each), got {self.experts}")
        check(self.experts // self.modalities + 1 <= self.hidden, f"{p}.hidden",
              f"must be > experts / modalities = {self.experts // self.modalities} (the component and modality directions "
              f"must fit), got {self.hidden}")
        bad = [r for r in self.ranks if not 1 <= r <= self.hidden]
        check(not bad and len(set(self.ranks)) == len(self.ranks), f"{p}.ranks",
              f"must be distinct ranks in 1..hidden={self.hidden}, got {self.ranks}")
        unknown = [a for a in self.arms if a not in ARMS]
        check(bool(self.arms) and not unknown and len(set(self.arms)) == len(self.arms), f"{p}.arms",
              f"must be distinct names from {list(ARMS)}, got {self.arms}")
        check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), f"{p}.seeds", f"must be distinct integers, got {self.seeds}")
        check(self.n_train >= self.experts and self.n_eval >= self.experts, f"{p}.n_train",
              f"n_train and n_eval must be >= experts={self.experts}, got {self.n_train} / {self.n_eval}")
        check(self.steps >= 1, f"{p}.steps", f"must be >= 1, got {self.steps}")
        check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        check(self.component_sep > 0, f"{p}.component_sep", f"must be > 0, got {self.component_sep}")
        check(bool(self.modality_offsets) and all(s >= 0 for s in self.modality_offsets)
              and len(set(self.modality_offsets)) == len(self.modality_offsets), f"{p}.modality_offsets",
              f"must be distinct values >= 0, got {self.modality_offsets}")
        check(self.anisotropy >= 1, f"{p}.anisotropy", f"must be >= 1 (1 = isotropic), got {self.anisotropy}")
        check(0 < self.target_accuracy < 1, f"{p}.target_accuracy", f"must be in (0, 1), got {self.target_accuracy}")
        check(self.target_loss > 0, f"{p}.target_loss", f"must be > 0 (nats), got {self.target_loss}")
        return self


@dataclass
class SeparationData:
    x_train_NH: torch.Tensor
    m_train_N: torch.Tensor
    e_train_N: torch.Tensor  # e*(m, k): the known-optimal expert
    x_eval_NH: torch.Tensor
    m_eval_N: torch.Tensor
    e_eval_N: torch.Tensor
    means_MKH: np.ndarray
    covs_MHH: np.ndarray


def make_data(spec: SeparationSpec, seed: int, offset: float) -> SeparationData:
    """One draw of the problem: its geometry and its train / eval tokens (equal modality shares)."""
    rng = np.random.default_rng(seed)
    H, M = spec.hidden, spec.modalities
    K = spec.experts // M
    q_HH = np.linalg.qr(rng.standard_normal((H, H)))[0]
    u_KH, d_H = q_HH[:, :K].T, q_HH[:, K]
    offsets = (np.arange(M) - (M - 1) / 2) * offset
    means_MKH = spec.component_sep * u_KH[None] + offsets[:, None, None] * d_H
    lam_H = np.geomspace(spec.anisotropy ** -0.5, spec.anisotropy ** 0.5, H)
    roots_MHH = np.stack([np.linalg.qr(rng.standard_normal((H, H)))[0] * np.sqrt(lam_H) for _ in range(M)])
    covs_MHH = roots_MHH @ roots_MHH.transpose(0, 2, 1)

    def draw(n: int):
        m_N = rng.integers(0, M, n)
        k_N = rng.integers(0, K, n)
        x_NH = means_MKH[m_N, k_N] + np.einsum("nij,nj->ni", roots_MHH[m_N], rng.standard_normal((n, H)))
        return (torch.tensor(x_NH, dtype=torch.float32), torch.tensor(m_N), torch.tensor(m_N * K + k_N))

    return SeparationData(*draw(spec.n_train), *draw(spec.n_eval), means_MKH, covs_MHH)


def bayes_routing(data: SeparationData, x_NH: torch.Tensor, m_N: torch.Tensor) -> dict[str, np.ndarray]:
    """Log-posteriors of the true mixture: "aware" [N, E] (given x and m: −inf outside m's experts)
    and "agnostic" [N, E] (given x only); equal priors over modalities and components."""
    M, K, H = data.means_MKH.shape
    x = x_NH.double().numpy()
    logp_NMK = np.empty((x.shape[0], M, K))
    for m in range(M):
        inv = np.linalg.inv(data.covs_MHH[m])
        logdet = np.linalg.slogdet(data.covs_MHH[m])[1]
        diff_NKH = x[:, None] - data.means_MKH[m][None]
        logp_NMK[:, m] = -0.5 * (np.einsum("nkh,hg,nkg->nk", diff_NKH, inv, diff_NKH) + logdet + H * math.log(2 * math.pi))
    joint_NE = logp_NMK.reshape(len(x), M * K)
    agnostic = joint_NE - np.logaddexp.reduce(joint_NE, axis=1, keepdims=True)
    aware = np.full_like(joint_NE, -np.inf)
    m = m_N.numpy()
    for mm in range(M):
        rows = m == mm
        block = logp_NMK[rows, mm]
        aware[np.ix_(rows, np.arange(mm * K, (mm + 1) * K))] = block - np.logaddexp.reduce(block, axis=1, keepdims=True)
    return {"aware": aware, "agnostic": agnostic}


def router_params(arm: str, rank: int, hidden: int, experts: int, modalities: int) -> int:
    """Parameters of one rank-r router: U, V, and the bias / modality embedding of its arm."""
    base = rank * (hidden + experts)
    return {"agnostic": base + experts, "aware_embedding": base + experts + modalities * hidden,
            "aware_bias": base + modalities * experts}[arm]


class _LowRankRouters(torch.nn.Module):
    """One router per rank in ``ranks``, trained together: their losses are summed, and each
    router's parameters get only its own gradient, so (Adam being elementwise) every router trains
    exactly as it would alone. Rows of V and columns of U beyond a router's rank are masked to 0."""

    def __init__(self, arm: str, ranks: list[int], hidden: int, experts: int, modalities: int):
        super().__init__()
        R, r_max = len(ranks), max(ranks)
        self.arm = arm
        self.register_buffer("keep_Rr", (torch.arange(r_max)[None] < torch.tensor(ranks)[:, None]).float())
        scale = torch.tensor(ranks, dtype=torch.float32).rsqrt()[:, None, None]
        self.v_RrH = torch.nn.Parameter(torch.randn(R, r_max, hidden) / math.sqrt(hidden) * self.keep_Rr[..., None])
        self.u_REr = torch.nn.Parameter(torch.randn(R, experts, r_max) * scale * self.keep_Rr[:, None])
        self.b_RME = torch.nn.Parameter(torch.zeros(R, modalities if arm == "aware_bias" else 1, experts))
        if arm == "aware_embedding":
            self.w_RMH = torch.nn.Parameter(torch.randn(R, modalities, hidden))  # std 1, as the study's router

    def forward(self, x_NH: torch.Tensor, onehot_NM: torch.Tensor) -> torch.Tensor:
        """[N, R, E] logits. W = U V is formed first (tiny), so the tokens meet one GEMM for all
        routers; the modality enters through its one-hot (a matmul, not a gather)."""
        R, E, _ = self.u_REr.shape
        w_REH = (self.u_REr * self.keep_Rr[:, None]) @ (self.v_RrH * self.keep_Rr[..., None])
        logits_NX = x_NH @ w_REH.reshape(R * E, -1).T
        if self.arm == "aware_embedding":  # U V (x + w_m) = U V x + U V w_m
            logits_NX = logits_NX + onehot_NM @ (self.w_RMH @ w_REH.transpose(1, 2)).transpose(0, 1).reshape(-1, R * E)
        if self.arm == "aware_bias":
            logits_NX = logits_NX + onehot_NM @ self.b_RME.transpose(0, 1).reshape(-1, R * E)
        else:
            logits_NX = logits_NX + self.b_RME.transpose(0, 1).reshape(1, R * E)
        return logits_NX.view(-1, R, E)

    def params_per_router(self) -> list[int]:
        """Trainable entries each router really uses (the masked ones aside)."""
        rank_R = self.keep_Rr.sum(1).long()
        E, H = self.u_REr.shape[1], self.v_RrH.shape[2]
        extra = self.b_RME[0].numel() + (self.w_RMH[0].numel() if self.arm == "aware_embedding" else 0)
        return [int(r) * (H + E) + extra for r in rank_R]


def fit_routers(spec: SeparationSpec, data: SeparationData, arm: str, seed: int) -> list[dict]:
    """Train one router per rank on e*; per rank its eval routing accuracy, cross-entropy and predictions."""
    ranks = spec.all_ranks()
    torch.manual_seed(seed)
    routers = _LowRankRouters(arm, ranks, spec.hidden, spec.experts, spec.modalities)
    opt = torch.optim.Adam(routers.parameters(), lr=spec.lr)
    R, E, M = len(ranks), spec.experts, spec.modalities
    onehot_train = F.one_hot(data.m_train_N, M).float()
    target = data.e_train_N.repeat_interleave(R)
    for _ in range(spec.steps):
        opt.zero_grad(set_to_none=True)
        logits_NRE = routers(data.x_train_NH, onehot_train)
        # the sum over routers of each one's mean loss: each router's gradient is that of its own loss
        (F.cross_entropy(logits_NRE.reshape(-1, E), target, reduction="sum") / len(data.e_train_N)).backward()
        opt.step()
    with torch.no_grad():
        logits_NRE = routers(data.x_eval_NH, F.one_hot(data.m_eval_N, M).float())
        loss_R = F.cross_entropy(logits_NRE.reshape(-1, E), data.e_eval_N.repeat_interleave(R), reduction="none").view(-1, R).mean(0)
        pred_RN = logits_NRE.argmax(2).T
        acc_R = (pred_RN == data.e_eval_N).float().mean(1)
    return [{"arm": arm, "rank": r, "seed": seed, "params": n, "accuracy": float(a), "loss": float(lo), "pred": p.numpy()}
            for r, n, a, lo, p in zip(ranks, routers.params_per_router(), acc_R, loss_R, pred_RN)]


def run_separation(spec: SeparationSpec, log=lambda _msg: None) -> dict:
    """Every (modality offset, seed, arm, rank): a JSON-ready result with the Bayes ceilings of each draw.
    One intra-op thread: these matmuls are too small to share, and a shared CPU makes threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(spec, log)
    finally:
        torch.set_num_threads(threads)


def _run(spec: SeparationSpec, log) -> dict:
    fits, bayes = [], []
    for offset in spec.modality_offsets:
        for seed in spec.seeds:
            data = make_data(spec, seed, offset)
            post = bayes_routing(data, data.x_eval_NH, data.m_eval_N)
            e = data.e_eval_N.numpy()
            best = {k: v.argmax(1) for k, v in post.items()}
            bayes.append({"offset": offset, "seed": seed, **{f"{k}_accuracy": float((best[k] == e).mean()) for k in post},
                          **{f"{k}_loss": float(-post[k][np.arange(len(e)), e].mean()) for k in post}})
            for arm in spec.arms:
                for f in fit_routers(spec, data, arm, seed):
                    f["offset"] = offset
                    f["agreement_bayes"] = float((f.pop("pred") == best["aware"]).mean())
                    fits.append(f)
        log(f"separation: modality offset {offset:g} done")
    return {"fits": fits, "bayes": bayes}


def _mean_std(v: list[float]) -> list[float]:
    a = np.asarray(v, dtype=np.float64)
    return [float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)] if a.size else [math.nan, math.nan, 0]


def summarise(spec: SeparationSpec, result: dict) -> dict:
    """Per modality offset and arm: the curve over ranks (mean ± std over seeds) and the router
    parameters needed to reach the targets (per seed the smallest router that does; mean ± std over
    the seeds that do)."""
    out: dict = {}
    top = max(spec.all_ranks())
    for offset in spec.modality_offsets:
        b_rows = [b for b in result["bayes"] if b["offset"] == offset]
        entry: dict = {"offset": offset, "bayes": {k: _mean_std([b[k] for b in b_rows]) for k in b_rows[0] if k not in ("seed", "offset")},
                       "arms": {}}
        for arm in spec.arms:
            mine = [f for f in result["fits"] if f["arm"] == arm and f["offset"] == offset]
            curve = []
            for r in spec.all_ranks():
                at = [f for f in mine if f["rank"] == r]
                curve.append({"rank": r, "params": at[0]["params"],
                              **{k: _mean_std([f[k] for f in at]) for k in ("accuracy", "loss", "agreement_bayes")}})
            need = {}
            for key, ok in (("accuracy", lambda f: f["accuracy"] >= spec.target_accuracy),
                            ("loss", lambda f: f["loss"] <= spec.target_loss)):
                per_seed = [min((f["params"] for f in mine if f["seed"] == s and ok(f)), default=None) for s in spec.seeds]
                reached = [p for p in per_seed if p is not None]
                need[key] = {"params": _mean_std(reached), "reached": len(reached), "seeds": len(spec.seeds)}
            full = [f for f in mine if f["rank"] == top]
            entry["arms"][arm] = {
                "curve": curve, "needed": need,
                "best_accuracy": _mean_std([max(f["accuracy"] for f in mine if f["seed"] == s) for s in spec.seeds]),
                "full_rank": {k: _mean_std([f[k] for f in full]) for k in ("accuracy", "loss", "agreement_bayes")}}
        out[f"{offset:g}"] = entry
    return out


def _needed(n: dict, best: list[float]) -> str:
    if n["reached"] == 0:
        return f"never (best {best[0]:.3f})"
    m, s, _ = n["params"]
    return f"{m:.0f} ± {s:.0f}" + (f" ({n['reached']}/{n['seeds']} seeds)" if n["reached"] < n["seeds"] else "")


def verdict(spec: SeparationSpec, summary: dict) -> list[str]:
    """One sentence per modality offset, read off the numbers: does the agnostic router reach the
    accuracy target at any rank, with how many parameters against each aware one, and is the Bayes
    rule from x alone above the target (is the modality information the token lacks)?"""
    lines, target, top = [], spec.target_accuracy, max(spec.all_ranks())
    for key, entry in summary.items():
        arms, b = entry["arms"], entry["bayes"]
        head = f"Offset {key} (Bayes accuracy {b['aware_accuracy'][0]:.3f} with the modality, {b['agnostic_accuracy'][0]:.3f} without): "
        aware = [a for a in spec.arms if a != "agnostic"]
        if "agnostic" not in arms:
            lines.append(head + "; ".join(f"`{a}` needs {_needed(arms[a]['needed']['accuracy'], arms[a]['best_accuracy'])} "
                                          "parameters" for a in aware) + ".")
            continue
        ag = arms["agnostic"]["needed"]["accuracy"]
        if not ag["reached"]:
            first = f"no agnostic router up to rank {top} reaches {target:g} (best {arms['agnostic']['best_accuracy'][0]:.3f})"
            first += (", nor would the Bayes rule from x alone: the modality carries routing information the token lacks"
                      if b["agnostic_accuracy"][0] < target else
                      ", though the quadratic Bayes rule from x alone would: structural for a linear gate")
        else:
            first = f"`agnostic` reaches {target:g} with {ag['params'][0]:.0f} parameters"
        parts = []
        for a in aware:
            aw = arms[a]["needed"]["accuracy"]
            if not aw["reached"]:
                parts.append(f"`{a}` never (best {arms[a]['best_accuracy'][0]:.3f})")
            elif not ag["reached"]:
                parts.append(f"`{a}` with {aw['params'][0]:.0f}")
            else:
                ratio = ag["params"][0] / aw["params"][0]
                parts.append(f"`{a}` with {aw['params'][0]:.0f} (agnostic needs {ratio:.2f}×: " +
                             ("the modality saves parameters, it is not needed)" if ratio > 1 else
                              "no saving)" if ratio == 1 else "the agnostic router is the cheaper one)"))
        lines.append(head + first + "; " + ", ".join(parts) + ".")
    return lines
