"""The corpus path at scale: prepare's speed per core beside sentencepiece's own encode, its peak
scratch, and what a training start reads, takes and holds against the corpus's size.

    python -m janus_pretrain.bench data --text enwiki/train.txt [--tokenizer tok.model]
        [--prepare-mb 8] [--docs 1e5,1e6,1e7] [--train-start] [--workdir DIR]

1. prepare: the first --prepare-mb MB of the text through `data prepare --workers 1`, end to end
   (read, decode, filter, encode, write .bin/.idx, checksums, meta.json) and, alternating with it
   in the same process, sentencepiece's own one-thread batch encode of the same lines (already
   split and stripped): MB of text per second each and their ratio (the tokenizer bounds a core).
   A thread samples the output directory's size every 10 ms: peak bytes on disk / final output.
2. start vs corpus size: corpora of --docs documents made by repeating the prepared enwiki
   documents (their real lengths and ids), in shards of 1e6 documents; for each, a fresh process
   opens it (data.train), builds the epoch plan (fixed batches, then data.max_tokens) as the
   first rank of a node does, maps it as the others then do, and collates the first batch (JANUS
   denoising): seconds per phase, bytes read (rchar: payload reads would show here; mapped pages
   read later do not), and the peak RSS over what the process held before opening the corpus
   (torch and the rest imported).
3. with --train-start: `janus-pretrain train` (tiny model, one step, data.max_tokens) on the
   smallest and the largest corpus: wall time to the end of the first step, side by side.

Numbers are of this machine at the time (shared or not: say which when quoting them).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SHARD_DOCS = 1_000_000


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:  # renamed or removed while we walked
                pass
    return total


class PeakSize:
    """Samples a directory's size on a thread; `peak` is the largest seen."""

    def __init__(self, path: Path, interval: float = 0.01):
        self.path, self.interval, self.peak = path, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _dir_bytes(self.path))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _dir_bytes(self.path))


def bench_prepare(text: Path, tokenizer: str, work: Path, rounds: int = 2) -> dict:
    """Section 1; returns the figures, and leaves the prepared corpus at work/enwiki."""
    import sentencepiece as spm

    from janus_pretrain.data.prepare import prepare

    raw = text.read_bytes()
    mb = len(raw) / 1e6
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    encode, whole, peak, out = [], [], 0, work / "enwiki"
    for _ in range(rounds):
        lines = [t.strip() for t in raw.decode("utf-8", errors="replace").split("\n") if t.strip()]
        start = time.perf_counter()
        sp.encode(lines, num_threads=1)
        encode.append(time.perf_counter() - start)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        with PeakSize(out) as size:
            start = time.perf_counter()
            prepare([str(text)], tokenizer, out, num_workers=1)
            whole.append(time.perf_counter() - start)
        peak = max(peak, size.peak)
    final = _dir_bytes(out)
    return {"text_mb": mb, "encode_mb_s": mb / min(encode), "prepare_mb_s": mb / min(whole),
            "ratio": min(whole) / min(encode), "peak_bytes": peak, "output_bytes": final,
            "shard_bytes": sum(p.stat().st_size for p in out.glob("shard_*"))}


