"""How long a checkpoint save stops training: synchronous against background (async) saves.

    python -m janus_pretrain.bench checkpoint --tokenizer runs/demo/tokenizer.model --model tiny

One process, a DeepSpeed engine of the run config's layout (ZeRO stage from --deepspeed-config)
after one AdamW step, so the optimizer state is there; saves through checkpoint/store.py into a
temporary directory, alternating the two kinds `--repeats` times:
    sync   the save as the loop made it before async saves: write, hash, fsync, publish; the
           step waits for all of it
    stall  async: what the step waits for, the copy to host memory (checkpoint/background.py)
    total  async: the stall plus the background write until the checkpoint is published
The medians are printed with the checkpoint's size; stall / sync is the share of a synchronous
save that training still waits for (target <= 10% at the small shape).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from janus_pretrain.checkpoint import background, store
from janus_pretrain.config import load_config
from janus_pretrain.model import JanusModel
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD, load_tokenizer
from janus_pretrain.train.engine import build_engine


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench checkpoint")
    p.add_argument("--tokenizer", required=True, help="the tokenizer a checkpoint holds")
    p.add_argument("--model", default="tiny", help="a preset under configs/model/")
    p.add_argument("--deepspeed-config", default="configs/deepspeed/zero2.json")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to save (default: a temporary directory)")
    return p.parse_args(argv)


def stepped_engine(args: argparse.Namespace, vocab_size: int):
    """An engine whose AdamW state exists: one step on a gradient of zeros."""
    cfg = load_config(None, [f"model={args.model}", "data.max_source_len=64",
                             "data.max_target_len=64", f"parallel.precision={args.precision}",
                             f"parallel.deepspeed_config={args.deepspeed_config}"])
    engine = build_engine(JanusModel(cfg.model, vocab_size, PAD), cfg)
    engine.backward(sum((p * 0).sum() for p in engine.module.parameters()))
    engine.step()
    return engine


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    state.initialize(1)
    tokenizer = load_tokenizer(args.tokenizer)
    engine = stepped_engine(args, tokenizer.vocab_size)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "checkpoints"
        writer = background.Writer(background=True)
        times: dict[str, list[float]] = {"sync": [], "stall": [], "total": []}
        for i in range(args.repeats):
            start = time.perf_counter()
            store.save(engine, root, 2 * i + 1, {}, tokenizer, keep=2)
            times["sync"].append(time.perf_counter() - start)
            start = time.perf_counter()
            store.save(engine, root, 2 * i + 2, {}, tokenizer, 2, writer, inline=False)
            times["stall"].append(time.perf_counter() - start)
            writer.wait()
            times["total"].append(time.perf_counter() - start)
        size = checkpoint_bytes(store.complete(root)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model={args.model} {args.deepspeed_config} {args.precision} device={engine.device} "
          f"checkpoint={size / 2**20:.1f} MiB repeats={args.repeats}")
    print(f"sync save {med['sync'] * 1e3:.0f} ms | async: stall {med['stall'] * 1e3:.0f} ms, "
          f"total {med['total'] * 1e3:.0f} ms | stall / sync = {med['stall'] / med['sync']:.1%} "
          f"| sync write rate {size / 2**20 / med['sync']:.0f} MiB/s")
    state.shutdown()
