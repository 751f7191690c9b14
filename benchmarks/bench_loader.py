"""Data loader throughput at 224 px from 512x384 JPEGs, per worker, against one GPU step's appetite.

The shards look like img2dataset's output (``key.jpg`` at quality 95, ``key.txt``, ``key.json``)
with photo-like synthetic images (smooth fields, edges and sensor noise; uniform noise would
decode slower than photos, flat colour faster). Timed, in interleaved rounds (medians):

Rates in this process are CPU time (one thread: what a worker with a core of its own achieves, on
a shared host too); ``build_loader``'s is wall time and shares the host's two cores.

- decode only, per sample, in this process: the library's ``SampleDecoder`` (draft + crop-box
  resize + fused normalisation) and the transform users write by hand (PIL decode, resize
  shorter side, center crop, ``(x/255 - mean)/std``: what the library did before), same bytes;
- the library's ``SampleStream`` (tar reading, grouping, shuffle buffer, decode, tokenise,
  collate) in this process: one dataloader worker's rate;
- ``build_loader`` with ``--workers`` worker processes, end to end.

A worker's rate is set against what one GPU step of the ``small`` preset consumes: batch 64
per step over a step time derived from the preset's model FLOPs (``train/flops.py``) at an
assumed MFU of a 989 TFLOP/s (bf16 dense) H100/H200 (``--mfu``, default 0.1 0.2 0.4; a 512-wide
model is unlikely to reach the upper end). No GPU was timed here. ``--source 1024x768`` shows the
draft path at work (a source at least twice the target on both sides).

    python benchmarks/bench_loader.py [--samples 512] [--rounds 5] [--workers 2] [--mfu 0.1 0.2 0.4] [--source 512x384]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from modalmoe.models import build_model
from modalmoe.models.params import count_parameters
from modalmoe.runtime.data import DataConfig
from modalmoe.runtime.data.decode import ImageTransform, SampleDecoder, resize_then_crop
from modalmoe.runtime.data.loader import build_loader
from modalmoe.runtime.data.pipeline import SampleStream
from modalmoe.runtime.data.tokenizer import train_tokenizer
from modalmoe.train.flops import TrainFlops
from modalmoe.train.job_config import load_job_config
from PIL import Image

PRESET = Path(__file__).resolve().parents[1] / "launch" / "configs" / "small.yaml"
H100_BF16_TFLOPS = 989.0
WORDS = "a photo of the red blue small large dog cat tree car house sky street man woman beach on in near".split()


def photo_like(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(8, 60, size=(3, 2))
    img = np.stack([128 + 90 * np.sin(x / f[c, 0] + c) * np.cos(y / f[c, 1] - c) for c in range(3)], -1)
    for _ in range(6):  # hard-edged blobs
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, h / 3)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_shards(out: Path, samples: int, per_shard: int, w: int, h: int) -> list[str]:
    rng = np.random.default_rng(0)
    urls = []
    for s in range(0, samples, per_shard):
        path = out / f"{s // per_shard:05d}.tar"
        with wds.TarWriter(str(path)) as tar:
            for i in range(s, min(samples, s + per_shard)):
                buf = io.BytesIO()
                photo_like(rng, w, h).save(buf, "JPEG", quality=95)
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 20))))
                meta = {"url": f"http://example.com/{i}.jpg", "width": w, "height": h, "caption": caption}
                tar.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": caption.encode(),
                           "json": json.dumps(meta).encode()})
        urls.append(str(path))
    return urls


def hand_written_decode(raw: dict, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """What users write (and the library did before): full decode, resize, crop, normalise."""
    with Image.open(io.BytesIO(raw["jpg"])) as im:
        return (resize_then_crop(im, size) - mean) / std


def preset_step() -> tuple[int, float]:
    """(batch, FLOPs per step at full captions) of the small preset."""
    cfg = load_job_config(PRESET)
    model_cfg = cfg.model.validate()
    active = count_parameters(build_model(model_cfg, device="meta"))[1]
    flops = TrainFlops.of(model_cfg, active).per_sample(model_cfg.max_text_len) * cfg.data.batch_size
    return cfg.data.batch_size, flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    ap.add_argument("--source", default="512x384", help="source JPEG size WxH")
    a = ap.parse_args()
    src_w, src_h = (int(v) for v in a.source.split("x"))
    torch.set_num_threads(1)  # what a dataloader worker gets
    batch, flops = preset_step()
    needs = {mfu: batch / (flops / (mfu * H100_BF16_TFLOPS * 1e12)) for mfu in a.mfu}
    print(f"small preset: batch {batch}, {flops / 1e12:.2f} TFLOP per step (full captions); on {H100_BF16_TFLOPS:.0f} "
          f"TFLOP/s (assumed, no GPU timed): " + ", ".join(
              f"MFU {m:.2f} -> {batch / n * 1e3:.1f} ms/step, {n:.0f} samples/s" for m, n in needs.items()))
    print(f"host shared with other jobs: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"1 torch thread per process")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        urls = write_shards(out, a.samples, 128, src_w, src_h)
        tok = train_tokenizer(urls, out / "tok", 64, model_type="word")
        cfg = DataConfig(train_shards=urls, tokenizer=str(out / "tok.model"), image_size=224, patch_size=16,
                         max_text_len=64, batch_size=batch, num_workers=a.workers, shuffle_buffer=256)
        raws = [s for s in wds.WebDataset(urls, shardshuffle=False)]
        mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
        decoder = SampleDecoder(ImageTransform(224, 16, cfg.mean, cfg.std), tok, cfg.max_text_len)

        def per_sample(fn) -> float:
            t0 = time.process_time()
            for raw in raws:
                fn(raw)
            return (time.process_time() - t0) / len(raws)

        def stream_rate() -> float:
            stream = SampleStream(cfg, urls, tok, train=True, dp_rank=0, dp_size=1, num_workers=1)
            it = iter(stream)
            next(it)  # fills the shuffle buffer
            n, t0 = 0, time.process_time()
            while n < a.samples:
                n += next(it).patches.shape[0]
            return n / (time.process_time() - t0)

        contenders = {
            "hand-written decode": lambda: per_sample(lambda r: hand_written_decode(r, 224, mean, std)),
            "library decode": lambda: per_sample(decoder),
        }
        times: dict[str, list[float]] = {k: [] for k in contenders}
        streams: list[float] = []
        for _ in range(a.rounds):
            for k, fn in contenders.items():
                times[k].append(fn())
            streams.append(stream_rate())
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{a.source} JPEG q95 ({statistics.mean(len(r['jpg']) for r in raws) / 1024:.0f} KiB mean) -> "
              f"224 px patches, medians of {a.rounds} interleaved rounds of {len(raws)} samples, this process's CPU "
              f"time (1 thread: the rate of a worker with a core of its own, whatever else runs here):")
        for k, v in med.items():
            print(f"  {k:<22s} {v * 1e3:6.2f} ms/sample = {1 / v:6.0f} samples/s")
        print(f"  library / hand-written time: {med['library decode'] / med['hand-written decode']:.2f}")
        rate = statistics.median(streams)
        print(f"  SampleStream, one worker's work in this process: {rate:.0f} samples/s "
              f"(rounds: {', '.join(f'{r:.0f}' for r in streams)}); workers to keep up with the step: "
              + ", ".join(f"{n / rate:.0f} at MFU {m:.2f}" for m, n in needs.items()))
        loader = build_loader(cfg, split="train", dp_rank=0, dp_size=1, tokenizer=tok)
        it = iter(loader)
        next(it)
        n, t0 = 0, time.perf_counter()
        while n < 2 * a.samples:
            n += next(it).patches.shape[0]
        total = n / (time.perf_counter() - t0)
        print(f"  build_loader, {a.workers} worker processes on this shared {os.cpu_count()}-CPU host (wall): {total:.0f} samples/s "
              f"= {total / needs[min(needs)]:.3f} of the step's need at MFU {min(needs):.2f}")


if __name__ == "__main__":
    main()
