"""Tokenizers with the special tokens JANUS needs at fixed ids: SentencePiece, or a Hugging Face
`tokenizers` tokenizer (tokenizer.json, or BART's vocab.json + merges.txt).

[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, [MASK]=4. Fixed ids keep checkpoints, shards and the model's
padding convention in agreement whatever corpus the tokenizer was trained on. A Hugging Face
tokenizer keeps its own ids for its own files; ours renumber them so that its <pad>, <unk>, <s>,
</s>, <mask> take ids 0-4 (HFTokenizer; checkpoint/hf.py permutes embedding rows alike).
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Iterable, Sequence, Union

import numpy as np
import sentencepiece as spm
import tokenizers

from janus_pretrain.errors import JanusError

PAD, UNK, BOS, EOS, MASK = 0, 1, 2, 3, 4
# The tokens a Hugging Face tokenizer may give each special role, in JANUS id order.
HF_ROLES = (("<pad>", "[PAD]"), ("<unk>", "[UNK]"), ("<s>", "[BOS]"), ("</s>", "[EOS]"),
            ("<mask>", "[MASK]"))


@dataclass(frozen=True)
class SentencePieceTokenizer:
    """A loaded SentencePiece model; `path` is the .model file it came from."""

    path: Path
    sp: spm.SentencePieceProcessor
    filename: ClassVar[str] = "tokenizer.model"  # its name beside checkpoints and shards

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

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` as one array per text, on this thread only (`data prepare`: one process
        per core, and no Python list of ints per id)."""
        return self.sp.encode(list(texts), num_threads=1, return_type="numpy")

    def model_bytes(self) -> bytes:
        """The serialized model: what checkpoints and consolidated files store."""
        return self.sp.serialized_model_proto()

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in ids if i > MASK]
        return self.sp.decode(ids)


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer whose ids are renumbered for JANUS: its special
    tokens (HF_ROLES) first, at [PAD] [UNK] [BOS] [EOS] [MASK], then every other token in its own
    order. `hf_ids[i]` is the Hugging Face id of our id i."""

    path: Path
    hf: tokenizers.Tokenizer
    hf_ids: np.ndarray
    filename: ClassVar[str] = "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        return len(self.hf_ids)

    @cached_property
    def our_ids(self) -> np.ndarray:
        """The inverse of hf_ids: our id of each Hugging Face id."""
        return np.argsort(self.hf_ids)

    @cached_property
    def identity(self) -> str:
        """sha256 over the tokenizer's definition (its JSON with sorted keys)."""
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> our token ids without BOS/EOS (the objectives add them)."""
        encoded = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [self.our_ids[e.ids].tolist() for e in encoded]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` as one array per text (threads: RAYON_NUM_THREADS, which `data prepare`'s
        workers set to 1)."""
        encoded = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [self.our_ids[e.ids] for e in encoded]

    def model_bytes(self) -> bytes:
        return self.hf.to_str().encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in ids if i > MASK]
        return self.hf.decode(self.hf_ids[ids].tolist(), skip_special_tokens=True)


Tokenizer = Union[SentencePieceTokenizer, HFTokenizer]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece .model, a tokenizer.json, or a directory holding one of them (first
    tokenizer.json, then BART's vocab.json + merges.txt, then tokenizer.model)."""
    path = Path(path)
    if path.is_dir():
        for name in (HFTokenizer.filename, SentencePieceTokenizer.filename):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return _hf_checked(path, _byte_level_bpe(path / "vocab.json", path / "merges.txt"))
        raise JanusError(f"tokenizer: no {HFTokenizer.filename}, vocab.json + merges.txt or "
                         f"{SentencePieceTokenizer.filename} in {path}")
    if not path.is_file():
        raise JanusError(f"tokenizer: file not found: {path} (train one with "
                         f"`janus-pretrain tokenizer train`)")
    if path.suffix == ".json":
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
            raise JanusError(f"tokenizer: {path} is not a Hugging Face tokenizer.json "
                             f"({str(e).splitlines()[0][:200]})") from None
        return _hf_checked(path, hf)
    return _checked(path, model_file=str(path))


def tokenizer_from_bytes(data: bytes, origin: str | Path) -> Tokenizer:
    """A tokenizer stored inside another file (a consolidated model); `origin` names it."""
    if data.lstrip().startswith(b"{"):
        return _hf_checked(Path(origin), tokenizers.Tokenizer.from_str(data.decode("utf-8")))
    return _checked(Path(origin), model_proto=data)


def _byte_level_bpe(vocab: Path, merges: Path) -> tokenizers.Tokenizer:
    """BART's (GPT-2's) byte-level BPE from its two files, as transformers' BartTokenizerFast
    builds it (its post-processor aside: our encode adds no specials)."""
    bpe = tokenizers.models.BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="",
                                          end_of_word_suffix="", fuse_unk=False)
    hf = tokenizers.Tokenizer(bpe)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens([name for names in HF_ROLES for name in names
                           if hf.token_to_id(name) is not None])
    return hf


