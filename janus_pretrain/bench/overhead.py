"""What a training step asks of the host: aten ops that launch kernels on a GPU (views and
allocations, which do not, are counted apart as `free`) and host syncs per step, split into forward / loss+backward / optimizer / loop, for the bare steps and the real loop
side by side, plus the distinct batch shapes a run's plan produces (each one a cuDNN plan and a
torch.compile graph on a GPU). Counted on any device (bench/counting.py); exact, not timed.

    python -m janus_pretrain.bench overhead [--data PAIRS --max-tokens 4096] [--width 64]
        [--precision bf16] [--steps 3] [--json out.json]

Rows (one process, TP = 1, the real depth of --model, hidden size --width):
    bare ar / bare janus   forward + loss + backward + fused AdamW on device batches, no
                           DeepSpeed (bench train's step; bf16: fp32 masters, as DeepSpeed's)
    bart                   Hugging Face BART of the same shape, AR cross entropy
    loop <obj> zero<S>     train/loop.py `optimizer_step` with the DeepSpeed engine at ZeRO stage S
                           (configs/deepspeed/zero<S>.json), the loader with prefetch, StepStats
                           and the logger, outside log steps
Host ms per step are measured too (median, no counter), so that at a negligible width the loop's
host time can be set beside the bare step's. `--data` takes pairs prepared by `janus-finetune
prepare`; without it, random pairs of varied lengths. `--shapes` (with --data) also counts the
distinct (rows, source, target, K) shapes over two epochs of the real plan, ar and janus;
`--shapes-only --pretrain CONFIG [--set key=value ...]` those of a pretraining run's plan.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from janus_pretrain.bench import train as bench_train
from janus_pretrain.bench.counting import StepCounter, clone_to_device, deepspeed_gpu_branches
from janus_pretrain.data.loader import build_loader
from janus_pretrain.model import JanusModel
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD
from janus_pretrain.train import loop as train_loop
from janus_pretrain.train.engine import build_engine
from janus_pretrain.train.metrics import RunLogger, StepStats
from janus_pretrain.train.nonfinite import NonFiniteGuard

OBJECTIVES = ("ar", "janus")


def width_overrides(width: int) -> list[str]:
    heads = max(1, width // 16)
    return [f"model.hidden_size={width}", f"model.ffn_hidden_size={4 * width}",
            f"model.num_heads={heads}", "model.dropout=0.0", "model.attention_dropout=0.0"]


def synthetic_pairs(args, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random pairs whose lengths vary as a task's do (uniform in [len/4, len])."""
    rng = np.random.default_rng(0)
    lens = lambda top: rng.integers(max(1, top // 4), top - 1, n)  # noqa: E731
    sources = [rng.integers(5, args.vocab, k) for k in lens(args.src_len)]
    targets = [rng.integers(5, args.vocab, k) for k in lens(args.tgt_len)]
    return sources, targets


def run_config(name: str, args, stage: int | None = None):
    overrides = [*width_overrides(args.width), f"parallel.precision={args.precision}",
                 "train.log_interval=1000000", "train.compile=false"]
    if stage is not None:
        overrides.append(f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json")
    return bench_train.objective_config(name, args, tuple(overrides))


def counted(step, steps: int, warmup: int = 1) -> tuple[dict, float]:
    """Counts per step over `steps` steps after `warmup` uncounted ones, then the median host ms
    of as many uncounted steps. step(counter, i) runs step i with phases set on `counter`."""
    idle = StepCounter()  # an unentered counter: phases set on it cost nothing
    for i in range(warmup):
        step(idle, i)
    counter = StepCounter()
    with counter:
        for i in range(warmup, warmup + steps):
            step(counter, i)
    times = []
    for i in range(warmup + steps, warmup + 2 * steps):
        start = time.perf_counter()
        step(idle, i)
        times.append(time.perf_counter() - start)
    return counter.totals(steps), statistics.median(times) * 1000


def bare_row(name: str, args, device: torch.device) -> tuple[dict, float]:
    cfg, objective = run_config(name, args)
    weights = bench_train.PRECISIONS[args.precision][0]
    torch.manual_seed(0)
    model = JanusModel(cfg.model, args.vocab, PAD).to(device=device, dtype=weights).train()
    opt = bench_train.optimizer_for(model, weights)
    batches = [{k: v.to(device) for k, v in b.items()} for b in host_batches(cfg, objective, args)]

    def step(counter: StepCounter, i: int) -> None:
        with counter.in_phase("forward"):
            prep = objective.prepare(batches[i % len(batches)])
            outputs = model(**prep.model_inputs)
        with counter.in_phase("backward"):
            loss, _ = objective.loss(outputs, prep)
            loss.backward()
        with counter.in_phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return counted(step, args.steps)


def bart_row(args, device: torch.device) -> tuple[dict, float]:
    cfg, objective = run_config("ar", args)
    weights = bench_train.PRECISIONS[args.precision][0]
    torch.manual_seed(0)
    model = bench_train.bart_model(cfg.model, args.vocab, max(cfg.data.max_source_len,
                                                              cfg.data.max_target_len))
    model.to(device=device, dtype=weights).train()
    opt = bench_train.optimizer_for(model, weights)
    batches = [{k: v.to(device) for k, v in b.items()} for b in host_batches(cfg, objective, args)]

    def step(counter: StepCounter, i: int) -> None:
        src, tgt = batches[i % len(batches)]["src"], batches[i % len(batches)]["tgt"]
        with counter.in_phase("forward"):
            labels = tgt[:, 1:].masked_fill(tgt[:, 1:] == PAD, -100)
            logits = model(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt[:, :-1],
                           decoder_attention_mask=tgt[:, :-1] != PAD).logits
        with counter.in_phase("backward"):
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                   label_smoothing=cfg.objective.label_smoothing)
            loss.backward()
        with counter.in_phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return counted(step, args.steps)


def loader_for(cfg, objective, args, prefetch: int):
    if args.data is not None:
        return bench_train.task_loader(cfg, objective, prefetch)
    sources, targets = synthetic_pairs(args, 64 * args.batch)
    return build_loader(dataclasses.replace(cfg.data, prefetch=prefetch), targets,
                        objective.collate, 0, 1, sources)


def host_batches(cfg, objective, args) -> list[dict]:
    loader = loader_for(cfg, objective, args, prefetch=0)
    return [next(loader) for _ in range(4)]


def loop_row(name: str, stage: int, args, device: torch.device) -> tuple[dict, float]:
    """The real loop's step (train/loop.py `optimizer_step`), outside log steps."""
    cfg, objective = run_config(name, args, stage)
    total = 1 + 2 * args.steps
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=10 * total))
    torch.manual_seed(0)
    engine = build_engine(JanusModel(cfg.model, args.vocab, PAD), cfg)
    loader = loader_for(cfg, objective, args, prefetch=cfg.data.prefetch)
    stats = StepStats(device, objective.terms)
    guard = NonFiniteGuard(engine)
    logger = RunLogger(False, Path(cfg.train.output_dir), cfg.train.steps, 0,
                       cfg.train.log_interval, 1.0, cfg.train.wandb_project, None, {})
    current: list[StepCounter] = []

    def phase(name_: str, fn):
        def wrapped(*a, **k):
            with current[0].in_phase(name_):
                return fn(*a, **k)
        return wrapped

    engine.forward = phase("forward", engine.forward)
    engine.backward = phase("backward", engine.backward)
    engine.step = phase("optimizer", engine.step)
    objective.loss = phase("backward", objective.loss)
    real_next = loader.__next__

    def next_batch():
        batch = real_next()
        current[0].mark_host(batch)
        return batch

    class Loader:  # the loop calls next(loader)
        __next__ = staticmethod(next_batch)

    train_loop_to_device = train_loop.to_device
    train_loop.to_device = clone_to_device
    engine.train()

    def step(counter: StepCounter, i: int) -> None:
        current[:] = [counter]
        counter.mark_host(guard.host_flags)
        train_loop.optimizer_step(engine, objective, Loader(), cfg, guard, stats, False, device,
                                  i + 1)
        logger.after_step(i + 1, False, stats, engine)

    try:
        with deepspeed_gpu_branches(engine):
            return counted(step, args.steps)
    finally:
        train_loop.to_device = train_loop_to_device
        loader.close()


