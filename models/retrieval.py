"""Image→text retrieval metrics from a score matrix (embedding similarities or caption log-likelihoods)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["recall_at_k", "normalize_over_images"]


def recall_at_k(scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of images whose best-scoring correct text ranks within the top k.

    ``scores`` [N_img, N_txt], higher is better. ``targets`` is long [N_img] (the index of each
    image's text) or bool [N_img, N_txt] (every correct text, e.g. several captions per image).
    Ties count against the image (a wrong text scoring equal to the best correct one outranks it),
    so constant scores give chance-or-worse recall, never a perfect one. Text→image: pass
    ``scores.T`` with the targets transposed.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N_img, N_txt], got shape {tuple(scores.shape)}")
    N, M = scores.shape
    if targets.dtype == torch.bool:
        correct_NM = targets
    else:
        correct_NM = torch.zeros(N, M, dtype=torch.bool, device=scores.device)
        correct_NM[torch.arange(N, device=scores.device), targets.long()] = True
    if correct_NM.shape != scores.shape:
        raise ValueError(f"targets mark a {tuple(correct_NM.shape)} grid but scores are {tuple(scores.shape)}")
    if not bool(correct_NM.any(1).all()):
        raise ValueError("every image needs at least one correct text in targets")
    s_NM = scores.float()
    best_N = s_NM.masked_fill(~correct_NM, float("-inf")).amax(1)
    rank_N = ((s_NM >= best_N[:, None]) & ~correct_NM).sum(1)
    return {f"recall@{k}": (rank_N < k).float().mean().item() for k in ks}


def normalize_over_images(scores: Tensor) -> Tensor:
    """log p(text | image) → log p(image | text) under a uniform prior over the scored images.

    Raw caption likelihoods favour short, common captions for every image; subtracting each
    caption's log-sum-exp over images (its empirical marginal) removes that prior (a PMI score).
    """
    return scores - torch.logsumexp(scores.float(), dim=0, keepdim=True)
