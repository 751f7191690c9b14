"""The embedded default data set: rendered shape scenes with compositional captions.

"a small red circle above a large blue square": shape, colour, size and relative position all vary
independently, so a model can only caption correctly by reading the image, and a few colour+shape
combinations never appear in training, so eval can also measure compositional generalisation.
Built in seconds, byte-identical for a given seed.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

from ..config import check
from .tokenizer import train_tokenizer

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "RELATIONS",
    "HELDOUT_COMBOS",
    "SceneObject",
    "Scene",
    "sample_scene",
    "render_scene",
    "DemoData",
    "make_demo",
    "demo_paths",
]

log = logging.getLogger("modalmoe.data")

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (155, 60, 205),
    "orange": (245, 140, 30),
}
SIZES = {"small": 0.24, "large": 0.44}  # object diameter as a fraction of the image side
RELATIONS = ("above", "below", "left of", "right of")
HELDOUT_COMBOS = (("green", "triangle"), ("yellow", "circle"), ("blue", "diamond"))

_SUPERSAMPLE = 4
_MARGIN = 0.03
_SINGLE_OBJECT_P = 0.25
_HELDOUT_EVAL_P = 0.25
_TAR_OWNER = "modalmoe"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, fraction of the image width
    cy: float

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relation: str | None  # how objects[0] sits relative to objects[1]
    background: int  # grey level

    @property
    def caption(self) -> str:
        if self.relation is None:
            return self.objects[0].phrase
        return f"{self.objects[0].phrase} {self.relation} {self.objects[1].phrase}"

    @property
    def heldout(self) -> bool:
        return any((o.colour, o.shape) in HELDOUT_COMBOS for o in self.objects)


def _attributes(rng: random.Random, heldout: bool | None) -> tuple[str, str, str]:
    """(shape, colour, size); ``heldout`` True forces a held-out combo, False excludes them."""
    if heldout:
        colour, shape = rng.choice(HELDOUT_COMBOS)
        return shape, colour, rng.choice(list(SIZES))
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if heldout is None or (colour, shape) not in HELDOUT_COMBOS:
            return shape, colour, rng.choice(list(SIZES))


def _coord(rng: random.Random, radius: float, lo: float, hi: float) -> float:
    lo, hi = lo + radius + _MARGIN, hi - radius - _MARGIN
    return rng.uniform(lo, max(lo, hi))


def sample_scene(rng: random.Random, heldout: bool | None = False) -> Scene:
    """One or two objects; with two, the relation decides which half of the image each lies in."""
    first = _attributes(rng, heldout)
    background = rng.randint(0, 60)
    if rng.random() < _SINGLE_OBJECT_P:
        r = SIZES[first[2]] / 2
        obj = SceneObject(*first, cx=_coord(rng, r, 0, 1), cy=_coord(rng, r, 0, 1))
        return Scene((obj,), None, background)
    second = _attributes(rng, False if heldout is not None else None)
    relation = rng.choice(RELATIONS)
    ra, rb = SIZES[first[2]] / 2, SIZES[second[2]] / 2
    a_first = relation in ("above", "left of")  # object a takes the top/left half
    halves = ((0.0, 0.5), (0.5, 1.0)) if a_first else ((0.5, 1.0), (0.0, 0.5))
    split_a, split_b = (_coord(rng, ra, *halves[0]), _coord(rng, rb, *halves[1]))
    free_a, free_b = _coord(rng, ra, 0, 1), _coord(rng, rb, 0, 1)
    if relation in ("above", "below"):
        a = SceneObject(*first, cx=free_a, cy=split_a)
        b = SceneObject(*second, cx=free_b, cy=split_b)
    else:
        a = SceneObject(*first, cx=split_a, cy=free_a)
        b = SceneObject(*second, cx=split_b, cy=free_b)
    return Scene((a, b), relation, background)


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy, r = obj.cx * side, obj.cy * side, SIZES[obj.size] / 2 * side
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        h = r * math.sqrt(math.pi) / 2  # same area as the circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, image_size: int = 32) -> Image.Image:
    """Drawn at 4x and box-filtered down, so small shapes keep anti-aliased, recognisable edges."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, side)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _metadata(scene: Scene) -> bytes:
    meta = {
        "objects": [asdict(o) for o in scene.objects],
        "relation": scene.relation,
        "heldout_combo": scene.heldout,
    }
    return json.dumps(meta, sort_keys=True).encode("utf-8")


def _signature(scene: Scene, image_size: int) -> tuple:
    return (
        scene.caption,
        scene.background,
        tuple((round(o.cx * image_size), round(o.cy * image_size)) for o in scene.objects),
    )


def _write_split(
    out_dir: Path, split: str, scenes: list[Scene], samples_per_shard: int, image_size: int
) -> list[str]:
    """Shards ``split-000000.tar``...; fixed mtime/owner/mode so equal scenes give equal bytes."""
    names = []
    for shard, start in enumerate(range(0, len(scenes), samples_per_shard)):
        name = f"{split}-{shard:06d}.tar"
        with wds.TarWriter(str(out_dir / name), user=_TAR_OWNER, group=_TAR_OWNER, encoder=False, mtime=0) as sink:
            for i, scene in enumerate(scenes[start : start + samples_per_shard], start):
                sink.write(
                    {
                        "__key__": f"{split}-{i:06d}",
                        "png": _png(render_scene(scene, image_size)),
                        "txt": scene.caption.encode("utf-8"),
                        "json": _metadata(scene),
                    }
                )
        names.append(name)
    return names


