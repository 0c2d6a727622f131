"""Token shards, the prepared corpus, and the deterministic, resumable batch loader."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from janus_pretrain.config import DataConfig, ObjectiveConfig
from janus_pretrain.data.batching import TokenBudget
from janus_pretrain.data.loader import BatchLoader, build_loader
from janus_pretrain.data.packing import PackedCorpus
from janus_pretrain.data.shards import Shard, ShardedCorpus, token_dtype, write_shard
from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import EOS, PAD, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def collate(examples, rng):
    return {"ids": [tuple(int(x) for x in t) for _, t in examples], "noise": int(rng.integers(1 << 30))}


def _random_docs(rng, n, vocab, max_len=50):
    docs = [rng.integers(0, vocab, size=int(rng.integers(1, max_len))).tolist() for _ in range(n)]
    docs.insert(n // 2, [])  # an empty document in the middle
    docs.append([])  # and one at the end
    return docs


def _write_corpus(directory: Path, shards: list[list[list[int]]], vocab: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    entries = [write_shard(directory / f"shard_{i:05d}", docs, token_dtype(vocab))
               for i, docs in enumerate(shards)]
    meta = {"shards": entries, "documents": sum(map(len, shards)),
            "tokens": sum(len(d) for s in shards for d in s), "vocab_size": vocab}
    (directory / "meta.json").write_text(json.dumps(meta))


# --- shards -----------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [1000, 70000])
def test_shard_round_trip(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = _random_docs(rng, 40, vocab)
    dtype = token_dtype(vocab)
    assert dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    entry = write_shard(tmp_path / "s", docs, dtype)
    n_tokens = sum(map(len, docs))
    assert entry == {"name": "s", "documents": len(docs), "tokens": n_tokens,
                     "max_id": max(max(d) for d in docs if d),
                     "sha256": {k: hashlib.sha256((tmp_path / f"s.{k}").read_bytes()).hexdigest()
                                for k in ("bin", "idx")}}
    assert (tmp_path / "s.bin").stat().st_size == n_tokens * np.dtype(dtype).itemsize
    shard = Shard(tmp_path / "s")
    assert shard.dtype == dtype
    assert len(shard) == len(docs)
    for i, doc in enumerate(docs):
        got = shard[i]
        assert got.dtype == np.int64
        assert got.tolist() == doc


def test_sharded_corpus_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    parts = [_random_docs(rng, 7, 500), [], _random_docs(rng, 3, 500), [[]], _random_docs(rng, 5, 500)]
    _write_corpus(tmp_path / "c", parts, 500)
    corpus = ShardedCorpus(tmp_path / "c")
    flat = [d for p in parts for d in p]
    assert len(corpus) == len(flat)
    assert corpus.vocab_size == 500
    assert [corpus[i].tolist() for i in range(len(corpus))] == flat
    with pytest.raises(IndexError):
        corpus[len(flat)]


def test_prepared_shards_match_tokenizer(corpus_file, tokenizer_path, shards_dir):
    tok = load_tokenizer(tokenizer_path)
    lines = [l for l in corpus_file.read_text(encoding="utf-8").split("\n") if l.strip()]
    expected = tok.encode([l.strip() for l in lines])
    corpus = ShardedCorpus(shards_dir)
    meta = json.loads((shards_dir / "meta.json").read_text())
    assert len(corpus.shards) == len(meta["shards"]) == 2
    assert all(len(s) > 0 for s in corpus.shards)
    assert len(corpus) == len(expected) == meta["documents"] == 3000
    assert meta["tokens"] == sum(map(len, expected))
    assert corpus.vocab_size == tok.vocab_size
    for i, ids in enumerate(expected):
        assert corpus[i].tolist() == ids, f"document {i} differs"
    # The tokenizer travels with the shards.
    assert (shards_dir / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()


# --- memory -----------------------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_corpus_is_memory_mapped(shards_dir):
    corpus = ShardedCorpus(shards_dir)
    for shard in corpus.shards:
        assert isinstance(shard.tokens, np.memmap)
        assert isinstance(shard.offsets, np.memmap)


def test_opening_big_shard_does_not_load_it(tmp_path):
    n_tokens, doc_len, chunk = 60_000_000, 1000, 6_000_000
    rng = np.random.default_rng(2)

    def docs():
        for _ in range(n_tokens // chunk):
            block = rng.integers(5, 60000, size=chunk, dtype=np.uint16)
            for start in range(0, chunk, doc_len):
                yield block[start:start + doc_len]

    out = tmp_path / "big"
    out.mkdir()
    try:
        _check_big_shard(out, docs(), n_tokens, doc_len)
    finally:  # do not leave 120 MB behind in pytest's kept temp dirs
        shutil.rmtree(out)


def _check_big_shard(out, docs, n_tokens, doc_len):
    entry = write_shard(out / "shard_00000", docs, np.uint16)
    assert entry["tokens"] == n_tokens and entry["documents"] == n_tokens // doc_len
    (out / "meta.json").write_text(json.dumps({"shards": [entry], "vocab_size": 60000}))
    size = (out / "shard_00000.bin").stat().st_size
    assert size == 2 * n_tokens
    gc.collect()

    before = _rss()
    corpus = ShardedCorpus(out)
    picks = np.random.default_rng(3).choice(len(corpus), size=50, replace=False)
    total = 0
    for i in picks:
        doc = corpus[int(i)]
        assert len(doc) == doc_len and doc.min() >= 5
        total += int(doc.sum())
    growth = _rss() - before
    assert total > 0
    assert growth < 30 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB shard"


# --- loader -----------------------------------------------------------------------------------

class Indexed:
    """A corpus whose documents start with their own index, so batches reveal which docs they hold."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return np.concatenate([[i], self.base[i]])


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_deterministic(shards_dir):
    corpus = ShardedCorpus(shards_dir)
    a = BatchLoader(corpus, collate, micro_batch_size=4, seed=11, dp_rank=1, dp_size=2)
    b = BatchLoader(corpus, collate, micro_batch_size=4, seed=11, dp_rank=1, dp_size=2)
    first = _take(a, 5)
    assert first == _take(b, 5)
    assert all(len(batch["ids"]) == 4 for batch in first)
    # Not the same batch over and over.
    assert len({batch["ids"][0] for batch in first}) == 5
    assert len({batch["noise"] for batch in first}) == 5

    other_seed = BatchLoader(corpus, collate, micro_batch_size=4, seed=12, dp_rank=1, dp_size=2)
    different = _take(other_seed, 5)
    assert [x["ids"] for x in different] != [x["ids"] for x in first]
    assert [x["noise"] for x in different] != [x["noise"] for x in first]


