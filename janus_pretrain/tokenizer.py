"""SentencePiece tokenizer with the special tokens JANUS needs at fixed ids.

[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, [MASK]=4. Fixed ids keep checkpoints, shards and the model's
padding convention in agreement whatever corpus the tokenizer was trained on.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from janus_pretrain.errors import JanusError

PAD, UNK, BOS, EOS, MASK = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Tokenizer:
    """A loaded SentencePiece model; `path` is the .model file it came from."""

    path: Path
    sp: spm.SentencePieceProcessor

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @cached_property
    def identity(self) -> str:
        """sha256 over the ordered pieces with their scores and types: what gives each id its
        meaning. Two tokenizers of one size differ here, the same pieces in files of other bytes
        (other trainer options) do not. meta.json records it; training checks shards,
        checkpoints and init_from against it."""
        sp = self.sp
        kinds = (sp.is_control, sp.is_unknown, sp.is_unused, sp.is_byte)
        pieces = [[sp.id_to_piece(i), sp.get_score(i), [k(i) for k in kinds]]
                  for i in range(self.vocab_size)]
        return hashlib.sha256(json.dumps(pieces).encode("utf-8")).hexdigest()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> token ids without BOS/EOS (the objectives add them)."""
        return self.sp.encode(list(texts))

    def model_bytes(self) -> bytes:
        """The serialized model: what checkpoints and consolidated files store."""
        return self.sp.serialized_model_proto()

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in ids if i > MASK]
        return self.sp.decode(ids)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise JanusError(f"tokenizer: file not found: {path} (train one with "
                         f"`janus-pretrain tokenizer train`)")
    return _checked(path, model_file=str(path))


def tokenizer_from_bytes(data: bytes, origin: str | Path) -> Tokenizer:
    """A tokenizer stored inside another file (a consolidated model); `origin` names it."""
    return _checked(Path(origin), model_proto=data)


def _checked(path: Path, **source) -> Tokenizer:
    try:
        sp = spm.SentencePieceProcessor(**source)
    except (RuntimeError, OSError) as e:
        raise JanusError(f"tokenizer: {path} is not a sentencepiece model "
                         f"({str(e).splitlines()[0]})") from None
    pieces = [sp.id_to_piece(i) for i in range(MASK + 1)]
    if pieces != ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]:
        raise JanusError(f"tokenizer: {path} lacks the JANUS special tokens at ids 0-4 "
                         f"(found {pieces}); train it with `janus-pretrain tokenizer train`")
    return Tokenizer(path=path, sp=sp)


def train_tokenizer(inputs: Sequence[str | Path], output: str | Path, vocab_size: int,
                    model_type: str = "unigram", max_sentences: int = 1_000_000,
                    num_threads: int = 2) -> Tokenizer:
    """Train on UTF-8 text files (one sentence/paragraph a line); writes `<output>` (.model)."""
    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise JanusError(f"tokenizer: input file not found: {missing[0]}")
    if model_type not in ("unigram", "bpe"):
        raise JanusError(f"tokenizer: model type '{model_type}' is not one of unigram, bpe")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            input=[str(p) for p in inputs], model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=num_threads, max_sentence_length=16384,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_piece="[PAD]", unk_piece="[UNK]",
            bos_piece="[BOS]", eos_piece="[EOS]", user_defined_symbols=["[MASK]"],
            minloglevel=2)
    except RuntimeError as e:
        raise JanusError(f"tokenizer: training failed: {str(e).splitlines()[0]}") from None
    output.write_bytes(model.getvalue())
    return load_tokenizer(output)
