"""Held-out evaluation: caption loss / perplexity against a unigram baseline, and retrieval.

Retrieval is generative: every (image, caption) pair of a pool of N held-out samples is scored by
log p(caption | image), normalised over the pool's images (a PMI score: it removes the prior that
favours short, common captions), and recall@k is computed over the pool's distinct captions.
Chance is k / (number of distinct captions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch

from ..models.retrieval import normalize_over_images, recall_at_k

__all__ = ["evaluate"]


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable,
    device: torch.device,
    *,
    max_batches: int,
    retrieval_size: int,
    pad_id: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Caption loss over ``max_batches`` batches; retrieval over the first ``retrieval_size`` samples."""
    was_training = model.training
    model.eval()
    nll_sum, n_tokens = 0.0, 0
    token_counts = torch.zeros(vocab_size, dtype=torch.long)
    pool_patches, pool_text, pool_mask = [], [], []
    pooled = 0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        if i < max_batches:
            with _autocast(device, dtype):
                out = model(batch)
            n = int(out.num_text_tokens)
            nll_sum += float(out.caption_loss) * n
            n_tokens += n
            targets = batch.text[:, 1:][batch.text_mask[:, 1:]]
            token_counts += torch.bincount(targets.cpu(), minlength=vocab_size)[:vocab_size]
        if pooled < retrieval_size:
            take = min(retrieval_size - pooled, batch.patches.shape[0])
            pool_patches.append(batch.patches[:take])
            pool_text.append(batch.text[:take])
            pool_mask.append(batch.text_mask[:take])
            pooled += take
        if i + 1 >= max_batches and pooled >= retrieval_size:
            break
    if n_tokens == 0:
        raise RuntimeError("the evaluation data yielded no caption tokens: check data.eval_shards")
    caption_loss = nll_sum / n_tokens
    p = token_counts.double() / token_counts.sum()
    unigram = float(-(p[p > 0] * p[p > 0].log()).sum())
    result = {
        "caption_loss": caption_loss,
        "perplexity": math.exp(min(caption_loss, 50.0)),
        "unigram_loss": unigram,
    }
    result.update(_retrieval(model, pool_patches, pool_text, pool_mask, pad_id, device, dtype))
    model.train(was_training)
    return result


def _retrieval(model, patches, texts, masks, pad_id: int, device, dtype) -> dict[str, float]:
    if not patches:
        return {}
    patches_N = torch.cat(patches)
    L = max(t.shape[1] for t in texts)
    text_N = torch.cat([torch.nn.functional.pad(t, (0, L - t.shape[1]), value=pad_id) for t in texts])
    mask_N = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1]), value=False) for m in masks])
    # distinct captions: several images may share one description
    keys = [tuple(row[m].tolist()) for row, m in zip(text_N.cpu(), mask_N.cpu())]
    distinct: dict[tuple, int] = {}
    first_row: list[int] = []
    for i, k in enumerate(keys):
        if k not in distinct:
            distinct[k] = len(distinct)
            first_row.append(i)
    cols = torch.tensor(first_row)
    target_N = torch.tensor([distinct[k] for k in keys])
    with _autocast(device, dtype):
        scores = model.caption_scores(
            {"patches": patches_N}, {"text": text_N[cols], "text_mask": mask_N[cols]}
        )
    rec = recall_at_k(normalize_over_images(scores.float()).cpu(), target_N)
    n_txt = len(distinct)
    return {
        "retrieval_r1": rec["recall@1"],
        "retrieval_r5": rec["recall@5"],
        "retrieval_chance_r1": 1.0 / n_txt,
        "retrieval_chance_r5": min(1.0, 5.0 / n_txt),
        "retrieval_pool": float(len(keys)),
    }