@pytest.mark.parametrize("dp_size", [2, 3])
def test_loader_ranks_partition_epoch(shards_dir, dp_size):
    corpus = Indexed(ShardedCorpus(shards_dir))
    micro = 16
    loaders = [BatchLoader(corpus, collate, micro, seed=5, dp_rank=r, dp_size=dp_size)
               for r in range(dp_size)]
    per_epoch = loaders[0].batches_per_epoch
    assert per_epoch == len(corpus) // (micro * dp_size)
    seen = []
    noises = set()
    for loader in loaders:
        ids = []
        for batch in _take(loader, per_epoch):
            ids += [doc[0] for doc in batch["ids"]]
            noises.add(batch["noise"])
        seen.append(ids)
    for r, ids in enumerate(seen):
        assert len(ids) == len(set(ids)) == micro * per_epoch, f"rank {r} repeats a document"
    union = set().union(*map(set, seen))
    assert len(union) == micro * dp_size * per_epoch
    assert all(0 <= i < len(corpus) for i in union)
    # Each global micro-batch has its own noise stream.
    assert len(noises) == dp_size * per_epoch
    # The first batch after the epoch differs from the first of the epoch (new permutation).
    fresh = BatchLoader(corpus, collate, micro, seed=5, dp_rank=0, dp_size=dp_size)
    assert next(loaders[0]) != next(fresh)
    assert loaders[0].epoch == 1 and loaders[0].position == micro * dp_size


def _small_corpus(n=26):
    rng = np.random.default_rng(4)
    return [np.concatenate([[i], rng.integers(5, 100, size=int(rng.integers(1, 8)))]) for i in range(n)]


@pytest.mark.parametrize("dp_rank,dp_size", [(0, 1), (1, 2)])
@pytest.mark.parametrize("k", [0, 2, 5, 6, 7])
def test_loader_resume(k, dp_rank, dp_size):
    corpus = _small_corpus()
    micro = 4 if dp_size == 1 else 2
    make = lambda: BatchLoader(corpus, collate, micro, seed=9, dp_rank=dp_rank, dp_size=dp_size)  # noqa: E731
    original = make()
    assert original.batches_per_epoch == 6
    _take(original, k)
    state = original.state_dict()
    state = json.loads(json.dumps(state))  # survives a checkpoint's serialisation
    resumed = make()
    resumed.load_state_dict(state)
    # 14 more batches cross at least two epoch boundaries.
    cont = _take(original, 14)
    assert _take(resumed, 14) == cont
    assert resumed.state_dict() == original.state_dict()
    assert original.epoch == (k + 14 - 1) // 6
    # A loader that did not resume gives different batches at this point (unless k == 0).
    if k:
        assert _take(make(), 14) != cont