def _pattern(out_dir: Path, split: str, num_shards: int) -> str:
    if num_shards == 1:
        return str(out_dir / f"{split}-000000.tar")
    return str(out_dir / f"{split}-{{000000..{num_shards - 1:06d}}}.tar")


@dataclass
class DemoData:
    """Where make_demo put things; plug ``train_shards``/``eval_shards``/``tokenizer`` into DataConfig."""

    out_dir: str
    train_shards: list[str]
    eval_shards: list[str]
    tokenizer: str
    manifest: dict = field(default_factory=dict)


def make_demo(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 4000,
    n_eval: int = 500,
    samples_per_shard: int = 250,
    image_size: int = 32,
    vocab_size: int = 64,
    heldout_combos: bool = True,
    reuse: bool = True,
) -> DemoData:
    """Write train/eval shards, ``tokenizer.model``, ``manifest.json`` and a README into ``out_dir``.

    Eval scenes never repeat a train scene; with ``heldout_combos`` about a quarter of them contain
    a colour+shape pair (``HELDOUT_COMBOS``) that training never shows. With ``reuse``, an existing
    build with the same parameters is returned as is.
    """
    for name, value in (
        ("n_train", n_train),
        ("n_eval", n_eval),
        ("samples_per_shard", samples_per_shard),
        ("image_size", image_size),
    ):
        check(value > 0, name, f"must be a positive integer, got {value}")
    out = Path(out_dir).resolve()
    params = {
        "seed": seed,
        "n_train": n_train,
        "n_eval": n_eval,
        "samples_per_shard": samples_per_shard,
        "image_size": image_size,
        "vocab_size": vocab_size,
        "heldout_combos": heldout_combos,
    }
    manifest_path = out / "manifest.json"
    if reuse:
        manifest = _complete_manifest(out)
        if manifest is not None and manifest.get("params") == params:
            log.info("reusing demo data set in %s", out)
            return _demo_data(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)

    train_rng = random.Random(f"modalmoe-demo-{seed}-train")
    eval_rng = random.Random(f"modalmoe-demo-{seed}-eval")
    train = [sample_scene(train_rng, heldout=False if heldout_combos else None) for _ in range(n_train)]
    seen = {_signature(s, image_size) for s in train}
    evals: list[Scene] = []
    while len(evals) < n_eval:
        heldout = (eval_rng.random() < _HELDOUT_EVAL_P) if heldout_combos else None
        scene = sample_scene(eval_rng, heldout=heldout)
        if _signature(scene, image_size) not in seen:
            evals.append(scene)

    train_files = _write_split(out, "train", train, samples_per_shard, image_size)
    eval_files = _write_split(out, "eval", evals, samples_per_shard, image_size)
    # word pieces: the caption language is ~20 words, so captions stay ~10 tokens long
    tokenizer = train_tokenizer(
        [str(out / f) for f in train_files], out / "tokenizer", vocab_size, model_type="word"
    )
    manifest = {
        "params": params,
        "train_files": train_files,
        "eval_files": eval_files,
        "train_pattern": Path(_pattern(out, "train", len(train_files))).name,
        "eval_pattern": Path(_pattern(out, "eval", len(eval_files))).name,
        "counts": {"train": n_train, "eval": n_eval, "eval_heldout_combo": sum(s.heldout for s in evals)},
        "tokenizer": "tokenizer.model",
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "relations": list(RELATIONS),
        "heldout_combos": [f"{c} {s}" for c, s in HELDOUT_COMBOS] if heldout_combos else [],
    }
    (out / "README").write_text(_readme(manifest))
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("wrote demo data set to %s: %d train / %d eval samples", out, n_train, n_eval)
    return _demo_data(out, manifest)


def _complete_manifest(out: Path) -> dict | None:
    """The manifest of a finished build in ``out`` (it is written last), or None."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("train_files", []) + manifest.get("eval_files", []) + [manifest.get("tokenizer", "")]
    return manifest if all((out / f).is_file() for f in files) else None


def demo_paths(out_dir: str | Path) -> dict[str, list[str] | str] | None:
    """``{"train": [pattern], "eval": [pattern], "tokenizer": path}`` of a finished demo build, else None."""
    out = Path(out_dir).resolve()
    manifest = _complete_manifest(out)
    if manifest is None:
        return None
    data = _demo_data(out, manifest)
    return {"train": data.train_shards, "eval": data.eval_shards, "tokenizer": data.tokenizer}


def _demo_data(out: Path, manifest: dict) -> DemoData:
    return DemoData(
        out_dir=str(out),
        train_shards=[str(out / manifest["train_pattern"])],
        eval_shards=[str(out / manifest["eval_pattern"])],
        tokenizer=str(out / manifest["tokenizer"]),
        manifest=manifest,
    )


def _readme(m: dict) -> str:
    p = m["params"]
    return (
        "modalmoe demo data set (generated by modalmoe.runtime.data.make_demo)\n\n"
        f"seed {p['seed']}; {p['image_size']}x{p['image_size']} PNG scenes of one or two shapes with captions\n"
        "like 'a small red circle above a large blue square'.\n"
        f"train: {m['counts']['train']} samples in {m['train_pattern']}\n"
        f"eval:  {m['counts']['eval']} samples in {m['eval_pattern']} (disjoint from train; "
        f"{m['counts']['eval_heldout_combo']} contain a colour+shape pair never seen in training: "
        f"{', '.join(m['heldout_combos']) or 'none'})\n"
        f"tokenizer: {m['tokenizer']} (sentencepiece word model, {m['tokenizer_vocab_size']} pieces; "
        "pad=0 unk=1 bos=2 eos=3)\n"
        "Each sample: key.png, key.txt (caption), key.json (objects, relation, heldout_combo).\n"
    )
