"""The sentencepiece tokenizer: round trips on real text, fixed special ids, and refusing models
that lack them."""
from __future__ import annotations

import io

import pytest
import sentencepiece as spm

from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import BOS, EOS, MASK, PAD, UNK, load_tokenizer


def _lines(corpus_file, n: int, every: int = 97) -> list[str]:
    lines = [l for l in corpus_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    picked = lines[::every][:n]
    assert len(picked) == n
    return picked


def _normal(text: str) -> str:
    # sentencepiece's normaliser collapses runs of whitespace and strips the ends (it also
    # applies NFKC, which leaves these lines unchanged).
    return " ".join(text.split())


def test_round_trip_real_lines(corpus_file, tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    texts = _lines(corpus_file, 12)
    encoded = tok.encode(texts)
    assert len(encoded) == len(texts)
    for text, ids in zip(texts, encoded):
        assert len(ids) > 0
        assert all(MASK < i < tok.vocab_size for i in ids), "real text must not produce specials/UNK"
        assert tok.decode(ids) == _normal(text)
    # Specials in the id stream are dropped by decode, the text itself survives.
    ids = [BOS, *encoded[0], EOS, PAD, PAD]
    assert tok.decode(ids) == _normal(texts[0])


def test_special_ids_and_mask_symbol(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert (PAD, UNK, BOS, EOS, MASK) == (0, 1, 2, 3, 4)
    assert [tok.sp.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]
    assert tok.vocab_size == 1000
    [ids] = tok.encode(["the city [MASK] of the river"])
    assert ids.count(MASK) == 1
    [alone] = tok.encode(["[MASK]"])
    assert MASK in alone and all(i == MASK or tok.sp.id_to_piece(i) == "\u2581" for i in alone)
    # [BOS]/[EOS]/[PAD] are control symbols: their text does not map to their ids.
    [ctl] = tok.encode(["[BOS] [EOS] [PAD]"])
    assert not {PAD, BOS, EOS} & set(ctl)


def test_missing_file_raises(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(JanusError, match="not found") as info:
        load_tokenizer(missing)
    assert str(missing) in str(info.value)


def test_model_without_specials_raises(corpus_file, tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(corpus_file), model_writer=model, vocab_size=200,
                                   input_sentence_size=300, shuffle_input_sentence=False,
                                   num_threads=1, minloglevel=2)
    path = tmp_path / "plain.model"
    path.write_bytes(model.getvalue())
    # It is a valid sentencepiece model...
    assert spm.SentencePieceProcessor(model_file=str(path)).get_piece_size() == 200
    # ...but not one of ours.
    with pytest.raises(JanusError, match="special tokens") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_not_a_model_raises(tmp_path):
    path = tmp_path / "garbage.model"
    path.write_text("this is not a sentencepiece model\n")
    with pytest.raises(JanusError) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
