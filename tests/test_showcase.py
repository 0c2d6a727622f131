"""The end of `make demo`: held-out paragraphs noised as in pretraining, reconstructed AR and NAR."""
import numpy as np

from janus_pretrain.generate.api import DecodeOptions, Generator
from janus_pretrain.showcase import paragraphs, reconstruct, shown
from janus_pretrain.tokenizer import BOS, EOS, MASK, load_tokenizer
from conftest import SHARED_DATA


def test_shown_writes_each_mask(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    a, b = tok.encode(["the first words", "and the last"])
    assert shown(tok, np.array([MASK, *a, MASK, *b])) == "<mask> the first words <mask> and the last"


def test_reconstruct_noises_then_decodes_both_modes(trained_run, single_process):
    gen = Generator.from_checkpoint(trained_run)
    texts = paragraphs(SHARED_DATA / "pretrain" / "enwiki" / "valid.txt", 3)
    rows = reconstruct(gen, texts, max_tokens=24, beam=2, iterations=2, seed=0)
    assert len(rows) == len(texts) == 3
    for row, text in zip(rows, texts):
        original, src = row["original"].tolist(), row["source"].tolist()
        assert original == gen.tokenizer.encode([text])[0][:24]
        assert src[0] == BOS and src[-1] == EOS and MASK in src
        kept = iter(original)  # the unmasked source tokens are the original's, in order
        assert all(t in kept for t in src[1:-1] if t != MASK)
        assert set(row["outputs"]) == {"AR beam 2", "NAR T=2"}
        top = 24  # outputs are cut to max_tokens, like the originals
        for name, opts in (("AR beam 2", DecodeOptions(mode="ar", beam=2, max_len=top)),
                           ("NAR T=2", DecodeOptions(mode="nar", iterations=2, max_len=top))):
            text_out, ms = row["outputs"][name]
            assert text_out == gen.tokenizer.decode(gen.decode_ids([row["source"]], opts)[0].tokens)
            assert ms > 0
