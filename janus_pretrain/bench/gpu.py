"""The GPU check in one go (at most ~8 minutes on one GPU): bf16 training steps at the base shape.

    python -m janus_pretrain.bench gpu [--json PATH]
    python -m janus_pretrain.bench gpu --dry-run-cpu   # the same code path, tiny shapes, on CPU

Rows (single process, TP = 1; bench/train.py's step, timing and FLOP count, not a copy):
    ar / janus x sdpa / flex   bf16 weights + fp32 AdamW masters (train.py `bf16`)
    bart                       HF BART of the same shape, bf16, SDPA
    fp16 ar ZeRO-0             DeepSpeed fp16 with dynamic loss scaling (the scale is printed)
    bf16 janus ZeRO-2          DeepSpeed ZeRO-2 on one GPU
    bf16 ar / janus compiled   sdpa with torch.compile, as train.compile=true (CUDA only)
MFU is against a bf16 matmul peak measured in this process right before each row. Every row
runs with attention_dropout = 0, since flex has none, so sdpa and flex compare like for like.
The dry run skips the flex and compiled rows (no flex backward on CPU in torch 2.13; compiling
takes minutes there) and runs the fp16 row in bf16 (DeepSpeed refuses fp16 on CPU). --json is
rewritten after each row, so a run cut short keeps the rows it finished.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback

import torch

from janus_pretrain.bench.train import (device_run, PeakMemory, host_batches, measured,
                                        objective_config, run_bart, run_ours, time_steps)
from janus_pretrain.model.flops import matmul_peak
from janus_pretrain.parallel import state

# peak_sizes: the matmuls whose best rate is the MFU denominator (model/flops.py); small in the
# dry run, where a CPU without bf16 instructions spends a minute on one 2048 x 2048 bf16 matmul.
SHAPES = {False: dict(model="base", batch=16, src_len=256, tgt_len=256, vocab=32000, warmup=3,
                      steps=10, compile=False, peak_sizes=(2048, 4096, 8192)),
          True: dict(model="tiny", batch=2, src_len=16, tgt_len=16, vocab=512, warmup=1, steps=1,
                     compile=False, peak_sizes=(128,))}
NO_ATTN_DROPOUT = ("model.attention_dropout=0",)


def run_engine(name: str, precision: str, stage: int, device: torch.device, args) -> dict:
    """Steps of a DeepSpeed engine (train/engine.py) at `precision` and ZeRO `stage`."""
    from janus_pretrain.model import JanusModel
    from janus_pretrain.tokenizer import PAD
    from janus_pretrain.train.engine import build_engine

    cfg, objective = objective_config(name, args, NO_ATTN_DROPOUT + (
        f"parallel.precision={precision}",
        f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json",
        f"data.micro_batch_size={args.batch}"))
    torch.manual_seed(0)
    engine = build_engine(JanusModel(cfg.model, args.vocab, PAD), cfg)
    host = host_batches(cfg, objective, args, args.warmup + args.steps)
    batches = [{k: v.to(device) for k, v in b.items()} for b in host]

    def step(i: int) -> None:
        prep = objective.prepare(batches[i])
        loss, _ = objective.loss(engine(**prep.model_inputs), prep)
        engine.backward(loss)
        engine.step()

    times = time_steps(step, args.warmup, args.steps, device)
    scale = getattr(engine.optimizer, "loss_scale", None)  # DeepSpeed's property: fp16 and ZeRO
    return {**measured(times, objective, host, cfg, engine.module.padded_vocab_size),
            "loss_scale": None if scale is None else float(scale)}


def rows(device: torch.device, args) -> dict:
    cpu = device.type == "cpu"
    table = {}
    for attention in ("sdpa", "flex"):
        if attention == "flex" and cpu:
            continue
        for name in ("ar", "janus"):
            over = NO_ATTN_DROPOUT + (f"model.attention={attention}",)
            table[f"bf16 {name} {attention}"] = lambda n=name, o=over: run_ours(
                n, "bf16", device, args, o)
    table["bf16 bart sdpa"] = lambda: run_bart("bf16", device, args, NO_ATTN_DROPOUT)
    fp16 = "bf16" if cpu else "fp16"
    table[f"{fp16} ar ZeRO-0"] = lambda: run_engine("ar", fp16, 0, device, args)
    table["bf16 janus ZeRO-2"] = lambda: run_engine("janus", "bf16", 2, device, args)
    if not cpu:
        compiled = argparse.Namespace(**{**vars(args), "compile": True})
        for name in ("ar", "janus"):
            table[f"bf16 {name} compiled"] = lambda n=name: run_ours(n, "bf16", device, compiled,
                                                                     NO_ATTN_DROPOUT)
    return table


def main(argv: list[str]) -> None:
    args, device = device_run("gpu", __doc__.splitlines()[0], argv, SHAPES, "flex rows")
    tokens = args.batch * (args.src_len + args.tgt_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} model={args.model} batch={args.batch} "
          f"src_len={args.src_len} tgt_len={args.tgt_len} steps={args.warmup}+{args.steps}",
          flush=True)
    print(f"{'row':<20} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'peak TF/s':>9} "
          f"{'MFU':>6} {'peak MiB':>9} {'loss scale':>10}")
    results = {}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"device": name, "shape": SHAPES[args.dry_run_cpu],
                                             "rows": results}, indent=1))

    for row, run in rows(device, args).items():
        gc.collect()
        peak = matmul_peak(device, torch.bfloat16, sizes=args.peak_sizes)
        try:
            with PeakMemory(device) as mem:
                r = run()
        except Exception as e:  # noqa: BLE001 - one GPU run: a failed row is a result, the next runs
            traceback.print_exc()
            results[row] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{row:<20} failed: {results[row]['error'][:200]}", flush=True)
            save()
            continue
        achieved = r["flops"] / r["seconds"]
        results[row] = {**r, "tokens_per_s": tokens / r["seconds"], "peak_flops": peak,
                        "mfu": achieved / peak, "peak_bytes": mem.bytes}
        scale = r.get("loss_scale")
        print(f"{row:<20} {r['seconds'] * 1000:>9.1f} {tokens / r['seconds']:>10.0f} "
              f"{achieved / 1e12:>8.2f} {peak / 1e12:>9.2f} {achieved / peak:>6.1%} "
              f"{mem.bytes / 2**20:>9.0f} {'' if scale is None else f'{scale:g}':>10}", flush=True)
        save()
    if "mfu" in results.get("bf16 janus flex", {}):
        speedup = results["bf16 janus sdpa"]["seconds"] / results["bf16 janus flex"]["seconds"]
        print(f"janus flex over sdpa: {speedup:.2f}x", flush=True)
    state.shutdown()
    if any("error" in r for r in results.values()):
        sys.exit(1)
