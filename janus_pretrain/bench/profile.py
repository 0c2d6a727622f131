"""Per-op profile of our `ar` step, our `janus` step and Hugging Face BART's step, side by side at
the same shapes and precision: where the time of each goes, to explain the gap between our AR and
BART and JANUS's time beyond its FLOP ratio.

    python -m janus_pretrain.bench profile --model base --batch 8 --src-len 128 --tgt-len 128

The steps are those `bench train` times (bench/train.py `ours_step`, `bart_step`: forward +
backward + AdamW on one device micro-batch; `--data DIR` for a prepared task's batches). Each
system runs --warmup untimed steps, then --steps under torch.profiler (CPU activity, and CUDA on a
GPU). An op's time is its self time (CPU time on CPU; on a GPU, the device time of the kernels it
launched itself), per step. Shares are of the summed self time of all ops, which leaves out the
Python between ops: `op ms / wall` shows how much of the (profiled, so slower) wall time ops cover.
Threads come from OMP_NUM_THREADS. `--json PATH` writes every op's time and the shares.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from janus_pretrain.bench.train import (PRECISIONS, Step, add_shape_arguments, bart_step,
                                        checked_shape, data_overrides, mean_flops, ours_step,
                                        time_steps)
from janus_pretrain.parallel import state

SYSTEMS = ("ar", "janus", "bart")

# category -> name prefixes of the ops it holds. A prefix matches an op name equal to it or going
# on with "_", "." or "#": aten::add holds aten::add_, not aten::addmm; aten::exp not aten::expand.
# A category in ENCLOSING also holds every op run inside one of its ops (the outermost such op
# decides): the bmm and softmax of a math-backend attention count as attention, the exp and mul of
# our fused loss (`_VocabTerms`, objectives/losses.py) and of its backward as loss, AdamW's
# foreach kernels and zero_grad as optimizer. Attention's backward is identifiable only as the
# fused kernels' own backward ops (the math backend's backward is autograd's bmm, softmax, ...
# nodes). Copies include fills (zeroing). An op no prefix holds is `other`.
CATEGORIES = {
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product",
                  "aten::_efficient_attention", "aten::_flash_attention", "aten::_cudnn_attention",
                  "aten::flex_attention", "FlexAttention", "FlexAttentionBackward"),
    "optimizer": ("Optimizer.step", "Optimizer.zero_grad", "aten::_fused_adam",
                  "aten::_fused_adamw", "aten::_foreach"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
               "aten::linear", "aten::_addmm_activation"),
    "loss": ("_VocabTerms", "_VocabTermsBackward", "aten::cross_entropy", "aten::log_softmax",
             "aten::_log_softmax", "aten::softmax", "aten::_softmax", "aten::nll_loss",
             "aten::gather", "aten::logsumexp", "aten::kl_div"),
    "normalisation": ("aten::layer_norm", "aten::native_layer_norm", "aten::rms_norm",
                      "aten::_fused_rms_norm"),
    "copies": ("aten::copy", "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy",
               "aten::cat", "aten::index", "aten::embedding", "aten::scatter", "aten::stack",
               "aten::fill", "aten::zero"),
    "elementwise": ("aten::add", "aten::sub", "aten::rsub", "aten::mul", "aten::div",
                    "aten::addcmul", "aten::addcdiv", "aten::exp", "aten::neg", "aten::gelu",
                    "aten::relu", "aten::tanh", "aten::dropout", "aten::native_dropout",
                    "aten::bernoulli", "aten::where", "aten::masked_fill", "aten::pow",
                    "aten::sqrt", "aten::rsqrt", "aten::sum", "aten::mean"),
}
ENCLOSING = ("attention", "loss", "optimizer")
OTHER = "other"


@functools.cache
def own_category(name: str) -> str:
    return next((c for c, prefixes in CATEGORIES.items()
                 if any(name.startswith(x) and name[len(x):len(x) + 1] in ("", "_", ".", "#")
                        for x in prefixes)), OTHER)


def category(event) -> str:
    """The category of the outermost enclosing-category op around the event (itself included),
    else the event's own."""
    outer, node = None, event
    while node is not None:
        if (c := own_category(node.name)) in ENCLOSING:
            outer = c
        node = node.cpu_parent
    return outer or own_category(event.name)


