"""The model's two objectives: image-conditioned captioning and CLIP-style contrastive alignment.

Legend: B batch, L text length, V vocab, D embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["caption_nll", "contrastive_loss"]


def caption_nll(logits_BLV: Tensor, text_BL: Tensor, text_mask_BL: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token NLL: the state at text[t] predicts text[t+1]; a target that is padding is ignored.

    Returns ``(nll_BT, valid_BT)`` with T = L - 1 and nll 0 where not valid; computed in float32.
    """
    logits_BTV = logits_BLV[:, :-1]
    targets_BT = text_BL[:, 1:]
    valid_BT = text_mask_BL[:, 1:] & text_mask_BL[:, :-1]
    nll_BT = F.cross_entropy(
        logits_BTV.float().flatten(0, 1),
        targets_BT.masked_fill(~valid_BT, -100).flatten(),
        ignore_index=-100,
        reduction="none",
    ).view_as(targets_BT)
    return nll_BT, valid_BT


def contrastive_loss(image_BD: Tensor, text_BD: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over the batch: sample i's image and text are the only positive pair.

    Inputs are L2-normalised; ``logit_scale`` is the log of the inverse temperature.
    """
    logits_BB = logit_scale.exp() * image_BD.float() @ text_BD.float().t()
    labels_B = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    return 0.5 * (F.cross_entropy(logits_BB, labels_B) + F.cross_entropy(logits_BB.t(), labels_B))