def synthetic_corpus(base: Path, out: Path, documents: int) -> Path:
    """`documents` documents repeating the prepared corpus at `base`, in shards of SHARD_DOCS."""
    from janus_pretrain.data.shards import ShardedCorpus, ShardWriter

    if (out / "meta.json").is_file():
        return out
    corpus = ShardedCorpus(base)
    lengths = corpus.lengths()
    ids = corpus.token_slice(0, corpus.num_tokens).astype(corpus.shards[0].dtype)
    ends = np.concatenate([[0], np.cumsum(lengths)])
    out.mkdir(parents=True, exist_ok=True)
    entries, written = [], 0
    while written < documents:
        writer = ShardWriter(out / f"shard_{len(entries):05d}", ids.dtype)
        stop = min(documents, written + SHARD_DOCS)
        while written < stop:
            first = written % len(lengths)
            take = min(stop - written, len(lengths) - first)
            writer.add(ids[ends[first]:ends[first + take]], lengths[first:first + take])
            written += take
        entries.append(writer.close())
    meta = {**corpus.meta, "shards": entries, "documents": written,
            "tokens": sum(e["tokens"] for e in entries), "skipped": {}, "inputs": [str(base)]}
    shutil.copy(base / "tokenizer.model", out / "tokenizer.model")
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def probe_start(corpus_dir: str, max_tokens: int) -> dict:
    """Section 2, in a fresh process: a rank's data start on `corpus_dir`."""
    from janus_pretrain.config import DataConfig, ObjectiveConfig
    from janus_pretrain.data.corpora import open_train
    from janus_pretrain.data.loader import build_loader
    from janus_pretrain.objectives.janus import JanusObjective
    from janus_pretrain.tokenizer import load_tokenizer

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    tok = load_tokenizer(corpus_dir)
    objective = JanusObjective(ObjectiveConfig(masking="denoise"), 512, 512, 512)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    result, read0 = {"rss_before_bytes": before}, rchar()
    start = time.perf_counter()
    corpus = open_train(corpus_dir, tok)
    result["open_s"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as plans:
        for name, budget in (("fixed", None), ("max_tokens", max_tokens)):
            data = DataConfig(train=corpus_dir, tokenizer=corpus_dir, micro_batch_size=8,
                              max_tokens=budget, prefetch=0)
            start, cpu = time.perf_counter(), time.process_time()
            loader = build_loader(data, corpus, objective.collate, 0, 8, plan_dir=Path(plans))
            result[f"{name}_plan_build_s"] = time.perf_counter() - start
            result[f"{name}_plan_build_cpu_s"] = time.process_time() - cpu
            start = time.perf_counter()
            next(loader)
            result[f"{name}_first_batch_s"] = time.perf_counter() - start
            start = time.perf_counter()  # another rank of the node: maps the plan
            follower = build_loader(data, corpus, objective.collate, 1, 8, plan_dir=Path(plans))
            next(follower)
            result[f"{name}_plan_map_s"] = time.perf_counter() - start
            assert follower.plan_cache.built == 0
    result["read_bytes"] = rchar() - read0
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def train_start(corpus_dir: Path, run: Path, max_tokens: int) -> float:
    """Section 3: wall seconds of `janus-pretrain train` for one step (start, step, save)."""
    shutil.rmtree(run, ignore_errors=True)
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "janus_pretrain.cli", "train", "--config",
           str(repo / "configs" / "pretrain" / "demo.yaml"), "model=tiny",
           f"data.train={corpus_dir}", f"data.tokenizer={corpus_dir}", "data.max_source_len=128",
           "data.max_target_len=128", f"data.max_tokens={max_tokens}", "train.steps=1",
           "train.log_interval=1", "train.save_interval=1000", f"train.output_dir={run}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench data",
                                description=__doc__.splitlines()[0])
    p.add_argument("--text", help="one document a line (the enwiki training text)")
    p.add_argument("--tokenizer", help="a sentencepiece .model (default: train one of --vocab on "
                                       "the first 2 MB)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--prepare-mb", type=float, default=8.0)
    p.add_argument("--docs", default="1e5,1e6,1e7", help="synthetic corpus sizes, comma-separated")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--train-start", action="store_true", help="also time a one-step training run")
    p.add_argument("--workdir", help="keep the corpora here (default: a temporary directory)")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # section 2's child process
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe_start(args.probe, args.max_tokens)))
        return
    if not args.text:
        p.error("--text is required")

    from janus_pretrain.tokenizer import train_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        text = work / "text.txt"
        with open(args.text, "rb") as f:
            head = f.read(int(args.prepare_mb * 1e6))
        text.write_bytes(head[:head.rfind(b"\n") + 1])
        tokenizer = args.tokenizer
        if tokenizer is None:
            sample = work / "sample.txt"
            sample.write_bytes(head[:2_000_000])
            tokenizer = str(train_tokenizer([sample], work / "tok.model", args.vocab).path)
        print(f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (a shared "
              f"machine shows it here)")
        r = bench_prepare(text, tokenizer, work)
        print(f"\n1. prepare {r['text_mb']:.1f} MB of text, one worker: {r['prepare_mb_s']:.2f} MB/s "
              f"end to end; sentencepiece's own one-thread encode of the same lines "
              f"{r['encode_mb_s']:.2f} MB/s: prepare takes {r['ratio']:.2f}x its time")
        print(f"   disk: peak {r['peak_bytes'] / 1e6:.2f} MB while writing, output "
              f"{r['output_bytes'] / 1e6:.2f} MB (shards {r['shard_bytes'] / 1e6:.2f} MB): peak / "
              f"output {r['peak_bytes'] / r['output_bytes']:.3f}x, {r['peak_bytes'] / 1e6 / r['text_mb']:.2f}x "
              f"the text")
        sizes = [int(float(x)) for x in args.docs.split(",")]
        print(f"\n2. a rank's data start (fresh process, 8 DP ranks, micro-batch 8 or max_tokens "
              f"{args.max_tokens}):")
        print(f"{'documents':>11}{'tokens':>14}{'payload MB':>12}{'open s':>8}{'plan s':>8}"
              f"{'budget plan s (CPU)':>20}{'map s':>7}{'1st batch s':>12}{'read KB':>9}{'RSS +MB':>9}")
        corpora = {}
        for n in sizes:
            corpora[n] = synthetic_corpus(work / "enwiki", work / f"docs_{n}", n)
            meta = json.loads((corpora[n] / "meta.json").read_text())
            out = subprocess.run([sys.executable, "-m", "janus_pretrain.bench", "data", "--probe",
                                  str(corpora[n]), "--max-tokens", str(args.max_tokens)],
                                 capture_output=True, text=True, env={**os.environ,
                                                                      "OMP_NUM_THREADS": "1"})
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            s = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>11.0e}{meta['tokens']:>14,}{meta['tokens'] * 2 / 1e6:>12.0f}"
                  f"{s['open_s']:>8.3f}{s['fixed_plan_build_s']:>8.3f}"
                  f"{s['max_tokens_plan_build_s']:>12.3f} ({s['max_tokens_plan_build_cpu_s']:.3f})"
                  f"{s['max_tokens_plan_map_s']:>7.3f}"
                  f"{s['max_tokens_first_batch_s']:>12.3f}{s['read_bytes'] / 1e3:>9.0f}"
                  f"{(s['peak_rss_bytes'] - s['rss_before_bytes']) / 1e6:>9.0f}")
        if args.train_start:
            small, large = min(sizes), max(sizes)
            times = {n: train_start(corpora[n], work / f"run_{n}", args.max_tokens)
                     for n in (small, large)}
            print(f"\n3. janus-pretrain train, one step (tiny model, max_tokens): {small:.0e} "
                  f"documents {times[small]:.1f} s, {large:.0e} documents {times[large]:.1f} s: "
                  f"{times[large] / times[small]:.2f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
