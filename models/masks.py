"""The captioning attention mask (prefix-LM over an image prefix), dense or as a FlexAttention block mask.

Legend: B batch, S sequence (queries and keys), 1 broadcast over heads.
Image tokens see every image token (bidirectional prefix) and no text; text tokens see every image
token and earlier-or-equal text tokens (causal); padding keys are seen by nobody. The diagonal is
always allowed so padding queries keep one key and SDPA never normalises over an empty row.

Both forms state the same rule: ``prefix_lm_mask`` materialises it as a bool tensor for SDPA (which
then cannot use a fused kernel); ``prefix_lm_block_mask`` gives it to FlexAttention as a ``mask_mod``,
so the fused kernel skips the fully masked blocks (text keys for image queries, padding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..runtime.modality import IMAGE, TEXT

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
except ImportError:  # a torch without FlexAttention: only the dense mask exists
    BlockMask = create_block_mask = None

__all__ = ["AttentionMask", "FLEX_MIN_HEAD_DIM", "attention_mask", "flex_available", "prefix_lm_block_mask",
           "prefix_lm_mask", "prefix_lm_mask_mod"]

FLEX_MIN_HEAD_DIM = 16  # the Triton kernel's tl.dot needs head_dim >= 16

# what every block receives: the dense bool mask (SDPA) or a BlockMask (FlexAttention)
AttentionMask = Tensor if BlockMask is None else Tensor | BlockMask


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


def prefix_lm_mask_mod(modality_BS: Tensor, mask_BS: Tensor | None = None):
    """The rule of ``prefix_lm_mask`` as a FlexAttention ``mask_mod(b, h, q, kv) -> bool`` that reads
    the per-batch modality and padding vectors (heads share the mask)."""

    def mask_mod(b, h, q, kv):
        key_img = modality_BS[b, kv] == IMAGE
        key_txt = modality_BS[b, kv] == TEXT
        query_txt = modality_BS[b, q] == TEXT
        allowed = key_img | (query_txt & key_txt & (kv <= q))
        if mask_BS is not None:
            allowed = allowed & mask_BS[b, kv]
        return allowed | (q == kv)

    return mask_mod


def prefix_lm_block_mask(modality_BS: Tensor, mask_BS: Tensor | None = None) -> BlockMask:
    """The prefix-LM mask as a FlexAttention ``BlockMask`` ``[B, 1, S, S]``, built once per forward and
    shared by every layer. On CUDA the construction is compiled, so it never materialises B·S² bools."""
    if create_block_mask is None:
        raise RuntimeError("this torch has no torch.nn.attention.flex_attention; set model.attention=sdpa")
    B, S = modality_BS.shape
    return create_block_mask(prefix_lm_mask_mod(modality_BS, mask_BS), B, None, S, S,
                             device=modality_BS.device, _compile=modality_BS.device.type == "cuda")


def flex_available(device: torch.device) -> bool:
    """FlexAttention's fused kernel: CUDA with Triton (torch.compile generates it)."""
    if create_block_mask is None or device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def attention_mask(kind: str, modality_BS: Tensor, mask_BS: Tensor | None, dropout: float = 0.0,
                   head_dim: int = FLEX_MIN_HEAD_DIM) -> AttentionMask:
    """The mask for ``model.attention``. ``auto``: flex where its fused kernel exists and fits (no
    attention dropout, which FlexAttention lacks; head_dim >= 16), the dense SDPA mask otherwise."""
    use_flex = kind == "flex" or (
        kind == "auto" and dropout == 0.0 and head_dim >= FLEX_MIN_HEAD_DIM and flex_available(modality_BS.device)
    )
    if use_flex:
        return prefix_lm_block_mask(modality_BS, mask_BS)
    return prefix_lm_mask(modality_BS, mask_BS)
