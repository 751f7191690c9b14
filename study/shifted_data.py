"""A second demo data set with different modality statistics, for the transfer experiment.

Same vocabulary and objects as the embedded demo set, but: always two objects and each caption says
the relation both ways ("a small red circle above a large blue square a large blue square below a
small red circle"), so about twice the text per image; bright backgrounds instead of dark ones; and
Gaussian pixel noise. The source set's tokenizer is copied in, so token ids mean the same thing and a
model trained on one set runs on the other unchanged.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from ..runtime.config import check
from ..runtime.data.demo import DemoData, Scene, render_scene, sample_scene

__all__ = ["ShiftSpec", "make_shifted_demo", "CONVERSE"]

log = logging.getLogger("modalmoe.study")

CONVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


@dataclass
class ShiftSpec:
    """How the shifted set differs from the demo set (defaults: more text, brighter, noisier)."""

    single_object_p: float = 0.0  # demo: 0.25; 0 = always two objects and a relation
    both_ways: bool = True  # append the converse sentence: twice the caption tokens per image
    background: tuple[int, int] = (150, 230)  # grey level range (demo: 0..60)
    noise_std: float = 24.0  # Gaussian pixel noise, in 0..255 units (demo: none)

    def validate(self, prefix: str = "shift") -> ShiftSpec:
        p = prefix
        check(0.0 <= self.single_object_p <= 1.0, f"{p}.single_object_p", f"must be in [0, 1], got {self.single_object_p}")
        lo, hi = self.background
        check(0 <= lo <= hi <= 255, f"{p}.background", f"must be [lo, hi] grey levels in 0..255, got {list(self.background)}")
        check(self.noise_std >= 0, f"{p}.noise_std", f"must be >= 0, got {self.noise_std}")
        return self


def _scene(rng: random.Random, shift: ShiftSpec) -> Scene:
    while True:
        scene = sample_scene(rng, heldout=None)
        if scene.relation is not None or rng.random() < shift.single_object_p:
            break
    return Scene(scene.objects, scene.relation, rng.randint(*shift.background))


def _caption(scene: Scene, shift: ShiftSpec) -> str:
    if not shift.both_ways or scene.relation is None:
        return scene.caption
    a, b = scene.objects
    return f"{scene.caption} {b.phrase} {CONVERSE[scene.relation]} {a.phrase}"


def _png(scene: Scene, image_size: int, noise_std: float, rng: np.random.Generator) -> bytes:
    image = render_scene(scene, image_size)
    if noise_std > 0:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, noise_std, (image_size, image_size, 3))
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write(out: Path, split: str, n: int, seed: int, image_size: int, per_shard: int, shift: ShiftSpec) -> list[str]:
    rng = random.Random(f"modalmoe-shifted-{seed}-{split}")
    noise = np.random.default_rng([seed, 1 if split == "train" else 2])
    names = []
    for shard, start in enumerate(range(0, n, per_shard)):
        name = f"{split}-{shard:06d}.tar"
        with wds.TarWriter(str(out / name), user="modalmoe", group="modalmoe", encoder=False, mtime=0) as sink:
            for i in range(start, min(n, start + per_shard)):
                scene = _scene(rng, shift)
                sink.write({
                    "__key__": f"{split}-{i:06d}",
                    "png": _png(scene, image_size, shift.noise_std, noise),
                    "txt": _caption(scene, shift).encode("utf-8"),
                    "json": json.dumps({"objects": [asdict(o) for o in scene.objects], "relation": scene.relation},
                                       sort_keys=True).encode("utf-8"),
                })
        names.append(name)
    return names


def _pattern(out: Path, split: str, names: list[str]) -> str:
    if len(names) == 1:
        return str(out / names[0])
    return str(out / f"{split}-{{000000..{len(names) - 1:06d}}}.tar")


def make_shifted_demo(
    out_dir: str | Path,
    source: DemoData,
    *,
    seed: int = 1,
    n_train: int = 2000,
    n_eval: int = 300,
    samples_per_shard: int = 250,
    image_size: int = 32,
    shift: ShiftSpec | None = None,
) -> DemoData:
    """Write train/eval shards and a copy of ``source``'s tokenizer to ``out_dir`` (reused when an
    identical build is there already). ``shift`` is validated by the caller (a study, at load)."""
    shift = shift or ShiftSpec()
    for name, value in (("n_train", n_train), ("n_eval", n_eval), ("samples_per_shard", samples_per_shard)):
        check(value > 0, name, f"must be a positive integer, got {value}")
    out = Path(out_dir).resolve()
    params = {"seed": seed, "n_train": n_train, "n_eval": n_eval, "samples_per_shard": samples_per_shard,
              "image_size": image_size, "shift": asdict(shift), "source": source.out_dir}
    params["shift"]["background"] = list(shift.background)
    manifest_path = out / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if manifest is not None and manifest.get("params") == params:
        log.info("reusing shifted data set in %s", out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest_path.unlink(missing_ok=True)
        train = _write(out, "train", n_train, seed, image_size, samples_per_shard, shift)
        evals = _write(out, "eval", n_eval, seed, image_size, samples_per_shard, shift)
        shutil.copyfile(source.tokenizer, out / "tokenizer.model")
        manifest = {"params": params, "train_files": train, "eval_files": evals, "tokenizer": "tokenizer.model"}
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        log.info("wrote shifted data set to %s: %d train / %d eval samples", out, n_train, n_eval)
    return DemoData(
        out_dir=str(out),
        train_shards=[_pattern(out, "train", manifest["train_files"])],
        eval_shards=[_pattern(out, "eval", manifest["eval_files"])],
        tokenizer=str(out / manifest["tokenizer"]),
        manifest=manifest,
    )