def test_loader_epochs_cover_everything_and_reshuffle():
    corpus = _small_corpus(24)
    loader = BatchLoader(corpus, collate, 4, seed=3)
    epochs = []
    for _ in range(3):
        epochs.append([doc[0] for b in _take(loader, 6) for doc in b["ids"]])
    for order in epochs:
        assert sorted(order) == list(range(24))
    assert epochs[0] != epochs[1] != epochs[2]


def test_loader_errors():
    corpus = _small_corpus(10)
    with pytest.raises(JanusError, match="fewer than one optimizer step"):
        BatchLoader(corpus, collate, 6, seed=0, dp_rank=0, dp_size=2)
    loader = BatchLoader(corpus, collate, 2, seed=1)
    with pytest.raises(JanusError, match="data.seed"):
        loader.load_state_dict({"epoch": 0, "index": 1, "seed": 2})


# --- token-budget batches, packing, prefetch --------------------------------------------------

def _pairs(n=60, seed=7):
    """n (source, target) pairs; id 100 + i opens both rows of pair i; lengths 1..29, some above
    the max lengths used below, so truncation matters to the budget."""
    rng = np.random.default_rng(seed)
    def make(i):
        return np.concatenate([[100 + i], rng.integers(10, 90, size=int(rng.integers(0, 29)))])

    targets = [make(i) for i in range(n)]
    sources = [make(i) for i in range(n)]
    return sources, targets


def _budget_loaders(dp_size, budget, seed=3):
    from janus_pretrain.objectives.janus import JanusObjective

    objective = JanusObjective(ObjectiveConfig(masking="span"), budget.max_source_len,
                               budget.max_target_len, 64)
    sources, targets = _pairs()
    return [BatchLoader(targets, objective.collate, None, seed, dp_rank=r, dp_size=dp_size,
                        sources=sources, budget=budget) for r in range(dp_size)]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_token_batches_cover_epoch_within_budget(dp_size):
    budget = TokenBudget(max_tokens=47, max_source_len=16, max_target_len=16)
    loaders = _budget_loaders(dp_size, budget)
    steps = loaders[0].batches_per_epoch
    assert all(loader.batches_per_epoch == steps for loader in loaders)
    seen = []
    for _ in range(steps):
        step = [next(loader) for loader in loaders]
        for batch in step:
            # Padded cells of the collated tensors, [BOS]/[EOS] and truncation included.
            assert batch["src"].numel() <= 47 and batch["tgt"].numel() <= 47
            assert batch["src"].shape[1] <= 16 and batch["tgt"].shape[1] <= 16
            assert torch.equal(batch["src"][:, 1], batch["tgt"][:, 1])  # pairs stay together
            seen += (batch["tgt"][:, 1] - 100).tolist()
        # The ranks of a step hold neighbouring length buckets: similar cost.
        lens = [(b["tgt"] != PAD).sum(1) for b in step]
        for lo, hi in zip(lens, lens[1:]):
            assert lo.max() <= hi.min()
    assert sorted(seen) == list(range(60)), "each example exactly once per epoch"
    # The epoch's steps are not in length order, and the next epoch has other batches.
    longest = [int((next(loaders[0])["tgt"] != PAD).sum(1).max()) for _ in range(steps)]
    assert longest != sorted(longest)
    assert loaders[0].epoch == 1
    first = [b.tolist() for b in loaders[0]._plan(0)]
    assert first != [b.tolist() for b in loaders[0]._plan(1)]


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("k", [0, 3, 9])
def test_token_batches_resume(k, dp_size):
    budget = TokenBudget(max_tokens=48, max_source_len=24, max_target_len=24)
    original = _budget_loaders(dp_size, budget)
    for loader in original:
        _take(loader, k)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in original]
    assert all(set(s) == {"epoch", "consumed", "seed", "max_tokens", "group"} for s in states)
    resumed = _budget_loaders(dp_size, budget)
    for loader, state in zip(resumed, states):
        loader.load_state_dict(state)
    n = 2 * original[0].batches_per_epoch + 1  # crosses two epoch boundaries
    for a, b in zip(original, resumed):
        assert all(_same(x, y) for x, y in zip(_take(a, n), _take(b, n)))
        assert a.state_dict() == b.state_dict() and a.epoch >= 2


