"""Per-rank model-state memory under ZeRO 0/1/2/3 at DP = 2, measured from live DeepSpeed
engines side by side with the analytic values (Rajbhandari et al., 2020) for DP = 2 and DP = N.

    python -m janus_pretrain.bench memory --model tiny [--precision fp32] [--dp-analytic 64]

Each stage runs in its own pair of gloo processes (one training step on random data). Bytes are
read from the tensors the engine holds after the backward pass:
    params     module parameters (ZeRO-3: the rank's partition `ds_tensor`)
    grads      .grad of the parameters (ZeRO-0), the reduced gradient partition (ZeRO 1/2/3)
    optimizer  AdamW moments + the fp32 master partition ZeRO 1/2/3 keep

    python -m janus_pretrain.bench memory --activations --model base --batch 8 --src-len 128

reports instead the activation peak of one `janus` training step with
model.activation_checkpointing none and full: the peak memory over forward + backward above what
the process held before it (RSS high-water mark on CPU, max allocated on CUDA), with the gradient
buffers already allocated by a warm-up step, so what remains is activations and their transients.
Each variant runs in a fresh process, so one's freed-but-kept heap cannot hide the other's peak.

    python -m janus_pretrain.bench memory --relayout --model tiny

reports the host memory of a resume at another layout (bench/relayout_memory.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from janus_pretrain.model.memory import model_states

STAGES = (0, 1, 2, 3)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure(engine, stage: int) -> dict[str, int]:
    params = list(engine.module.parameters())
    opt = engine.optimizer
    if stage == 3:
        held = [p.ds_tensor for p in params]
        grads = [opt.grad_partitions_flat_buffer]
        masters = opt.fp32_partitioned_groups_flat
        inner = opt.optimizer
    elif stage in (1, 2):
        held = params
        # Both reduce the gradients into this rank's partition (`averaged_gradients`) during
        # backward; the step frees it.
        grads = [g for group in opt.averaged_gradients.values() if group for g in group]
        masters = opt.single_partition_of_fp32_groups
        inner = opt.optimizer
    else:
        held, grads, masters = params, [p.grad for p in params], []
        inner = getattr(opt, "optimizer", opt)
    moments = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return {"params": _nbytes(held), "grads": _nbytes(grads),
            "optimizer": _nbytes(moments) + _nbytes(masters),
            "numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)}


def analytic(numel: int, stage: int, dp: int, precision: str) -> dict[str, float]:
    """Model states of janus_pretrain/model/memory.py (the planner's accounting), without
    DeepSpeed's buckets, which this table leaves out."""
    states = model_states(numel, stage, dp, precision)
    return {"params": states["params"], "grads": states["grads"] + states["grads_backward"],
            "optimizer": states["optimizer"]}


def worker(stage: int, preset: str, precision: str, out: str) -> None:
    from janus_pretrain.config import load_config
    from janus_pretrain.model import JanusModel
    from janus_pretrain.objectives.janus import JanusObjective
    from janus_pretrain.parallel import state
    from janus_pretrain.tokenizer import PAD
    from janus_pretrain.train.engine import build_engine

    cfg = load_config(None, [f"model={preset}",   "data.max_source_len=64", "data.max_target_len=64",
                             "data.micro_batch_size=2", f"parallel.precision={precision}",
                             f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json"])
    topo = state.initialize(1)
    torch.manual_seed(0)
    engine = build_engine(JanusModel(cfg.model, 8000, PAD), cfg)
    obj = JanusObjective(cfg.objective, 64, 64, cfg.model.length_classes)
    rng = np.random.default_rng(topo.rank)
    batch = obj.collate([(None, rng.integers(5, 8000, 60)) for _ in range(2)], rng)
    prep = obj.prepare({k: v.to(topo.device) for k, v in batch.items()})
    loss, _ = obj.loss(engine(**prep.model_inputs), prep)
    engine.backward(loss)
    grads = measure(engine, stage)["grads"]
    engine.step()
    sizes = {**measure(engine, stage), "grads": grads}
    with open(f"{out}.rank{topo.rank}", "w") as f:
        json.dump(sizes, f)
    state.shutdown()


def activation_worker(checkpointing: str, argv: list[str]) -> None:
    from janus_pretrain.bench.train import (PeakMemory, data_overrides, host_batches,
                                            objective_config)
    from janus_pretrain.model import JanusModel
    from janus_pretrain.parallel import state
    from janus_pretrain.tokenizer import PAD

    args = _parser().parse_args(argv)
    device = state.initialize(1).device
    args.data = None  # synthetic full-length pairs of --src-len / --tgt-len
    args.overrides = data_overrides(args)
    cfg, objective = objective_config("janus", args)
    cfg.model.activation_checkpointing = checkpointing
    torch.manual_seed(0)
    model = JanusModel(cfg.model, args.vocab, PAD).to(device).train()
    batches = [{k: v.to(device) for k, v in b.items()} for b in host_batches(cfg, objective, args, 2)]

    def step(batch: dict) -> None:
        prep = objective.prepare(batch)
        loss, _ = objective.loss(model(**prep.model_inputs), prep)
        loss.backward()  # into the kept .grad buffers after the first step

    step(batches[0])
    gc.collect()
    before = (torch.cuda.memory_allocated(device) if device.type == "cuda"
              else _rss_bytes())
    with PeakMemory(device) as mem:
        step(batches[1])
    print(json.dumps({"activation_peak": mem.bytes - before}))
    state.shutdown()


def _rss_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def activations(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    peaks = {}
    for checkpointing in ("none", "full"):
        env = {**os.environ}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        out = subprocess.run([sys.executable, "-m", "janus_pretrain.bench.memory",
                              "--activation-worker", checkpointing, *argv],
                             check=True, env=env, capture_output=True, text=True, timeout=1800)
        peaks[checkpointing] = json.loads(out.stdout.strip().splitlines()[-1])["activation_peak"]
    print(f"model={args.model} batch={args.batch} src_len={args.src_len} tgt_len={args.tgt_len} "
          f"objective=janus fp32; activation peak MiB")
    print(f"none {_mb(peaks['none'])}\nfull {_mb(peaks['full'])}\n"
          f"full/none {peaks['full'] / peaks['none']:.2f}")


def _mb(x: float) -> str:
    return f"{x / 2**20:9.1f}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench memory",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--dp-analytic", type=int, default=64, help="N for the analytic DP = N column")
    p.add_argument("--relayout", action="store_true",
                   help="host memory of a resume at another layout instead (bench/relayout_memory.py)")
    p.add_argument("--activations", action="store_true",
                   help="activation peak with and without activation checkpointing instead")
    p.add_argument("--batch", type=int, default=8, help="--activations only")
    p.add_argument("--src-len", type=int, default=128, help="--activations only")
    p.add_argument("--tgt-len", type=int, default=128, help="--activations only")
    p.add_argument("--vocab", type=int, default=32000, help="--activations only")
    return p


def main(argv: list[str]) -> None:
    if "--relayout" in argv:
        from janus_pretrain.bench import relayout_memory
        return relayout_memory.main(argv)
    args = _parser().parse_args(argv)
    if args.activations:
        return activations(argv)
    from janus_pretrain.parallel.state import free_port

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in STAGES:
            out = str(Path(tmp) / f"zero{stage}")
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "-m", "janus_pretrain.bench.memory",
                            "--worker", str(stage), args.model, args.precision, out],
                           check=True, env=env, capture_output=True, timeout=900)
            rows[stage] = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    numel = rows[0][0]["numel"]
    print(f"model={args.model} params={numel:,} precision={args.precision}; MiB per rank")
    print(f"{'ZeRO':<5} {'kind':<10} {'rank0':>9} {'rank1':>9} {'DP=2 est':>9} "
          f"{'DP=' + str(args.dp_analytic) + ' est':>10} {'vs ZeRO-0':>10}")
    for stage in STAGES:
        est2 = analytic(numel, stage, 2, args.precision)
        estn = analytic(numel, stage, args.dp_analytic, args.precision)
        for kind in ("params", "grads", "optimizer"):
            r0, r1 = rows[stage][0][kind], rows[stage][1][kind]
            print(f"{stage:<5} {kind:<10} {_mb(r0)} {_mb(r1)} {_mb(est2[kind])} {_mb(estn[kind]):>10} "
                  f"{r0 / rows[0][0][kind]:>9.2f}x")
        total = sum(rows[stage][0][k] for k in ("params", "grads", "optimizer"))
        print(f"{stage:<5} {'total':<10} {_mb(total)} {'':>9} "
              f"{_mb(sum(est2.values()))} {_mb(sum(estn.values())):>10}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    elif sys.argv[1:2] == ["--activation-worker"]:
        activation_worker(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1:])
