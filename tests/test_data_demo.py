"""The embedded demo data set: deterministic, disjoint eval split, captions that match the pictures."""

import json
import random
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from modalmoe.runtime.data import (
    HELDOUT_COMBOS,
    DataConfig,
    Tokenizer,
    demo_paths,
    expand_shards,
    iter_captions,
    make_demo,
    render_scene,
    sample_scene,
)

SMALL = dict(n_train=120, n_eval=40, samples_per_shard=50)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), seed=3, **SMALL)


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.mtime, m.uid, m.uname, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_same_seed_gives_byte_identical_shards(demo, tmp_path):
    again = make_demo(tmp_path / "again", seed=3, **SMALL)
    assert (
        demo.manifest["train_files"]
        == again.manifest["train_files"]
        == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    )
    for name in demo.manifest["train_files"] + demo.manifest["eval_files"]:
        assert (Path(demo.out_dir) / name).read_bytes() == (Path(again.out_dir) / name).read_bytes(), name
    other = make_demo(tmp_path / "other", seed=4, **SMALL)
    shard = "train-000000.tar"
    assert (Path(other.out_dir) / shard).read_bytes() != (Path(demo.out_dir) / shard).read_bytes()


def test_layout_manifest_and_tokenizer(demo):
    assert len(expand_shards(demo.train_shards)) == 3 and len(expand_shards(demo.eval_shards)) == 1
    manifest = json.loads((Path(demo.out_dir) / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 120 and manifest["counts"]["eval"] == 40
    assert manifest["params"]["seed"] == 3
    assert "tokenizer.model" in (Path(demo.out_dir) / "README").read_text()
    names, mtimes, uids, unames, _ = zip(*_members(f"{demo.out_dir}/train-000000.tar"), strict=True)
    assert set(mtimes) == {0} and set(uids) == {0} and set(unames) == {"modalmoe"}
    assert names[:3] == ("train-000000.json", "train-000000.png", "train-000000.txt")
    tok = Tokenizer(demo.tokenizer)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size <= 64
    for caption in iter_captions(demo.train_shards, limit=20):
        assert tok.decode(tok.encode(caption)) == caption
        assert tok.unk_id not in tok.encode(caption)


def test_eval_is_disjoint_and_holds_out_combos(demo):
    train = list(iter_captions(demo.train_shards))
    evals = list(iter_captions(demo.eval_shards))
    assert len(train) == 120 and len(evals) == 40
    combos = [f"{c} {s}" for c, s in HELDOUT_COMBOS]
    assert not any(combo in caption for caption in train for combo in combos)
    assert any(combo in caption for caption in evals for combo in combos)
    train_png = {m[4] for m in _members(f"{demo.out_dir}/train-000000.tar") if m[0].endswith(".png")}
    eval_png = {m[4] for m in _members(f"{demo.out_dir}/eval-000000.tar") if m[0].endswith(".png")}
    assert not train_png & eval_png


def test_captions_match_geometry_and_pixels():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        image = np.asarray(render_scene(scene, 32))
        assert image.shape == (32, 32, 3)
        assert (image.max(axis=2) > scene.background + 40).any(), "an object must be visible"
        if scene.relation is None:
            assert scene.caption.count(" a ") == 0
            continue
        a, b = scene.objects
        assert scene.caption == f"a {a.size} {a.colour} {a.shape} {scene.relation} a {b.size} {b.colour} {b.shape}"
        holds = {"above": a.cy < b.cy, "below": a.cy > b.cy, "left of": a.cx < b.cx, "right of": a.cx > b.cx}
        assert holds[scene.relation], scene


def test_reuse_skips_rebuild(demo):
    shard = Path(demo.out_dir) / "train-000000.tar"
    before = shard.stat().st_mtime_ns
    again = make_demo(demo.out_dir, seed=3, **SMALL)
    assert again.train_shards == demo.train_shards
    assert shard.stat().st_mtime_ns == before


def test_demo_paths(demo, tmp_path):
    paths = demo_paths(demo.out_dir)
    assert paths == {"train": demo.train_shards, "eval": demo.eval_shards, "tokenizer": demo.tokenizer}
    assert demo_paths(tmp_path) is None


def test_default_build_is_quick_and_fits_the_default_config(tmp_path):
    start = time.perf_counter()
    data = make_demo(tmp_path)
    assert time.perf_counter() - start < 30
    assert data.manifest["counts"]["train"] == 4000 and data.manifest["counts"]["eval"] == 500
    assert len(expand_shards(data.train_shards)) == 16
    tok, cfg = Tokenizer(data.tokenizer), DataConfig()
    longest = max(len(tok.encode(c)) for c in iter_captions(data.train_shards + data.eval_shards))
    assert longest + 2 <= cfg.max_text_len  # bos + caption + eos is never truncated
