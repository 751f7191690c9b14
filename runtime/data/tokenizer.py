"""Caption tokenizer: a sentencepiece model with fixed special ids, trained from the shards' captions.

The special ids are pinned (pad=0, unk=1, bos=2, eos=3) so that the model, the collator and the
loss can share them as constants no matter which tokenizer file a run uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from webdataset import tariterators

from ..config import ConfigError, check
from .shards import closing_streams, expand_shards

__all__ = [
    "PAD_ID",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
    "Tokenizer",
    "train_tokenizer",
    "check_vocab_size",
    "iter_captions",
]

log = logging.getLogger("modalmoe.data")

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """Thin sentencepiece wrapper; pickles as the model bytes so dataloader workers can rebuild it."""

    def __init__(self, model: str | Path | bytes):
        if isinstance(model, bytes):
            self.path = ""
            proto = model
        else:
            self.path = str(model)
            if not Path(self.path).is_file():
                raise ConfigError(
                    f"tokenizer file {self.path!r} does not exist; train one with train_tokenizer "
                    "(make_demo writes tokenizer.model next to the demo shards)"
                )
            proto = Path(self.path).read_bytes()
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as exn:
            raise ConfigError(f"tokenizer {self.path or '<bytes>'!r} is not a sentencepiece model: {exn}") from exn
        for name in ("pad", "bos", "eos"):
            if getattr(self._sp, f"{name}_id")() < 0:
                raise ConfigError(
                    f"tokenizer {self.path or '<bytes>'!r} has no {name} id; retrain it with train_tokenizer, "
                    f"which pins pad={PAD_ID}, unk={UNK_ID}, bos={BOS_ID}, eos={EOS_ID}"
                )

    def __getstate__(self) -> dict:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load(state["proto"])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; pad/bos/eos are control pieces and decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def check_vocab_size(tokenizer: Tokenizer, model_vocab_size: int, field: str = "model.vocab_size") -> None:
    """A tokenizer id past the model's embedding table would index out of range on the first batch."""
    check(
        tokenizer.vocab_size <= model_vocab_size,
        field,
        f"the tokenizer {tokenizer.path or ''!r} has vocab_size {tokenizer.vocab_size} but the model's vocab_size "
        f"is {model_vocab_size}; set {field} >= {tokenizer.vocab_size} or train a smaller tokenizer",
    )


def _skip_shard(exn: Exception) -> bool:
    log.warning("tokenizer training: skipping unreadable shard data: %r", exn)
    return True


def iter_captions(shard_urls: str | Sequence[str], limit: int | None = None) -> Iterator[str]:
    """Captions (``.txt`` members) of the shards in order; unreadable shards and bad text are skipped."""
    urls = expand_shards(shard_urls)
    sources = ({"url": u} for u in urls)
    files = tariterators.tar_file_expander(
        closing_streams(tariterators.url_opener(sources, handler=_skip_shard)),
        handler=_skip_shard,
        select_files=lambda name: name.lower().endswith(".txt"),
    )
    n = 0
    for member in files:
        if not member:
            continue
        try:
            text = member["data"].decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
        if text:
            yield text
            n += 1
            if limit is not None and n >= limit:
                return


def train_tokenizer(
    shard_urls: str | Sequence[str],
    out_prefix: str | Path,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    max_sentences: int = 1_000_000,
    character_coverage: float = 1.0,
) -> Tokenizer:
    """Train a sentencepiece model on the shards' captions; writes ``out_prefix.model``/``.vocab``.

    ``hard_vocab_limit`` is off, so a tiny caption language yields a smaller vocab than asked for
    instead of an error; read the final size from ``Tokenizer.vocab_size``.
    """
    check(vocab_size > 4, "vocab_size", f"must be > 4 (pad, unk, bos, eos are reserved), got {vocab_size}")
    captions = list(iter_captions(shard_urls, limit=max_sentences))
    check(
        bool(captions),
        "shard_urls",
        f"no caption (.txt member) found in {shard_urls!r}; is this a webdataset shard set?",
    )
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions),
            model_prefix=str(out_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exn:
        raise ConfigError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model: {exn}") from exn
    tok = Tokenizer(f"{out_prefix}.model")
    log.info("trained tokenizer %s on %d captions: vocab_size %d", tok.path, len(captions), tok.vocab_size)
    return tok
