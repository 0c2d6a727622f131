"""The corpus at scale: a start that reads only indexes, checksums checked by `data verify`,
epoch plans built vectorised and cached once per node."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from janus_pretrain.data.batching import TokenBudget, fill_batches, token_budget_plan
from janus_pretrain.data.loader import BatchLoader
from janus_pretrain.data.plan import PlanCache
from janus_pretrain.data.shards import ShardedCorpus, token_dtype, verify_corpus, write_shard
from janus_pretrain.errors import JanusError

REPO = Path(__file__).resolve().parents[1]


def write_corpus(directory: Path, shards: list[list[np.ndarray]], vocab: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    entries = [write_shard(directory / f"shard_{i:05d}", docs, token_dtype(vocab))
               for i, docs in enumerate(shards)]
    meta = {"shards": entries, "documents": sum(e["documents"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries), "vocab_size": vocab}
    (directory / "meta.json").write_text(json.dumps(meta))


def _rchar() -> int:
    """Bytes this process has read through read(2) and friends."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_start_reads_indexes_only_and_verify_finds_a_changed_byte(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 1000, size=1000) for _ in range(2000)]  # 4 MB of uint16 payload
    write_corpus(tmp_path / "c", [docs[:1000], docs[1000:]], 1000)
    before = _rchar()
    corpus = ShardedCorpus(tmp_path / "c")
    read = _rchar() - before
    assert read < 64 * 1024, f"opening read {read} bytes (payload {corpus.num_tokens * 2})"
    assert corpus[1500].tolist() == docs[1500].tolist()
    verify_corpus(tmp_path / "c")

    # An id changed to another id in the vocabulary: sizes, offsets and ranges all still agree.
    payload = tmp_path / "c" / "shard_00001.bin"
    data = bytearray(payload.read_bytes())
    data[1234 * 2:1234 * 2 + 2] = np.uint16(docs[1001][234] % 999 + 1).tobytes()
    payload.write_bytes(bytes(data))
    ShardedCorpus(tmp_path / "c")  # training's start does not read the payload
    proc = subprocess.run([sys.executable, "-m", "janus_pretrain", "data", "verify",
                           str(tmp_path / "c")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and str(payload) in proc.stderr and "sha256" in proc.stderr


def test_verify_refuses_a_corpus_without_checksums(tmp_path):
    write_corpus(tmp_path, [[np.arange(5, 9)]], 100)
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["shards"][0]["sha256"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(JanusError, match="no checksums"):
        verify_corpus(tmp_path)


def _greedy(order, src, tgt, max_tokens):
    """The per-example loop the vectorised fill replaced: the reference it must equal."""
    batches, start, longest = [], 0, 0
    for pos, i in enumerate(order.tolist()):
        cost = max(longest, int(src[i]), int(tgt[i]))
        if (pos + 1 - start) * cost > max_tokens and pos > start:
            batches.append(order[start:pos].tolist())
            start, cost = pos, max(int(src[i]), int(tgt[i]))
        longest = cost
    return batches + ([order[start:].tolist()] if len(order) > start else [])


def test_vectorised_fill_equals_the_greedy_loop():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n, longest = int(rng.integers(0, 200)), int(rng.integers(3, 40))
        src = rng.integers(1, longest, n)
        tgt = rng.integers(1, longest, n) if trial % 2 else src  # pairs / pretraining
        max_tokens = int(rng.integers(longest, 200))
        order = rng.permutation(n)
        order = order[np.lexsort((src[order], tgt[order]))]
        offsets = fill_batches(order, src, tgt, max_tokens)
        got = [order[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        assert got == _greedy(order, src, tgt, max_tokens), trial


def test_pretraining_plan_sorts_once_and_equals_the_pairs_plan():
    """One length array passed twice takes the one-sort path; a copy takes the general one."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        lengths = rng.integers(0, 40, int(rng.integers(0, 300)))
        budget = TokenBudget(int(rng.integers(42, 200)), int(rng.integers(8, 40)),
                             int(rng.integers(8, 40)))
        fast, general = (token_budget_plan(lengths, t, budget, 1, trial, 2)
                         for t in (lengths, lengths.copy()))
        assert [b.tolist() for b in fast] == [b.tolist() for b in general], trial


def collate(examples, rng):
    return [int(t[0]) for _, t in examples]


@pytest.mark.parametrize("budget", [None, TokenBudget(64, 16, 16)])
def test_plan_built_once_and_mapped_by_the_other_ranks(tmp_path, budget):
    """Ranks of a node (processes sharing the cache directory) in turn."""
    rng = np.random.default_rng(2)
    docs = [np.concatenate([[i], rng.integers(5, 90, size=int(rng.integers(0, 20)))])
            for i in range(300)]
    write_corpus(tmp_path / "c", [docs], 1000)
    corpus = ShardedCorpus(tmp_path / "c")

    def loader(rank, cache, seed=3):
        return BatchLoader(corpus, collate, 4, seed, dp_rank=rank, dp_size=2, budget=budget,
                           plans=cache)

    builder, follower = PlanCache(tmp_path / "plans"), PlanCache(tmp_path / "plans")
    first, second = loader(0, builder), loader(1, follower)
    uncached = [loader(r, None) for r in range(2)]
    n = first.batches_per_epoch + 2  # into epoch 1
    assert [next(first) for _ in range(n)] == [next(uncached[0]) for _ in range(n)]
    assert [next(second) for _ in range(n)] == [next(uncached[1]) for _ in range(n)]
    assert builder.built == 2 and follower.built == 0  # epochs 0 and 1, built once
    assert isinstance(second._plan(1).order, np.memmap)
    plans = lambda: [d for d in (tmp_path / "plans").iterdir() if d.is_dir()]  # noqa: E731
    assert len(plans()) == 2
    [next(first) for _ in range(first.batches_per_epoch)]  # into epoch 2: epoch 0's plan goes
    assert sorted(json.loads((d / "key.json").read_text())["epoch"] for d in plans()) == [1, 2]
    # Another seed is another plan, built by whoever asks first.
    other = loader(1, follower, seed=4)
    assert follower.built == 1 and next(other) != next(loader(1, None))


# --- prepare at scale ---------------------------------------------------------------------------

def _documents(directory: Path) -> list[list[int]]:
    corpus = ShardedCorpus(directory)
    return [corpus[i].tolist() for i in range(len(corpus))]


def test_partitioned_prepare_and_merge_equal_one_prepare(tmp_path, corpus_file, tokenizer_path):
    from janus_pretrain.data.prepare import merge, prepare

    kw = dict(num_workers=2, shard_bytes=500_000)
    whole = prepare([str(corpus_file)], str(tokenizer_path), tmp_path / "whole", **kw)
    assert prepare([str(corpus_file)], str(tokenizer_path), tmp_path / "parts",
                   partition=(1, 2), **kw) is None
    assert not (tmp_path / "parts" / "meta.json").exists()
    with pytest.raises(JanusError, match="not prepared yet"):
        merge(tmp_path / "parts")
    parts = prepare([str(corpus_file)], str(tokenizer_path), tmp_path / "parts",
                    partition=(0, 2), **kw)  # the last partition to finish merges
    assert len(parts["shards"]) == 4 > len(whole["shards"]) == 3  # a task for each of 2 x 2 workers
    for key in ("documents", "tokens", "skipped", "tokenizer_identity"):
        assert parts[key] == whole[key]
    assert _documents(tmp_path / "parts") == _documents(tmp_path / "whole")
    assert merge(tmp_path / "parts") == parts
    # Partitions on node-local disks: prepared apart, moved together by merge.
    for i in range(2):
        prepare([str(corpus_file)], str(tokenizer_path), tmp_path / f"node{i}",
                partition=(i, 2), **kw)
    apart = merge(tmp_path / "gathered", [tmp_path / "node0", tmp_path / "node1"])
    assert apart == parts and _documents(tmp_path / "gathered") == _documents(tmp_path / "whole")
    verify_corpus(tmp_path / "parts")
    # Besides the tokenizer, the output holds the shards and small state: no scratch copy.
    payload = sum(p.stat().st_size for p in (tmp_path / "parts").glob("shard_*"))
    everything = sum(p.stat().st_size for p in (tmp_path / "parts").rglob("*")
                     if p.is_file() and p.name != "tokenizer.model")
    assert everything < 1.05 * payload

    # jsonl records read like text lines.
    lines = corpus_file.read_text(encoding="utf-8").splitlines()[:300]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in lines), encoding="utf-8")
    prepare([str(jsonl)], str(tokenizer_path), tmp_path / "json", num_workers=1, field="body")
    assert _documents(tmp_path / "json") == _documents(tmp_path / "whole")[:300]


def test_killed_prepare_resumes_keeping_finished_shards(tmp_path, corpus_file, tokenizer_path,
                                                        shards_dir):
    import signal
    from janus_pretrain.data.prepare import STATE, prepare

    big = tmp_path / "big.txt"
    big.write_bytes(corpus_file.read_bytes() * 5)  # 7 MB: 7 shards of 1 MB
    out = tmp_path / "out"
    command = [sys.executable, "-m", "janus_pretrain", "data", "prepare", "--input", str(big),
               "--tokenizer", str(tokenizer_path), "--output", str(out), "--workers", "1",
               "--shard-mb", "1"]
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list((out / STATE).glob("shard_*.json"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "prepare ended before it could be killed"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.bin")}
    assert 2 <= len(finished) < 7 and not (out / "meta.json").exists()
    meta = prepare([str(big)], str(tokenizer_path), out, num_workers=1, shard_bytes=2**20)
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # kept, not redone
    assert not list(out.rglob("*.tmp"))
    one = json.loads((shards_dir / "meta.json").read_text())
    assert (meta["documents"], meta["tokens"]) == (5 * one["documents"], 5 * one["tokens"])
    corpus, first = ShardedCorpus(out), ShardedCorpus(shards_dir)
    for i in (0, len(first) - 1, len(corpus) - 1):
        assert corpus[i].tolist() == first[i % len(first)].tolist()
    verify_corpus(out)


# --- blends -------------------------------------------------------------------------------------

def _marked_corpus(directory: Path, marker: int, n: int) -> Path:
    rng = np.random.default_rng(marker)
    write_corpus(directory, [[np.concatenate([[marker, i], rng.integers(5, 90, size=int(
        rng.integers(0, 12)))]) for i in range(n)]], 1000)
    return directory


def test_blend_by_weight_gives_the_weights_and_resumes_exactly(tmp_path):
    from janus_pretrain.data.blend import open_blend, parse_blend
    from janus_pretrain.data.corpora import open_train

    small = _marked_corpus(tmp_path / "small", 500, 30)  # weight 0.8: repeated in an epoch
    large = _marked_corpus(tmp_path / "large", 600, 70)  # weight 0.2: taken in part
    megatron = f"0.8 {small} 0.2 {large}"
    listed = [{"path": str(small), "weight": 4}, {"path": str(large), "weight": 1}]
    assert parse_blend(megatron) == parse_blend(listed) == [(str(small), 0.8), (str(large), 0.2)]
    blend = open_blend(megatron, ShardedCorpus)
    assert blend.counts.tolist() == [80, 20]

    def loader(budget=None):
        return BatchLoader(blend, collate, 5, seed=7, dp_rank=1, dp_size=2, budget=budget)

    run = loader()
    steps = 4 * run.batches_per_epoch  # four blend epochs
    markers = [ex for _ in range(steps) for ex in next(run)]
    assert abs(markers.count(500) / len(markers) - 0.8) < 0.01
    mix = blend.mixture(run.epoch, run.consumed())
    assert abs(mix["data/small/share"] - 0.8) < 0.01 and abs(mix["data/large/epochs"] - 80 / 70) < 0.02
    # The large corpus is walked on from epoch to epoch: its 70 documents in order, round robin.
    epochs = [blend.documents(1, e).tolist() for e in range(4)]
    assert [d for e in epochs for d in e] == [i % 70 for i in range(80)]
    assert blend.for_epoch(3)[99].tolist()[:2] == [600, 79 % 70]

    for budget in (None, TokenBudget(64, 16, 16)):
        original = loader(budget)
        [next(original) for _ in range(7)]
        resumed = loader(budget)
        resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
        n = 2 * original.batches_per_epoch
        assert [next(resumed) for _ in range(n)] == [next(original) for _ in range(n)]

    # Every corpus of a blend must have been made with the run's tokenizer: one line if not.
    meta = json.loads((large / "meta.json").read_text())
    (large / "meta.json").write_text(json.dumps({**meta, "tokenizer_identity": "another"}))
    with pytest.raises(JanusError, match=f"{large} was tokenized with") as info:
        open_train(listed, type("T", (), {"vocab_size": 1000, "identity": "ours", "path": "t"})())
    assert "\n" not in str(info.value)
    with pytest.raises(JanusError, match="data.train"):
        parse_blend("0.8 a b")


# --- document boundaries in packed blocks -------------------------------------------------------

@pytest.mark.parametrize("sampler", ["exact", "authors"])
def test_two_document_blocks_keep_the_boundary_and_noise_stays_inside_each(tmp_path, sampler):
    from janus_pretrain.config import ObjectiveConfig
    from janus_pretrain.data.packing import PackedCorpus
    from janus_pretrain.objectives.noise import pretraining_noise
    from janus_pretrain.tokenizer import EOS, MASK

    first, second, third = list(range(10, 30)), list(range(40, 52)), list(range(60, 70))
    write_corpus(tmp_path / "c", [[np.array(first), np.array(second)], [np.array(third)]], 1000)
    packed = PackedCorpus(ShardedCorpus(tmp_path / "c"), 34)
    blocks = [packed[k].tolist() for k in range(len(packed))]
    assert blocks == [first + [EOS] + second + [EOS], third + [EOS]]

    cfg = ObjectiveConfig(masking="denoise", mask_sampler=sampler, source_mask_ratio=0.6)
    block = np.array(blocks[0])
    for seed in range(40):
        source, mask = pretraining_noise(np.random.default_rng(seed), block, cfg, MASK)
        assert len(mask) == len(block) and not mask[block == EOS].any()
        pieces = np.split(source, np.flatnonzero(source == EOS))
        assert len(pieces) == 3 and pieces[2].tolist() == [EOS]  # both separators, in place
        for doc, piece in zip((first, second), (pieces[0], pieces[1][1:])):
            kept = piece[piece != MASK].tolist()
            assert set(kept) <= set(doc) and kept == sorted(kept)  # this document's ids only
        assert mask[:20].any() and mask[21:33].any()  # each document has its own spans


def _race(directory, log, ready):
    from janus_pretrain.data.plan import EpochPlan

    def build():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough for the others to find no plan and queue on the lock
        return EpochPlan(np.arange(10), np.array([0, 4, 10]))

    ready.wait()
    plan = PlanCache(directory).get({"epoch": 0}, build)
    assert [b.tolist() for b in plan] == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]


def test_processes_racing_for_a_plan_build_it_once(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    procs = [ctx.Process(target=_race, args=(tmp_path / "plans", tmp_path / "log", ready))
             for _ in range(3)]
    for proc in procs:
        proc.start()
    ready.set()
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    assert len((tmp_path / "log").read_text().split()) == 1