def distinct_shapes(cfg, objective, loader, epochs: int = 2) -> dict:
    """Distinct collated shapes over `epochs` epochs of the loader's real plan, ar (rows, S, L)
    and janus (rows, S, L, K), how many first appear after the first epoch, and the padded share
    of the cells (source + target rows, and JANUS's 2K slot rows against the masked positions)."""
    seen: dict[tuple, int] = {}
    batches, real, cells, slots, used = 0, 0, 0, 0, 0
    for epoch in range(epochs):
        for index in range(loader.batches_in_epoch(epoch)):
            b = loader.batch_at(epoch, index)
            shape = (*b["src"].shape, b["tgt"].shape[1])
            if objective.needs_nar:
                shape += (b["masked_pos"].shape[1],)
                slots += b["masked_pos"].numel()
                used += int((b["masked_pos"] >= 0).sum())
            seen.setdefault(shape, epoch)
            batches += 1
            real += int((b["src"] != PAD).sum() + (b["tgt"] != PAD).sum())
            cells += b["src"].numel() + b["tgt"].numel()
    return {"batches": batches, "distinct": len(seen),
            "new_after_epoch_1": sum(1 for e in seen.values() if e > 0),
            "pad_fraction": 1 - real / cells,
            "slot_pad_fraction": 1 - used / slots if slots else None}


