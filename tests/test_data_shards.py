"""Shard url expansion (braces, lists, globs, pipe:) and DataConfig validation."""

import dataclasses

import pytest
from modalmoe.runtime.config import ConfigError, from_dict
from modalmoe.runtime.data import DataConfig, build_loader, check_shards, expand_shards, make_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), n_train=60, n_eval=30, samples_per_shard=20)


def _cfg(demo, **kw):
    base = dict(
        train_shards=demo.train_shards,
        eval_shards=demo.eval_shards,
        tokenizer=demo.tokenizer,
        batch_size=8,
        epoch_samples=16,
        num_workers=0,
        shuffle_buffer=8,
    )
    return DataConfig(**{**base, **kw})


def test_brace_list_glob_and_missing(tmp_path):
    for i in range(4):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    urls = expand_shards(str(tmp_path / "train-{000000..000003}.tar"))
    assert urls == [str(tmp_path / f"train-{i:06d}.tar") for i in range(4)]
    assert expand_shards([str(tmp_path / "train-000003.tar"), str(tmp_path / "train-{000000..000001}.tar")]) == [
        str(tmp_path / "train-000003.tar"),
        str(tmp_path / "train-000000.tar"),
        str(tmp_path / "train-000001.tar"),
    ]
    assert expand_shards(str(tmp_path / "train-*.tar")) == urls
    assert expand_shards(str(tmp_path / "train-{000002..000005}.tar")) == urls[2:]
    assert expand_shards("pipe:cat a-{0..1}.tar") == ["pipe:cat a-0.tar", "pipe:cat a-1.tar"]
    assert expand_shards(["https://host/x-{0..1}.tar"]) == ["https://host/x-0.tar", "https://host/x-1.tar"]


def test_check_shards_names_pattern(tmp_path):
    check_shards(["pipe:curl -s https://x/y.tar"], "data.train_shards")
    with pytest.raises(ConfigError) as err:
        check_shards([str(tmp_path / "train-{000000..000031}.tar")], "data.train_shards")
    msg = str(err.value)
    assert "data.train_shards" in msg and "train-{000000..000031}.tar" in msg and "fix the path" in msg


def test_brace_and_pipe_urls_load_the_same_samples(demo):
    files = expand_shards(demo.eval_shards)
    assert len(files) == 2
    plain = build_loader(_cfg(demo), split="eval", dp_rank=0, dp_size=1, tokenizer=demo.tokenizer)
    piped = build_loader(
        _cfg(demo, eval_shards=[f"pipe:cat {f}" for f in files]),
        split="eval",
        dp_rank=0,
        dp_size=1,
        tokenizer=demo.tokenizer,
    )
    a, b = list(plain), list(piped)
    assert [k for x in a for k in x.keys] == [k for x in b for k in x.keys]
    assert sum(x.size for x in a) == 30
    assert all((x.patches == y.patches).all() for x, y in zip(a, b, strict=True))


def test_valid_config_passes_and_loads_from_dict(demo):
    _cfg(demo).validate()
    cfg = from_dict(DataConfig, {"train_shards": demo.train_shards, "image_size": 64, "patch_size": 16})
    assert cfg.num_patches == 16 and cfg.patch_dim == 768 and cfg.seq_len == 16 + 24
    assert DataConfig().num_patches == 16 and DataConfig().max_text_len == 24


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(image_size=0), "data.image_size"),
        (dict(patch_size=-8), "data.patch_size"),
        (dict(image_size=30, patch_size=8), "data.image_size"),
        (dict(batch_size=0), "data.batch_size"),
        (dict(max_text_len=2), "data.max_text_len"),
        (dict(num_workers=-1), "data.num_workers"),
        (dict(epoch_samples=4), "data.epoch_samples"),
        (dict(max_bad_fraction=1.5), "data.max_bad_fraction"),
        (dict(mean=[0.5, 0.5]), "data.mean"),
        (dict(std=[0.5, 0.0, 0.5]), "data.std"),
        (dict(train_shards=[]), "data.train_shards"),
        (dict(train_shards=["/nonexistent/train-{000000..000003}.tar"]), "data.train_shards"),
        (dict(eval_shards=["/nonexistent/eval-*.tar"]), "data.eval_shards"),
        (dict(tokenizer="/nonexistent/tok.model"), "data.tokenizer"),
    ],
)
def test_validation_names_the_field(demo, change, field):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(_cfg(demo), **change).validate()
    assert f"`{field}`" in str(err.value)


def test_build_loader_argument_checks(demo):
    with pytest.raises(ConfigError, match="dp_rank"):
        build_loader(_cfg(demo), split="train", dp_rank=2, dp_size=2, tokenizer=demo.tokenizer)
    with pytest.raises(ConfigError, match="split"):
        build_loader(_cfg(demo), split="test", dp_rank=0, dp_size=1, tokenizer=demo.tokenizer)
    with pytest.raises(ConfigError, match="eval_shards"):
        build_loader(_cfg(demo, eval_shards=[]), split="eval", dp_rank=0, dp_size=1, tokenizer=demo.tokenizer)
