"""Held-out evaluation: caption loss / perplexity against two baselines, and retrieval.

Baselines: the unigram entropy of the held-out caption tokens, and the image-ablated loss: the same
model scoring each caption with another held-out sample's image (the batch's images rolled by one;
a blank image when a single sample is evaluated). The captions follow templates, so a model that
ignores the image but knows the grammar is far below unigram; the gap between the ablated loss and
the caption loss is the part of the loss the image explains, measured rather than inferred.

Retrieval is generative: every (image, caption) pair of a pool of N held-out samples is scored by
log p(caption | image), normalised over the pool's images (a PMI score: it removes the prior that
favours short, common captions), and recall@k is computed over the pool's distinct captions.
Chance is k / (number of distinct captions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import replace

import torch

from ..models.retrieval import normalize_over_images, recall_at_k

__all__ = ["evaluate"]


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _identity(x):
    return x


def _other_images(collected: list, i: int) -> tuple[torch.Tensor, bool]:
    """Images for batch ``i`` that belong to other samples: the batch rolled by one, or with one
    sample per batch the next batch's; (patches, True). Blank patches when there is no other
    sample: (zeros, False)."""
    patches = collected[i].patches
    if patches.shape[0] >= 2:
        return patches.roll(1, dims=0), True
    for j in (*range(i + 1, len(collected)), *range(i)):
        if collected[j].patches.shape == patches.shape:
            return collected[j].patches, True
    return torch.zeros_like(patches), False


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
    dp_sum: Callable[[torch.Tensor], torch.Tensor] = _identity,
    dp_min: Callable[[int], int] = _identity,
) -> dict[str, float]:
    """Caption loss over ``max_batches`` batches; retrieval over the first ``retrieval_size`` samples.

    In a data-parallel job each replica evaluates its own share: ``dp_min`` makes every rank run
    the same number of forward passes (expert and tensor parallelism need them in step), and
    ``dp_sum`` adds up the token sums and the retrieval hits.
    """
    was_training = model.training
    model.eval()
    collected, pooled = [], 0
    for batch in batches:
        collected.append(batch)
        pooled += batch.patches.shape[0]
        if len(collected) >= max_batches and pooled >= retrieval_size:
            break
    n_loss = dp_min(min(len(collected), max_batches))
    n_pool = dp_min(min(pooled, retrieval_size))
    # sums stay on the device and the unigram counts come from the host batches: no sync per batch
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    ablated_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.float64, device=device)
    token_counts = torch.zeros(vocab_size, dtype=torch.float64)
    # [batches whose images were swapped with other samples', batches] over every rank
    ablation = torch.zeros(2, dtype=torch.float64)
    for i, batch in enumerate(collected[:n_loss]):
        targets = batch.text[:, 1:][batch.text_mask[:, 1:]]
        token_counts += torch.bincount(targets.cpu(), minlength=vocab_size)[:vocab_size].double()
        others, shuffled = _other_images(collected[:n_loss], i)
        ablation += torch.tensor([float(shuffled), 1.0], dtype=torch.float64)
        with _autocast(device, dtype):
            out = model(batch.to(device, non_blocking=True))
            ablated = model(replace(batch, patches=others).to(device, non_blocking=True))
        nll_sum += out.caption_nll_sum.double()
        ablated_sum += ablated.caption_nll_sum.double()
        n_tokens += out.num_text_tokens.double()
    nll_sum, ablated_sum, n_tokens = dp_sum(nll_sum), dp_sum(ablated_sum), dp_sum(n_tokens)
    token_counts, ablation = dp_sum(token_counts), dp_sum(ablation)
    if float(n_tokens) == 0:
        raise RuntimeError("the evaluation data yielded no caption tokens: check data.eval_shards")
    caption_loss = float(nll_sum / n_tokens)
    image_ablated = float(ablated_sum / n_tokens)
    p = token_counts / token_counts.sum()
    unigram = float(-(p[p > 0] * p[p > 0].log()).sum())
    result = {
        "caption_loss": caption_loss,
        "perplexity": math.exp(min(caption_loss, 50.0)),
        "unigram_loss": unigram,
        "image_ablated_loss": image_ablated,
        "image_explained_loss": image_ablated - caption_loss,  # nats/token the right image saves
        "image_ablation_shuffled": float(ablation[0] / ablation[1]),  # share of batches shuffled (rest blanked)
    }
    if n_pool >= 5:
        pool = _take(collected, n_pool)
        result.update(_retrieval(model, *pool, pad_id, device, dtype, dp_sum))
    model.train(was_training)
    return result


def _take(batches: list, n: int) -> tuple[list, list, list]:
    patches, texts, masks, left = [], [], [], n
    for b in batches:
        if left <= 0:
            break
        take = min(left, b.patches.shape[0])
        patches.append(b.patches[:take])
        texts.append(b.text[:take])
        masks.append(b.text_mask[:take])
        left -= take
    return patches, texts, masks


def _retrieval(model, patches, texts, masks, pad_id: int, device, dtype, dp_sum) -> dict[str, float]:
    patches_N = torch.cat(patches).to(device)
    L = max(t.shape[1] for t in texts)
    text_N = torch.cat([torch.nn.functional.pad(t, (0, L - t.shape[1]), value=pad_id) for t in texts]).to(device)
    mask_N = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1]), value=False) for m in masks]).to(device)
    # score every (image, caption) pair, duplicates included, so that every rank runs the same
    # number of passes; then keep one column per distinct caption
    with _autocast(device, dtype):
        scores_NN = model.caption_scores({"patches": patches_N}, {"text": text_N, "text_mask": mask_N}).float().cpu()
    keys = [tuple(row[m].tolist()) for row, m in zip(text_N.cpu(), mask_N.cpu())]
    distinct: dict[tuple, int] = {}
    first_row: list[int] = []
    for i, k in enumerate(keys):
        if k not in distinct:
            distinct[k] = len(distinct)
            first_row.append(i)
    target_N = torch.tensor([distinct[k] for k in keys])
    rec = recall_at_k(normalize_over_images(scores_NN[:, first_row]), target_N)
    N, n_txt = len(keys), len(distinct)
    sums = dp_sum(torch.tensor([rec["recall@1"] * N, rec["recall@5"] * N, N / n_txt, N * min(1.0, 5 / n_txt), N], dtype=torch.float64))
    total = float(sums[4])
    return {
        "retrieval_r1": float(sums[0]) / total,
        "retrieval_r5": float(sums[1]) / total,
        "retrieval_chance_r1": float(sums[2]) / total,
        "retrieval_chance_r5": float(sums[3]) / total,
        "retrieval_pool": float(N),
    }
