"""Model FLOPs of a training step and the GPU's peak, for achieved TFLOP/s and MFU.

Legend: P image tokens per sample, L text tokens per sample, D hidden, V vocab, ℓ layers.

Model FLOPs (the PaLM convention: what the model needs, not what the kernels did; no recompute, no
padding, no masked-out attention) of one sample, forward, then ×3 for forward + backward:

- matmuls: 2 FLOPs per multiply-add per token a weight touches. ``count_parameters``' active count
  (routed experts at top_k / num_experts) splits into the trunk (every layer, seen by every token of
  every pass), the patch embedding (P image tokens), the LM head (L text tokens), the contrastive
  projections (once per sample each) and lookup tables (token, modality, position embeddings: none;
  a tied token table is the LM head). Norm and router weights stay in the trunk (negligible).
- attention: per layer, QKᵀ and A·V cost 2·D each per (query, key) pair the prefix-LM mask allows:
  P² (bidirectional image prefix) + P·L + L(L+1)/2 (text sees the image and earlier text) in the
  captioning pass, and L(L+1)/2 in the text-only pass that ``contrastive_coef > 0`` adds.

So forward = 2·trunk·(P+L) + 2·patch·P + 2·head·L + 4·D·ℓ·pairs (+ 2·trunk·L + 4·D² contrastive),
which is the familiar 6·N + 12·ℓ·S·D per token, with the attention counted over the pairs
actually used. L is the window's mean real caption length (padding is not model work).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from ..models.config import ModelConfig
from ..runtime.modality import NUM_MODALITIES

__all__ = ["TrainFlops", "PEAK_TFLOPS", "lookup_peak_tflops", "peak_tflops", "throughput_metrics"]


@dataclass(frozen=True)
class TrainFlops:
    """Training FLOPs per sample of one model, as a function of the caption length."""

    trunk: int  # active parameters every token of every pass multiplies
    patch: int  # patch embedding, image tokens only
    head: int  # LM head, text tokens of the captioning pass only
    proj: int  # contrastive projections, once per sample (0 without contrastive)
    num_patches: int
    num_layers: int
    hidden_size: int
    contrastive: bool

    @classmethod
    def of(cls, cfg: ModelConfig, active_params: int) -> TrainFlops:
        """Split ``count_parameters(model)[1]`` (active per token) by which tokens each part sees."""
        D, V = cfg.hidden_size, cfg.vocab_size
        patch = cfg.patch_dim * D
        head = V * D
        lookups = NUM_MODALITIES * D
        if cfg.pos == "learned":
            lookups += cfg.max_seq_len * D
        if not cfg.tie_embeddings:
            lookups += V * D  # the token table, separate from the head
        contrastive = cfg.contrastive_coef > 0
        proj = 2 * D * D if contrastive else 0
        scale = 1 if contrastive else 0  # logit_scale
        trunk = active_params - patch - head - lookups - proj - scale
        if trunk <= 0:
            raise ValueError(f"active_params={active_params} is too small for this model config")
        return cls(trunk, patch, head, proj, cfg.num_patches, cfg.num_layers, D, contrastive)

    def attention_pairs(self, text_len: float) -> float:
        """(query, key) pairs the prefix-LM mask allows in one sample, over all passes."""
        P, L = self.num_patches, text_len
        causal = L * (L + 1) / 2
        return P * P + P * L + causal + (causal if self.contrastive else 0.0)

    def forward_per_sample(self, text_len: float) -> float:
        P, L = self.num_patches, text_len
        tokens = P + L + (L if self.contrastive else 0.0)  # through the trunk, all passes
        matmul = 2 * (self.trunk * tokens + self.patch * P + self.head * L + self.proj)
        return matmul + 4 * self.hidden_size * self.num_layers * self.attention_pairs(text_len)

    def per_sample(self, text_len: float) -> float:
        """Forward + backward (the backward costs twice the forward)."""
        return 3 * self.forward_per_sample(text_len)

    def per_token(self, text_len: float) -> float:
        """Per real token (image + caption tokens of the captioning pass, what tokens/s counts)."""
        return self.per_sample(text_len) / (self.num_patches + text_len)

    def for_window(self, tokens: float, samples: float, max_text_len: int) -> float:
        """FLOPs of ``samples`` samples holding ``tokens`` real tokens (at their mean caption length)."""
        if samples <= 0 or tokens <= 0:
            return 0.0
        text_len = min(max(tokens / samples - self.num_patches, 0.0), float(max_text_len))
        return tokens * self.per_token(text_len)


# Dense (no 2:4 sparsity) peak TFLOP/s per GPU: bf16, TF32, plain fp32 (NVIDIA datasheets). Matched in
# order against torch.cuda.get_device_name, so the more specific names come first. None: no such
# tensor-core path (fp32 is then the peak for TF32 too).
PEAK_TFLOPS: list[tuple[str, float | None, float | None, float]] = [
    (r"\bGH200\b", 989.0, 494.7, 66.9),
    (r"\bH200\b", 989.0, 494.7, 66.9),
    (r"\bH100\b.*\bPCIe\b", 756.0, 378.0, 51.2),
    (r"\bH100\b.*\bNVL\b", 835.5, 417.5, 60.0),
    (r"\bH100\b", 989.0, 494.7, 66.9),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bB200\b", 2250.0, 1125.0, 75.0),
    (r"\bA100\b", 312.0, 156.0, 19.5),
    (r"\bL40S\b", 362.0, 183.0, 91.6),
    (r"\bL4\b", 121.0, 60.0, 30.3),
    (r"\bV100\b", None, None, 15.7),
]


def lookup_peak_tflops(device_name: str, dtype: torch.dtype, tf32: bool = True) -> float | None:
    """The peak for a device name and compute dtype; None for an unknown device or dtype."""
    for pattern, bf16, tf32_peak, fp32 in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if dtype == torch.bfloat16:
                return bf16
            if dtype == torch.float32:
                return tf32_peak if tf32 and tf32_peak is not None else fp32
            return None
    return None


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def peak_tflops(device: torch.device, dtype: torch.dtype, tf32: bool, configured: float | None) -> float | None:
    """``train.peak_tflops`` when set (0: none, so no MFU), else the table's value for this GPU;
    None on CPU or an unknown GPU."""
    if configured is not None:
        return configured or None
    if device.type != "cuda":
        return None
    return lookup_peak_tflops(_device_name(device.index if device.index is not None else torch.cuda.current_device()),
                              dtype, tf32)


def throughput_metrics(flops: float, seconds: float, world_size: int, peak: float | None) -> dict[str, float]:
    """``tflops``: achieved model TFLOP/s per rank; ``mfu``: that over the peak, when one is known."""
    tflops = flops / max(seconds, 1e-9) / max(world_size, 1) / 1e12
    m = {"tflops": tflops}
    if peak:
        m["mfu"] = tflops / peak
    return m
