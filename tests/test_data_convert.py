"""Folder + captions file -> shards, read back through the pipeline."""

import json

import numpy as np
import pytest
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.data import (
    DataConfig,
    build_loader,
    convert_folder,
    expand_shards,
    iter_captions,
    train_tokenizer,
)
from PIL import Image


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(7):
        name = f"sub/img.{i}.jpg" if i % 2 else f"pic_{i}.png"
        size = (40 + i, 30) if i % 3 else (24, 24)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(images / name)
        rows.append((name, f"picture number {i}, with a comma"))
    return images, rows


def _csv(path, rows, header="file,caption"):
    lines = [header] + [f'{f},"{c}"' for f, c in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_round_trip(folder, tmp_path, kind):
    images, rows = folder
    if kind == "csv":
        captions = _csv(tmp_path / "captions.csv", rows)
    else:
        captions = tmp_path / "captions.jsonl"
        captions.write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))
    shards = convert_folder(images, captions, str(tmp_path / "out" / "part-%04d.tar"), samples_per_shard=3)
    assert shards == [str(tmp_path / "out" / f"part-{i:04d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "out" / "part-{0000..0002}.tar")) == shards
    assert list(iter_captions(shards)) == [c for _, c in rows]
    tok = train_tokenizer(shards, tmp_path / "tok", 40)
    cfg = DataConfig(
        train_shards=shards,
        eval_shards=shards,
        tokenizer=tok.path,
        image_size=16,
        patch_size=4,
        batch_size=4,
        epoch_samples=4,
        num_workers=0,
        max_text_len=64,
    )
    batches = list(build_loader(cfg, split="eval", dp_rank=0, dp_size=1, tokenizer=tok))
    assert [k for b in batches for k in b.keys] == [f"{i:09d}" for i in range(7)]
    assert batches[0].patches.shape == (4, 16, 48)
    assert [tok.decode(t) for b in batches for t in b.text.tolist()] == [c for _, c in rows]
    assert all(not b.bad_counts for b in batches)


def test_missing_column_and_files(folder, tmp_path):
    images, rows = folder
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['caption'\]; found \['file', 'text'\]"):
        convert_folder(images, _csv(tmp_path / "a.csv", rows, header="file,text"), str(tmp_path / "o-%03d.tar"))
    with pytest.raises(ConfigError, match="1 image.*not in.*gone.png"):
        convert_folder(images, _csv(tmp_path / "b.csv", rows + [("gone.png", "x")]), str(tmp_path / "o-%03d.tar"))
    bad_json = tmp_path / "c.jsonl"
    bad_json.write_text(json.dumps({"file": rows[0][0]}) + "\n")
    with pytest.raises(ConfigError, match=r"c.jsonl:1: missing key\(s\) \['caption'\]"):
        convert_folder(images, bad_json, str(tmp_path / "o-%03d.tar"))
    with pytest.raises(ConfigError, match="%d-style"):
        convert_folder(images, _csv(tmp_path / "d.csv", rows), str(tmp_path / "out.tar"))
    assert not list(tmp_path.glob("o-*.tar"))
