"""Metrics against known values, and our ROUGE against the published ROUGE-1.5.5 scores of the
five XSum systems (full 11,334-summary test set, ~25 s on one core)."""
from __future__ import annotations

import re

import pytest

from finetune import metrics
from conftest import SHARED_DATA

XSUM_OUTPUTS = SHARED_DATA / "glge" / "xsum_small" / "test_system_outputs"


def test_sacrebleu_known_values():
    # sacreBLEU's README example (48.53 with its two reference sets); with the first set only,
    # the sacrebleu CLI gives 45.07.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
    assert metrics.bleu(hyps, refs) == pytest.approx(45.0675, abs=0.01)
    assert metrics.bleu(hyps, hyps) == pytest.approx(100.0)
    assert metrics.bleu(["a b c d"], ["e f g h"]) == 0.0


def test_rouge_known_values():
    # "the cat was found under the bed" vs "the cat was under the bed": 6 of 7 / 6 unigrams.
    r = metrics.rouge(["the cat was found under the bed"], ["the cat was under the bed"])
    assert r["rouge1"] == pytest.approx(100 * 2 * (6 / 7) * 1 / (6 / 7 + 1), abs=1e-6)
    assert r["rouge2"] == pytest.approx(100 * 2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5), abs=1e-6)
    assert r["rougeL"] == pytest.approx(r["rouge1"], abs=1e-6)
    # stemming: "running" ~ "runs"
    assert metrics.rouge(["he runs"], ["he running"])["rouge1"] == pytest.approx(100.0)


def test_small_metrics():
    assert metrics.distinct(["a a a", "a b"], 1) == pytest.approx(100 * 2 / 5)
    assert metrics.distinct(["a a a", "a b"], 2) == pytest.approx(100 * 2 / 3)
    assert metrics.coqa_f1(["The red car", "yes"], ["a red car", "no"]) == pytest.approx(50.0)
    scores = metrics.score(("bleu1", "rougeL", "f1"), ["the red car"], ["a red car"])
    assert list(scores) == ["bleu1", "rougeL", "f1"]


def test_meteor_offline_or_marked_unavailable():
    value = metrics.score(("meteor",), ["he drove the auto"], ["he drove the car"])["meteor"]
    if value is None:
        assert metrics.unavailable({"meteor": None})
        pytest.skip("no offline WordNet here: METEOR is reported unavailable")
    exact = metrics.meteor(["he drove the banana"], ["he drove the car"])
    # "auto" is a WordNet synonym of "car" (nltk looks synonyms up after Porter stemming,
    # so the pair must survive stemming: "automobile" would not)
    assert value > exact


def _published(path) -> tuple[float, float, float]:
    m = re.search(r"f-score >> ROUGE\(1/2/3/L/SU4\): ([\d.]+)/([\d.]+)/[\d.]+/([\d.]+)",
                  path.read_text())
    return tuple(float(x) for x in m.groups())


def test_rouge_matches_published_xsum_systems():
    gold = (XSUM_OUTPUTS / "gold-test-sentences.txt").read_text(encoding="utf-8").splitlines()
    systems = sorted(XSUM_OUTPUTS.glob("*-test-output.txt"))
    assert len(systems) == 5 and len(gold) == 11334
    for path in systems:
        hyps = path.read_text(encoding="utf-8").splitlines()
        ours = metrics.rouge(hyps, gold)
        published = _published(path.with_suffix(".rouge"))
        for name, want in zip(("rouge1", "rouge2", "rougeL"), published):
            assert abs(ours[name] - want) < 1.0, (path.name, name, ours[name], want)


def test_wordnet_cache_copies_the_dictionary_files_only(tmp_path, monkeypatch):
    import gzip

    from finetune import wordnet

    source = tmp_path / "wordnet"
    source.mkdir()
    for name in wordnet.NEEDED:
        (source / name).write_text(name)
    (source / "wnres").mkdir()  # Debian's `wordnet` package puts a directory beside the files
    man = tmp_path / "lexnames.5WN.gz"
    with gzip.open(man, "wt") as f:
        f.write("00\tadj.all\tall adjective clusters\n03\tnoun.Tops\tunique beginners\n")
    monkeypatch.setenv("JANUS_WORDNET", str(source))
    monkeypatch.setattr(wordnet, "DEBIAN_LEXNAMES_MAN", man)
    monkeypatch.setattr(wordnet, "CACHE", tmp_path / "cache")
    got = wordnet._dict_dir()
    assert got == tmp_path / "cache"
    assert sorted(p.name for p in got.iterdir()) == sorted([*wordnet.NEEDED, "lexnames"])
    assert (got / "lexnames").read_text() == "00\tadj.all\t3\n03\tnoun.Tops\t1\n"