def _unbucketed(cfg):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, length_buckets=[]))


def task_shapes(name: str, args, bucketed: bool) -> dict:
    """`distinct_shapes` of the fine-tuning objective `name` on --data."""
    cfg, objective = run_config(name, args)
    cfg = cfg if bucketed else _unbucketed(cfg)
    return distinct_shapes(cfg, objective, loader_for(cfg, objective, args, prefetch=0))


def pretrain_shapes(args, bucketed: bool) -> dict:
    """`distinct_shapes` of the pretraining run that --pretrain (and --set) configure: its
    objective, its corpus or blend, its loader, as train() builds them."""
    from janus_pretrain.config import load_config
    from janus_pretrain.data.corpora import open_train
    from janus_pretrain.objectives.build import build_objective
    from janus_pretrain.tokenizer import load_tokenizer

    cfg = load_config(args.pretrain, args.set)
    cfg = cfg if bucketed else _unbucketed(cfg)
    objective = build_objective(cfg)
    corpus = open_train(cfg.data.train, load_tokenizer(cfg.data.tokenizer))
    loader = build_loader(dataclasses.replace(cfg.data, prefetch=0), corpus, objective.collate,
                          0, 1)
    return distinct_shapes(cfg, objective, loader)


def collation_ms(name: str, args, batches: int = 40, step_s: float = 0.02) -> dict:
    """Milliseconds per batch that the training thread spends in next(loader): collating
    itself (data.workers=0) or taking what a worker process collated (data.workers=1), with
    `step_s` of simulated step between batches, so that the worker can run ahead."""
    cfg, objective = run_config(name, args)
    out = {}
    for workers in (0, 1):
        data = dataclasses.replace(cfg.data, workers=workers, prefetch=2)
        loader = loader_for(dataclasses.replace(cfg, data=data), objective, args, prefetch=2)
        times = []
        try:
            for _ in range(batches):
                start = time.perf_counter()
                next(loader)
                times.append(time.perf_counter() - start)
                time.sleep(step_s)
        finally:
            loader.close()
        out[f"workers={workers}"] = statistics.median(times[2:]) * 1000
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench overhead",
                                description=__doc__.splitlines()[0])
    bench_train.add_shape_arguments(p, model="base")
    p.add_argument("--vocab", type=int, help="vocabulary of the random batches (default 1000)")
    p.add_argument("--width", type=int, default=64, help="hidden size (FFN 4x); depth from --model")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=3, help="counted steps per row (after 1 warm-up)")
    p.add_argument("--stages", default="0,1,2", help="ZeRO stages of the loop rows")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--no-bart", action="store_true")
    p.add_argument("--shapes", action="store_true", help="count distinct shapes (needs --data)")
    p.add_argument("--shapes-only", action="store_true",
                   help="only the shapes (with --data or --pretrain)")
    p.add_argument("--pretrain", type=Path,
                   help="with --shapes-only: also the shapes of this pretraining run config")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the --pretrain config (e.g. data.train=DIR)")
    p.add_argument("--json", type=Path)
    args = bench_train.checked_shape(p, p.parse_args(argv))
    if args.shapes and args.data is None and not (args.shapes_only and args.pretrain):
        p.error("--shapes needs --data")
    if args.pretrain is not None and not args.shapes_only:
        p.error("--pretrain goes with --shapes-only")
    if args.shapes_only:
        args.shapes = True
    args.compile = False
    return args


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    device = state.initialize(1).device
    args.overrides = bench_train.data_overrides(args)
    if args.data is None:
        args.vocab = args.vocab if args.vocab is not None and args.vocab != 32000 else 1000
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"model={args.model} width={args.width} precision={args.precision} "
          f"data={args.data or 'synthetic'} max_tokens={args.max_tokens} steps={args.steps}",
          flush=True)
    rows: dict[str, tuple[dict, float]] = {}
    objectives = args.objectives.split(",")
    for name in objectives if not args.shapes_only else ():
        rows[f"bare {name}"] = bare_row(name, args, device)
    if not args.no_bart and not args.shapes_only:
        rows["bart"] = bart_row(args, device)
    for stage in map(int, args.stages.split(",")) if not args.shapes_only else ():
        for name in objectives:
            rows[f"loop {name} zero{stage}"] = loop_row(name, stage, args, device)
    phases = ("forward", "backward", "optimizer", "loop")
    print(f"{'row':<18}{'ops':>7}{'syncs':>7}{'free':>7}  "
          + "".join(f"{p + ' ops/syncs':>22}" for p in phases) + f"{'host ms':>9}")
    for row, (t, ms) in rows.items():
        cells = "".join(f"{t['ops'].get(p, 0):>16.0f}/{t['syncs'].get(p, 0):<5.0f}" for p in phases)
        print(f"{row:<18}{t['ops_total']:>7.0f}{t['syncs_total']:>7.0f}{t['free_total']:>7.0f}  "
              f"{cells}{ms:>9.1f}")
    ratios = {}
    for name in objectives if rows else ():
        bare_ops, bare_ms = rows[f"bare {name}"][0]["ops_total"], rows[f"bare {name}"][1]
        for stage in map(int, args.stages.split(",")):
            t, ms = rows[f"loop {name} zero{stage}"]
            ratios[f"loop/bare ops, {name} zero{stage}"] = t["ops_total"] / bare_ops
            ratios[f"loop/bare host ms, {name} zero{stage}"] = ms / bare_ms
    if {"ar", "janus"} <= set(objectives) and rows:
        ratios["janus/ar ops, bare"] = rows["bare janus"][0]["ops_total"] / rows["bare ar"][0]["ops_total"]
    if "bart" in rows and "ar" in objectives:
        ratios["ar/bart ops, bare"] = rows["bare ar"][0]["ops_total"] / rows["bart"][0]["ops_total"]
    for key, value in ratios.items():
        print(f"ratio {key}: {value:.2f}")
    for row, (t, _) in rows.items():
        for site in t["sync_sites"]:
            print(f"sync {row}: {site}")
    table = {"rows": {r: {**t, "host_ms": ms} for r, (t, ms) in rows.items()}, "ratios": ratios,
             "settings": {k: v for k, v in vars(args).items() if k != "overrides"}}
    if args.shapes:
        kinds = ("unbucketed", "bucketed")
        table["shapes"] = {f"{name} {kind}": task_shapes(name, args, kind == "bucketed")
                           for name in objectives for kind in kinds} if args.data else {}
        if args.pretrain is not None:
            table["shapes"].update({f"pretrain {kind}": pretrain_shapes(args, kind == "bucketed")
                                    for kind in kinds})
        table["collation_ms"] = ({name: collation_ms(name, args) for name in objectives}
                                 if args.data else {})
        for name, ms in table["collation_ms"].items():
            print(f"collation {name}: ms per batch on the training thread: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
        for row, s in table["shapes"].items():
            slot = (f", slot rows padded {s['slot_pad_fraction']:.1%}"
                    if s["slot_pad_fraction"] is not None else "")
            print(f"shapes {row}: {s['distinct']} distinct over {s['batches']} batches of 2 "
                  f"epochs, {s['new_after_epoch_1']} first seen in epoch 2; cells padded "
                  f"{s['pad_fraction']:.1%}{slot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=2, default=str) + "\n")
    return table