def test_token_budget_errors():
    with pytest.raises(JanusError, match="data.max_tokens=12 is below one example of 16"):
        _budget_loaders(1, TokenBudget(max_tokens=12, max_source_len=8, max_target_len=16))
    with pytest.raises(JanusError, match="data.max_tokens"):
        DataConfig(train="t", tokenizer="k", max_target_len=64, max_tokens=32)
    with pytest.raises(JanusError, match="data.pack_documents"):
        DataConfig(train="t", tokenizer="k", source="s", pack_documents=True)


def test_packing_puts_every_token_in_one_block(tmp_path):
    rng = np.random.default_rng(2)
    parts = [_random_docs(rng, 9, 500, max_len=12), [], _random_docs(rng, 4, 500, max_len=12)]
    _write_corpus(tmp_path / "c", parts, 500)
    corpus = ShardedCorpus(tmp_path / "c")
    stream = [t for part in parts for doc in part for t in doc + [EOS]]  # a separator after each
    packed = PackedCorpus(corpus, 7)
    blocks = [packed[k].tolist() for k in range(len(packed))]
    assert [t for block in blocks for t in block] == stream
    assert all(len(b) == 7 for b in blocks[:-1]) and 1 <= len(blocks[-1]) <= 7
    assert packed.lengths().tolist() == [len(b) for b in blocks]
    assert corpus.lengths().tolist() == [len(d) for part in parts for d in part]
    with pytest.raises(IndexError):
        packed[len(packed)]
    # The loader a pretraining config builds trains on blocks of max_target_len - 2 ids.
    data = DataConfig(train="t", tokenizer="k", max_source_len=9, max_target_len=9,
                      micro_batch_size=2, pack_documents=True, prefetch=0)
    loader = build_loader(data, corpus, collate, dp_rank=0, dp_size=1)
    rows = [row for batch in _take(loader, loader.batches_per_epoch) for row in batch["ids"]]
    assert len(set(rows)) == len(rows) == len(blocks) // 2 * 2
    assert set(rows) <= {tuple(b) for b in blocks}


def test_packed_blocks_in_token_budget_batches(tmp_path):
    """Pretraining with both: denoised sources stay within the budget, every block once."""
    from janus_pretrain.objectives.janus import JanusObjective

    rng = np.random.default_rng(5)
    docs = [rng.integers(5, 500, size=int(rng.integers(0, 15))).tolist() for _ in range(12)]
    _write_corpus(tmp_path / "c", [docs], 500)
    data = DataConfig(train="t", tokenizer="k", max_source_len=9, max_target_len=9,
                      max_tokens=20, pack_documents=True, prefetch=2)
    objective = JanusObjective(ObjectiveConfig(masking="denoise"), 9, 9, 16)
    loader = build_loader(data, ShardedCorpus(tmp_path / "c"), objective.collate, 0, 1)
    try:
        rows = []
        for batch in _take(loader, loader.batches_per_epoch):
            assert batch["src"].numel() <= 20 and batch["tgt"].numel() <= 20
            rows += [tuple(t for t in r[1:] if t != PAD)[:-1] for r in batch["tgt"].tolist()]
    finally:
        loader.close()
    stream = [t for d in docs for t in d + [EOS]]
    assert sorted(rows) == sorted(tuple(stream[k:k + 7]) for k in range(0, len(stream), 7))


@pytest.mark.parametrize("budget", [None, TokenBudget(40, 24, 24)])
def test_prefetch_gives_synchronous_batches_across_resume(budget):
    corpus = _small_corpus(40)
    make = lambda prefetch: BatchLoader(corpus, collate, 4, seed=5, budget=budget,  # noqa: E731
                                        prefetch=prefetch, workers=2 if prefetch else 0)
    sync, ahead, resumed = make(0), make(2), make(2)
    try:
        n = sync.batches_per_epoch + 3
        assert _take(ahead, 3) == _take(sync, 3)
        time.sleep(0.05)  # let the workers fill their queues: the state is what the caller took
        assert ahead.state_dict() == sync.state_dict() == {
            "epoch": 0, "consumed": 3 * (4 if budget is None else 1), "seed": 5,
            "max_tokens": budget and budget.max_tokens, "group": 1}
        resumed.load_state_dict(json.loads(json.dumps(ahead.state_dict())))
        expected = _take(sync, n)
        assert _take(resumed, n) == expected and _take(ahead, n) == expected
        # Loading a state into a running loader drops what it had prefetched.
        ahead.load_state_dict({**sync.state_dict(), "epoch": 0, "consumed": sync.unit})
        assert next(ahead) == make(0).batch_at(0, 1)
    finally:
        ahead.close()
        resumed.close()
    assert not multiprocessing.active_children()


