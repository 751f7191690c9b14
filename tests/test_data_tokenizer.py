"""Sentencepiece tokenizer trained from shard captions: fixed special ids, round trip, vocab check."""

import pickle

import pytest
import webdataset as wds
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, check_vocab_size, train_tokenizer

WORDS = "a small large red green blue circle square triangle above below left right of".split()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    for s in range(2):
        with wds.TarWriter(str(root / f"cap-{s:02d}.tar"), encoder=False) as sink:
            for i in range(150):
                words = [WORDS[(i * 7 + j * 3 + s) % len(WORDS)] for j in range(3 + i % 6)]
                sink.write({"__key__": f"{s}-{i:04d}", "txt": " ".join(words).encode(), "png": b"not read"})
    (root / "broken.tar").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def tok(shards):
    return train_tokenizer([str(shards / "cap-{00..01}.tar"), str(shards / "broken.tar")], shards / "spm", 64)


def test_special_ids_and_files(tok, shards):
    assert (shards / "spm.model").is_file() and (shards / "spm.vocab").is_file()
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert 4 < tok.vocab_size <= 64


def test_round_trip_and_pickle(tok):
    text = "a large red circle above a small blue square"
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) and 4 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == text
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == ids and clone.vocab_size == tok.vocab_size
    assert Tokenizer(tok.path).encode(text) == ids


def test_vocab_mismatch_names_both_numbers(tok):
    check_vocab_size(tok, tok.vocab_size)
    with pytest.raises(ConfigError) as err:
        check_vocab_size(tok, tok.vocab_size - 1)
    assert str(tok.vocab_size) in str(err.value) and str(tok.vocab_size - 1) in str(err.value)
    assert "model.vocab_size" in str(err.value)


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    empty = tmp_path / "empty.tar"
    with wds.TarWriter(str(empty), encoder=False) as sink:
        sink.write({"__key__": "x", "png": b"no caption"})
    with pytest.raises(ConfigError, match="no caption"):
        train_tokenizer(str(empty), tmp_path / "t", 32)
