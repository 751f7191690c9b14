"""Early-fusion multimodal MoE transformer: one sequence of image patches then caption tokens.

Legend: B batch, P image patches, C patch_dim, L text length, S sequence (P + L), D hidden, V vocab.

Batch (a mapping or an object with these attributes): ``patches`` float [B, P, C], ``text`` long
[B, L] (bos … eos, right-padded), ``text_mask`` bool [B, L]; optional ``modality`` long [B, S]
(0 image, 1 text) and ``mask`` bool [B, S] (real tokens), derived from the others when absent.

Contrastive design: in the captioning (prefix-LM) pass image states see only image tokens, so their
mean is a clean image embedding; text states there have seen the image, so pooling them would leak
the answer into the text side. The text embedding therefore comes from a separate text-only pass
(same weights, same positions P..P+L-1, no image tokens), pooled at eos, the one state that
has read the whole caption under causal attention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.materialize import init_parameters, materialize
from ..runtime.modality import IMAGE, TEXT
from ..runtime.param_init import Init, constant, draw_seed, normal
from .block import TransformerBlock
from .config import ModelConfig
from .embedding import MultimodalEmbedding
from .losses import caption_nll, contrastive_loss
from .masks import attention_mask
from .norm import RMSNorm
from .rope import Rotary

__all__ = ["MultimodalTransformer", "ModelOutput", "TPStyle", "build_model"]

TPStyle = Literal["colwise", "colwise_gated", "rowwise"]


@dataclass
class ModelOutput:
    loss: Tensor  # caption_loss + non_caption_loss: this batch's objective on its own
    caption_loss: Tensor  # mean next-token NLL over num_text_tokens targets (logged, evaluated)
    caption_nll_sum: Tensor  # float32 Σ next-token NLL over those targets: a trainer divides by the global count
    contrastive_loss: Tensor | None
    aux_loss: Tensor  # Σ of the MoE layers' (already weighted) aux losses, text-only pass included
    non_caption_loss: Tensor  # contrastive_coef · contrastive + aux_loss: the batch-mean terms of loss
    num_text_tokens: Tensor  # long scalar: predicted caption targets in this batch
    moe_stats: list[Any] = field(default_factory=list)  # one per MoE layer, captioning pass only
    logits: Tensor | None = None  # [B, L, V]; logits[:, t] predicts text[:, t + 1]


@dataclass
class _Encoded:
    h_BSD: Tensor
    aux_loss: Tensor
    stats: list[Any]


def _get(batch: Any, key: str) -> Any:
    if isinstance(batch, Mapping):
        return batch.get(key)
    return getattr(batch, key, None)


def _image_mask(patches_BPC: Tensor, mask_BS: Tensor | None) -> Tensor:
    P = patches_BPC.shape[1]
    if mask_BS is not None:
        return mask_BS[:, :P]
    return torch.ones(patches_BPC.shape[:2], dtype=torch.bool, device=patches_BPC.device)


class MultimodalTransformer(nn.Module):
    """Patches and caption tokens in one pre-norm transformer; every ``moe_every``-th FFN is a MoE
    layer that sees each token's modality. Trained to caption (prefix-LM) and optionally to align.

    Weights come from ``seed`` (drawn from torch's global generator when None), one generator per
    parameter (see :meth:`reset_parameters`). Built under ``torch.device("meta")`` nothing is
    allocated or drawn: :func:`build_model` and ``models.parallelize.build_local_model`` materialise it."""

    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.init_seed = draw_seed() if seed is None else int(seed)
        D = cfg.hidden_size
        self.embed = MultimodalEmbedding(cfg)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.pos == "rope" else None
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        if cfg.contrastive_coef > 0:
            self.image_proj = nn.Linear(D, D, bias=False)
            self.text_proj = nn.Linear(D, D, bias=False)
            # shape [1], not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse
            self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
        else:
            self.image_proj = self.text_proj = self.logit_scale = None
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight
        self.init_plan = self._init_plan()  # by full name: names survive the TP rewrite and EP
        if not self.lm_head.weight.is_meta:
            self.reset_parameters()

    def _init_plan(self) -> dict[str, Init]:
        """Normal(0, init_std) for our linears and embeddings, residual-output projections scaled by
        1/sqrt(2·num_layers) (GPT-2), norms at 1; MoE layers name their own rules (``param_inits``,
        from ``moe.init_std``). Tied weights appear once, under the embedding's name."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        moe_prefixes = tuple(f"layers.{i}.ffn." for i, block in enumerate(self.layers) if block.is_moe)
        plan: dict[str, Init] = {}
        for name, module in self.named_modules():
            if (name + ".").startswith(moe_prefixes):
                for local, rule in (module.param_inits() if hasattr(module, "param_inits") else {}).items():
                    plan[f"{name}.{local}"] = rule
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                plan[f"{name}.weight"] = normal(out_std if name.endswith((".wo", ".down")) else std)
            elif isinstance(module, RMSNorm):
                plan[f"{name}.weight"] = constant(1.0)
        if self.logit_scale is not None:
            plan["logit_scale"] = constant(math.log(1 / 0.07))
        names = [n for n, _ in self.named_parameters()]
        missing = [n for n in names if n not in plan]
        if missing:
            raise TypeError(f"no init rule for {missing}; name one in MultimodalTransformer._init_plan or the "
                            "module's param_inits()")
        return {n: plan[n] for n in names}

    def reset_parameters(self) -> None:
        """Every parameter from ``init_plan`` and ``init_seed``, each with its own generator: the
        values do not depend on build order, and a sharded or expert-parallel copy of this model
        (materialised from the meta device) holds exactly the slices of these tensors."""
        init_parameters(self, self.init_plan, self.init_seed)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The rotary tables, recomputed in place (``materialize`` calls this after a meta build)."""
        if self.rotary is not None:
            with torch.device("cpu"):
                fresh = Rotary(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
            for name, buf in fresh.named_buffers():
                getattr(self.rotary, name).copy_(buf)

    # ---- inputs -------------------------------------------------------------------------------

    def _check_shapes(self, patches_BPC: Tensor | None, text_BL: Tensor | None) -> None:
        cfg = self.cfg
        if patches_BPC is not None and tuple(patches_BPC.shape[1:]) != (cfg.num_patches, cfg.patch_dim):
            raise ValueError(
                f"patches have shape {tuple(patches_BPC.shape)} but the model expects "
                f"[B, {cfg.num_patches}, {cfg.patch_dim}] (image_size={cfg.image_size}, "
                f"patch_size={cfg.patch_size}, channels={cfg.channels}); align data and model config"
            )
        if text_BL is not None and text_BL.shape[1] > cfg.max_text_len:
            raise ValueError(
                f"text length {text_BL.shape[1]} exceeds model.max_text_len={cfg.max_text_len}"
            )

    def _positions(self, start: int, length: int, device: torch.device) -> Tensor:
        return torch.arange(start, start + length, device=device)

    # ---- trunk --------------------------------------------------------------------------------

    def _encode(
        self,
        patches_BPC: Tensor | None,
        text_BL: Tensor | None,
        modality_BS: Tensor,
        mask_BS: Tensor,
        positions_S: Tensor,
    ) -> _Encoded:
        x_BSD = self.embed_drop(self.embed(patches_BPC, text_BL, modality_BS, positions_S))
        # built once here, shared by every block: a dense [B, 1, S, S] mask (SDPA) or a BlockMask (flex)
        attn_mask_B1SS = attention_mask(self.cfg.attention, modality_BS, mask_BS, self.cfg.dropout, self.cfg.head_dim)
        rotary = self.rotary(positions_S) if self.rotary is not None else None
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        stats = []
        for block in self.layers:
            x_BSD, aux = block(x_BSD, modality_BS, mask_BS, attn_mask_B1SS, rotary)
            if aux is not None:
                aux_loss = aux_loss + aux.loss
                stats.append(aux.stats)
        return _Encoded(self.norm(x_BSD), aux_loss, stats)

    def _encode_joint(self, patches_BPC: Tensor, text_BL: Tensor, text_mask_BL: Tensor,
                      modality_BS: Tensor | None = None, mask_BS: Tensor | None = None) -> _Encoded:
        self._check_shapes(patches_BPC, text_BL)
        B, P = patches_BPC.shape[:2]
        L = text_BL.shape[1]
        dev = text_BL.device
        if modality_BS is None:
            modality_BS = torch.cat([
                torch.full((B, P), IMAGE, dtype=torch.long, device=dev),
                torch.full((B, L), TEXT, dtype=torch.long, device=dev),
            ], dim=1)
        if mask_BS is None:
            mask_BS = torch.cat([torch.ones(B, P, dtype=torch.bool, device=dev), text_mask_BL], dim=1)
        return self._encode(patches_BPC, text_BL, modality_BS, mask_BS, self._positions(0, P + L, dev))

    def _encode_image(self, patches_BPC: Tensor, image_mask_BP: Tensor) -> _Encoded:
        self._check_shapes(patches_BPC, None)
        B, P = patches_BPC.shape[:2]
        modality_BP = torch.full((B, P), IMAGE, dtype=torch.long, device=patches_BPC.device)
        return self._encode(patches_BPC, None, modality_BP, image_mask_BP,
                            self._positions(0, P, patches_BPC.device))

    def _encode_text(self, text_BL: Tensor, text_mask_BL: Tensor) -> _Encoded:
        self._check_shapes(None, text_BL)
        B, L = text_BL.shape
        modality_BL = torch.full((B, L), TEXT, dtype=torch.long, device=text_BL.device)
        return self._encode(None, text_BL, modality_BL, text_mask_BL,
                            self._positions(self.cfg.num_patches, L, text_BL.device))

    # ---- pooling ------------------------------------------------------------------------------

    def _pool_image(self, h_BPD: Tensor, image_mask_BP: Tensor) -> Tensor:
        w_BP1 = image_mask_BP[..., None].to(h_BPD.dtype)
        pooled_BD = (h_BPD * w_BP1).sum(1) / w_BP1.sum(1).clamp(min=1)
        if self.image_proj is not None:
            pooled_BD = self.image_proj(pooled_BD)
        return F.normalize(pooled_BD.float(), dim=-1)

    def _pool_text(self, h_BLD: Tensor, text_mask_BL: Tensor) -> Tensor:
        eos_B = (text_mask_BL.long().sum(1) - 1).clamp(min=0)
        pooled_BD = h_BLD[torch.arange(h_BLD.shape[0], device=h_BLD.device), eos_B]
        if self.text_proj is not None:
            pooled_BD = self.text_proj(pooled_BD)
        return F.normalize(pooled_BD.float(), dim=-1)

    # ---- public API ---------------------------------------------------------------------------

    def forward(self, batch: Any, return_logits: bool = False) -> ModelOutput:
        patches_BPC, text_BL, text_mask_BL = _get(batch, "patches"), _get(batch, "text"), _get(batch, "text_mask")
        mask_BS = _get(batch, "mask")
        P = patches_BPC.shape[1]
        enc = self._encode_joint(patches_BPC, text_BL, text_mask_BL, _get(batch, "modality"), mask_BS)
        logits_BLV = self.lm_head(enc.h_BSD[:, P:])
        nll_BT, valid_BT = caption_nll(logits_BLV, text_BL, text_mask_BL)
        num_targets = valid_BT.sum()
        nll_sum = nll_BT.sum()
        caption = nll_sum / num_targets.clamp(min=1)
        aux_loss = enc.aux_loss
        contrastive = None
        non_caption = aux_loss
        if self.cfg.contrastive_coef > 0:
            image_mask_BP = _image_mask(patches_BPC, mask_BS)
            image_BD = self._pool_image(enc.h_BSD[:, :P], image_mask_BP)
            text_enc = self._encode_text(text_BL, text_mask_BL)
            text_BD = self._pool_text(text_enc.h_BSD, text_mask_BL)
            contrastive = contrastive_loss(image_BD, text_BD, self.logit_scale.clamp(max=math.log(100.0)).squeeze(0))
            aux_loss = aux_loss + text_enc.aux_loss
            non_caption = self.cfg.contrastive_coef * contrastive + aux_loss
        return ModelOutput(
            loss=caption + non_caption,
            caption_loss=caption,
            caption_nll_sum=nll_sum,
            contrastive_loss=contrastive,
            aux_loss=aux_loss,
            non_caption_loss=non_caption,
            moe_stats=enc.stats,
            num_text_tokens=num_targets,
            logits=logits_BLV if return_logits else None,
        )

    def embed_image(self, batch: Any) -> Tensor:
        """L2-normalised [B, D] image embedding: mean of final image states of an image-only pass.
        Trained for retrieval only when ``contrastive_coef > 0``; otherwise use ``caption_scores``."""
        patches_BPC = _get(batch, "patches")
        image_mask_BP = _image_mask(patches_BPC, _get(batch, "mask"))
        return self._pool_image(self._encode_image(patches_BPC, image_mask_BP).h_BSD, image_mask_BP)

    def embed_text(self, batch: Any) -> Tensor:
        """L2-normalised [B, D] text embedding: the eos state of a text-only pass (see embed_image)."""
        text_BL, text_mask_BL = _get(batch, "text"), _get(batch, "text_mask")
        return self._pool_text(self._encode_text(text_BL, text_mask_BL).h_BSD, text_mask_BL)

    def caption_logprob(self, batch: Any, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
        """[B] log p(text | image) under teacher forcing, summed (or averaged) over the targets."""
        patches_BPC, text_BL, text_mask_BL = _get(batch, "patches"), _get(batch, "text"), _get(batch, "text_mask")
        P = patches_BPC.shape[1]
        enc = self._encode_joint(patches_BPC, text_BL, text_mask_BL)
        nll_BT, valid_BT = caption_nll(self.lm_head(enc.h_BSD[:, P:]), text_BL, text_mask_BL)
        logp_B = -nll_BT.sum(1)
        if reduction == "mean":
            logp_B = logp_B / valid_BT.sum(1).clamp(min=1)
        return logp_B

    @torch.no_grad()
    def caption_scores(
        self,
        images: Any,
        texts: Any,
        reduction: Literal["sum", "mean"] = "sum",
        pairs_per_pass: int = 256,
    ) -> Tensor:
        """Generative retrieval scores [N_img, N_txt]: log p(caption j | image i) for every pair,
        by N_img·N_txt teacher-forced passes in chunks (meant for small eval sets; call in eval mode).
        ``images`` needs ``patches``; ``texts`` needs ``text`` and ``text_mask``."""
        patches_NPC = _get(images, "patches")
        text_ML, text_mask_ML = _get(texts, "text"), _get(texts, "text_mask")
        N, M = patches_NPC.shape[0], text_ML.shape[0]
        img_idx = torch.arange(N, device=patches_NPC.device).repeat_interleave(M)
        txt_idx = torch.arange(M, device=text_ML.device).repeat(N)
        out = []
        for s in range(0, N * M, pairs_per_pass):
            i, j = img_idx[s : s + pairs_per_pass], txt_idx[s : s + pairs_per_pass]
            pair = {"patches": patches_NPC[i], "text": text_ML[j], "text_mask": text_mask_ML[j]}
            out.append(self.caption_logprob(pair, reduction).float())
        return torch.cat(out).view(N, M)

    def tp_plan(self) -> dict[str, TPStyle]:
        """How this model's own linears shard under tensor parallelism (Megatron pairing: a column-
        parallel input projection feeds a row-parallel output projection, one all-reduce per pair).
        ``colwise_gated``: a SwiGLU ``up`` holds [gate; up] stacked, so each half is split on its own.
        MoE FFNs are absent: they shard by expert, which the MoE runtime owns."""
        plan: dict[str, TPStyle] = {"embed.tokens": "rowwise", "lm_head": "colwise"}
        for i, block in enumerate(self.layers):
            for name in ("wq", "wk", "wv"):
                plan[f"layers.{i}.attn.{name}"] = "colwise"
            plan[f"layers.{i}.attn.wo"] = "rowwise"
            if not block.is_moe:
                gated = self.cfg.activation == "swiglu"
                plan[f"layers.{i}.ffn.up"] = "colwise_gated" if gated else "colwise"
                plan[f"layers.{i}.ffn.down"] = "rowwise"
        return plan


def build_model(cfg: ModelConfig, seed: int | None = None, device: torch.device | str | None = None) -> MultimodalTransformer:
    """The whole model a validated ``cfg`` describes, on ``device`` (default: torch's default device)
    with weights from ``seed`` (None: drawn from the global generator). Built on the meta device and
    then allocated once; ``device="meta"`` returns it unallocated (shapes, counts, sharding plans)."""
    with torch.device("meta"):
        model = MultimodalTransformer(cfg, seed=seed)
    if device is not None and torch.device(device).type == "meta":
        return model
    materialize(model, device if device is not None else torch.get_default_device())
    model.reset_parameters()
    return model