def _hf_checked(path: Path, hf: tokenizers.Tokenizer) -> HFTokenizer:
    size = hf.get_vocab_size(with_added_tokens=True)
    if sorted(hf.get_vocab(with_added_tokens=True).values()) != list(range(size)):
        raise JanusError(f"tokenizer: {path}: its ids are not 0..{size - 1} without gaps")
    specials = []
    for names in HF_ROLES:
        found = [hf.token_to_id(n) for n in names if hf.token_to_id(n) is not None]
        if not found:
            raise JanusError(f"tokenizer: {path} has none of the special tokens "
                             f"{' / '.join(names)} (JANUS needs <pad> <unk> <s> </s> <mask>)")
        specials.append(found[0])
    rest = np.setdiff1d(np.arange(size), specials)  # sorted: the other tokens keep their order
    return HFTokenizer(path=path, hf=hf, hf_ids=np.concatenate([specials, rest]).astype(np.int64))


def _checked(path: Path, **source) -> SentencePieceTokenizer:
    try:
        sp = spm.SentencePieceProcessor(**source)
    except (RuntimeError, OSError) as e:
        raise JanusError(f"tokenizer: {path} is not a sentencepiece model "
                         f"({str(e).splitlines()[0]})") from None
    pieces = [sp.id_to_piece(i) for i in range(MASK + 1)]
    if pieces != ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]:
        raise JanusError(f"tokenizer: {path} lacks the JANUS special tokens at ids 0-4 "
                         f"(found {pieces}); train it with `janus-pretrain tokenizer train`")
    return SentencePieceTokenizer(path=path, sp=sp)


# Longer lines are skipped by sentencepiece's trainer.
MAX_SENTENCE_BYTES = 16384


def has_trainable_line(path: str | Path) -> bool:
    """Whether the file has a non-blank line sentencepiece trains on (stops at the first)."""
    with open(path, "rb") as f:
        return any(line.strip() and len(line.rstrip(b"\r\n")) <= MAX_SENTENCE_BYTES for line in f)


def train_tokenizer(inputs: Sequence[str | Path], output: str | Path, vocab_size: int,
                    model_type: str = "unigram", max_sentences: int = 1_000_000,
                    num_threads: int = 2) -> SentencePieceTokenizer:
    """Train on UTF-8 text files (one sentence/paragraph a line); writes `<output>` (.model)."""
    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise JanusError(f"tokenizer: input file not found: {missing[0]}")
    if model_type not in ("unigram", "bpe"):
        raise JanusError(f"tokenizer: model type '{model_type}' is not one of unigram, bpe")
    if not any(has_trainable_line(p) for p in inputs):
        raise JanusError(f"tokenizer: {', '.join(map(str, inputs))}: no line to train on (every "
                         f"line is empty or longer than {MAX_SENTENCE_BYTES} bytes, which "
                         f"sentencepiece skips); give text with one sentence or paragraph a line")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            input=[str(p) for p in inputs], model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=num_threads,
            max_sentence_length=MAX_SENTENCE_BYTES,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_piece="[PAD]", unk_piece="[UNK]",
            bos_piece="[BOS]", eos_piece="[EOS]", user_defined_symbols=["[MASK]"],
            minloglevel=2)
    except RuntimeError as e:
        raise JanusError(f"tokenizer: training failed: {str(e).splitlines()[0]}") from None
    output.write_bytes(model.getvalue())
    return load_tokenizer(output)