def op_times(prof, on_device: bool, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """ms per step of self time by op name and by category, over the CPU-side op events (a
    kernel's device time is counted once, on the op that launched it)."""
    ops, categories = defaultdict(float), dict.fromkeys([*CATEGORIES, OTHER], 0.0)
    for event in prof.events():
        if event.device_type != DeviceType.CPU:
            continue
        us = event.self_device_time_total if on_device else event.self_cpu_time_total
        ops[event.name] += us / 1000 / steps
        categories[category(event)] += us / 1000 / steps
    return dict(ops), categories


def profiled(step: Step, args, device: torch.device) -> dict:
    """Warm-up, then args.steps steps under the profiler: wall and op times, category shares."""
    for i in range(args.warmup):
        step.run(i)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        times = time_steps(lambda i: step.run(args.warmup + i), 0, args.steps, device)
    ops, categories = op_times(prof, device.type == "cuda", args.steps)
    total = sum(categories.values())
    timed = step.host[args.warmup:]
    return {"wall_ms_per_step": sum(times) * 1000 / len(times), "op_ms_per_step": total,
            "gflop_per_step": mean_flops(step.objective, timed, step.cfg.model, step.vocab) / 1e9,
            "shares": {c: ms / total for c, ms in categories.items()}, "ops_ms_per_step": ops}


def top_ops(results: dict[str, dict], k: int) -> list[str]:
    """The k ops with the largest self time per step in any system, largest first."""
    names = {op for r in results.values() for op in r["ops_ms_per_step"]}
    return sorted(names, key=lambda op: -max(r["ops_ms_per_step"].get(op, 0.0)
                                             for r in results.values()))[:k]


def markdown(results: dict[str, dict], top: list[str]) -> str:
    head = "| " + " | ".join(results) + " |"
    rule = "|---" + "|---:" * len(results) + "|"
    lines = [f"| op (self ms/step) {head}", rule]
    lines += [f"| `{op}` | " + " | ".join(f"{r['ops_ms_per_step'].get(op, 0.0):.2f}"
                                         for r in results.values()) + " |" for op in top]
    lines += ["", f"| share of op time {head}", rule]
    lines += [f"| {c} | " + " | ".join(f"{r['shares'][c]:.1%}" for r in results.values()) + " |"
              for c in [*CATEGORIES, OTHER]]
    for key, label, fmt in (("op_ms_per_step", "op ms/step", "{:.1f}"),
                            ("wall_ms_per_step", "wall ms/step (profiled)", "{:.1f}"),
                            ("gflop_per_step", "GFLOP/step", "{:.2f}")):
        lines.append(f"| {label} | " + " | ".join(fmt.format(r[key]) for r in results.values())
                     + " |")
    lines.append("| op ms / wall | " + " | ".join(
        f"{r['op_ms_per_step'] / r['wall_ms_per_step']:.1%}" for r in results.values()) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench profile",
                                description=__doc__.splitlines()[0])
    add_shape_arguments(p, model="tiny")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="as bench train (fp32, bf16 with fp32 master weights, autocast)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per system")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per system")
    p.add_argument("--top", type=int, default=20, help="ops in the side-by-side table")
    p.add_argument("--json", type=Path, help="also write the profile to this JSON file")
    # What the shared step builders read that this benchmark keeps fixed.
    p.set_defaults(vocab=None, compile=False)
    return checked_shape(p, p.parse_args(argv))


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = state.initialize(1).device
    args.overrides = data_overrides(args)
    builders = {"ar": lambda: ours_step("ar", args.precision, device, args),
                "janus": lambda: ours_step("janus", args.precision, device, args),
                "bart": lambda: bart_step(args.precision, device, args)}
    results = {}
    for name in SYSTEMS:
        gc.collect()
        results[name] = profiled(builders[name](), args, device)
    shape = (f"data={args.data} max_tokens={args.max_tokens}" if args.data
             else f"src_len={args.src_len} tgt_len={args.tgt_len}")
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"model={args.model} batch={args.batch} {shape} precision={args.precision} "
          f"steps={args.warmup}+{args.steps}\n")
    print(markdown(results, top_ops(results, args.top)), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    if k != "overrides"}
        args.json.write_text(json.dumps({"settings": settings, "systems": results}, indent=2)
                             + "\n")