def test_prefetch_raises_collate_errors_in_order():
    def failing(examples, rng):
        if any(int(doc[0]) == 7 for _, doc in examples):
            raise JanusError("bad document 7")
        return collate(examples, rng)

    corpus = _small_corpus(12)
    sync = BatchLoader(corpus, failing, 1, seed=0)
    ahead = BatchLoader(corpus, failing, 1, seed=0, prefetch=3, workers=2)
    expected = []
    with pytest.raises(JanusError, match="bad document 7"):
        while True:
            expected.append(next(sync))
    try:
        assert _take(ahead, len(expected)) == expected
        with pytest.raises(JanusError, match="bad document 7"):
            next(ahead)
    finally:
        ahead.close()


_LEFT_OPEN = """
import sys
import numpy as np
from janus_pretrain.data.loader import BatchLoader

loader = BatchLoader([np.arange(1, 6)] * 40, lambda ex, rng: {"n": len(ex)}, 4, seed=0,
                     prefetch=2, workers=2)
next(loader)
sys.held = loader  # never closed, as by a traceback that holds the training frame
print("exiting", flush=True)
"""


def test_a_loader_left_open_does_not_hold_the_exit():
    """Its workers ignore SIGTERM (the trainer checkpoints first): multiprocessing's exit hook,
    which terminates and then joins them, waited forever and a test session never ended."""
    out = subprocess.run([sys.executable, "-c", _LEFT_OPEN], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout == "exiting\n", out.stderr


# --- corrupt input ----------------------------------------------------------------------------

def test_index_disagrees_with_data(tmp_path):
    docs = [[5, 6, 7], [8, 9], [10]]
    _write_corpus(tmp_path / "c", [docs], 100)
    bin_path = tmp_path / "c" / "shard_00000.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])  # drop the last token
    with pytest.raises(JanusError) as info:
        ShardedCorpus(tmp_path / "c")
    msg = str(info.value)
    assert "\n" not in msg
    assert "shard_00000.idx" in msg and str(tmp_path) in msg
    assert "disagree" in msg


def test_truncated_index(tmp_path):
    write_shard(tmp_path / "s", [[5, 6, 7], [8, 9]], np.uint16)
    idx = tmp_path / "s.idx"
    idx.write_bytes(idx.read_bytes()[:-3])
    with pytest.raises(JanusError) as info:
        Shard(tmp_path / "s")
    assert str(idx) in str(info.value) and "\n" not in str(info.value)


def test_not_an_index(tmp_path):
    write_shard(tmp_path / "s", [[5, 6, 7]], np.uint16)
    (tmp_path / "s.idx").write_bytes(b"NOTJANUS" + bytes(40))
    with pytest.raises(JanusError, match="not a janus-pretrain shard index"):
        Shard(tmp_path / "s")


def test_missing_files(tmp_path):
    with pytest.raises(JanusError, match="meta.json") as info:
        ShardedCorpus(tmp_path)
    assert str(tmp_path / "meta.json") in str(info.value)
    _write_corpus(tmp_path / "c", [[[5, 6]]], 100)
    (tmp_path / "c" / "shard_00000.bin").unlink()
    with pytest.raises(JanusError, match="shard_00000.bin"):
        ShardedCorpus(tmp_path / "c")


def test_invalid_meta(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(JanusError, match="meta.json"):
        ShardedCorpus(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(JanusError, match="meta.json"):
        ShardedCorpus(tmp_path)


# --- CLI --------------------------------------------------------------------------------------

def test_prepare_cli_missing_input(tmp_path, tokenizer_path):
    missing = tmp_path / "missing.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "janus_pretrain", "data", "prepare", "--input", str(missing),
         "--tokenizer", str(tokenizer_path), "--output", str(tmp_path / "out"), "--workers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert str(missing) in lines[0]
    assert "Traceback" not in proc.stderr
