"""The captioning attention mask (prefix-LM over an image prefix).

Legend: B batch, S sequence (queries and keys), 1 broadcast over heads.
Image tokens see every image token (bidirectional prefix) and no text; text tokens see every image
token and earlier-or-equal text tokens (causal); padding keys are seen by nobody. The diagonal is
always allowed so padding queries keep one key and SDPA never normalises over an empty row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import IMAGE, TEXT

__all__ = ["prefix_lm_mask"]


def prefix_lm_mask(modality_BS: Tensor, mask_BS: Tensor | None = None) -> Tensor:
    """Boolean ``[B, 1, S, S]``: True where query s may attend to key t. Needs no layout beyond
    "text is causal in sequence order", so it also serves image-only and text-only passes."""
    S = modality_BS.shape[1]
    key_img_B1S = (modality_BS == IMAGE)[:, None, :]
    key_txt_B1S = (modality_BS == TEXT)[:, None, :]
    query_txt_BS1 = key_txt_B1S.transpose(1, 2)
    idx_S = torch.arange(S, device=modality_BS.device)
    causal_SS = idx_S[None, :] <= idx_S[:, None]  # [query, key]
    allowed_BSS = key_img_B1S | (query_txt_BS1 & key_txt_B1S & causal_SS)
    if mask_BS is not None:
        allowed_BSS = allowed_BSS & mask_BS[:, None, :]
    allowed_BSS = allowed_BSS | torch.eye(S, dtype=torch.bool, device=modality_BS.device)
    return allowed_BSS[:, None]
