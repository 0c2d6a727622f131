"""The planner's accounting checked against the code: predicted vs measured peak memory per rank
and predicted vs counted communication bytes of one real training step, per layout.

    python -m janus_pretrain.bench accounting [--bucket N] [--json PATH]
    python -m janus_pretrain.bench accounting --h200    # the model beside the H200 table's peaks

Two gloo ranks (torch.distributed.run) build a DeepSpeed engine (train/engine.py) for each layout
in turn (objective ar / janus / bang, ZeRO 0-3, TP 1 or 2, activation checkpointing none / full),
take one warm step, then measure one more step:
    memory  every tensor storage alive, as a GPU's caching allocator counts `memory_allocated`:
            the storages alive before the step (found through the garbage collector, those from
            before the engine was built left out), then every storage an aten op creates during
            forward, backward and optimizer step (a TorchDispatchMode), each subtracted when it
            is freed; the peak of that sum
    comm    the bytes of every torch.distributed collective the step calls, by kind and by group
            (DP or TP): the payload of the call (an all-reduce's tensor, a reduce-scatter's
            input, an all-gather's output)
beside janus_pretrain/model/memory.py and janus_pretrain/model/comm.py's predictions for the
same layout. On CPU the dropout masks are kept in the activations' dtype (torch's CPU kernel);
the prediction is asked for "cpu" accordingly. Layouts run in fp32 unless they name bf16.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# (objective, ZeRO stage, TP, activation checkpointing[, precision]): every objective, every
# stage, TP 1 and 2, with and without checkpointing, fp32 and bf16; 2 ranks, so TP 2 runs at DP 1.
LAYOUTS = (("janus", 0, 1, "none"), ("ar", 1, 1, "full"), ("bang", 2, 1, "none"),
           ("janus", 3, 1, "none"), ("janus", 2, 1, "full"), ("janus", 1, 2, "none"),
           ("bang", 0, 2, "full"), ("janus", 0, 1, "none", "bf16"), ("ar", 0, 1, "full", "bf16"),
           ("ar", 1, 1, "none", "bf16"), ("bang", 2, 1, "full", "bf16"),
           ("janus", 3, 1, "full", "bf16"), ("janus", 2, 2, "none", "bf16"))
SHAPE = {"batch": 4, "src_len": 64, "tgt_len": 64, "vocab": 1000}
AR_ONLY = ("objective.weights.ce_ar=1", "objective.weights.ce_nar=0", "objective.weights.ce_aux=0",
           "objective.weights.kl_ar_aux=0", "objective.weights.kl_nar_aux=0")
OBJECTIVES = {"ar": AR_ONLY, "janus": (), "bang": ("objective.kind=bang",)}


def _storages(tensors) -> dict[int, torch.UntypedStorage]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.nbytes():
                out[s.data_ptr()] = s
    return out


def live_storages() -> dict[int, torch.UntypedStorage]:
    """Every tensor storage the garbage collector reaches (model, optimizer, DeepSpeed buffers)."""
    gc.collect()
    return _storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages and their peak: those alive at the start (but the storage
    keys in `exclude`), then every new storage an op creates (a view shares its input's and is
    not new), each subtracted when freed. It keeps no reference to a storage, so that one the
    step frees is counted as freed."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        for key, s in live_storages().items():
            if key not in exclude:
                self._add(key, s)

    def _add(self, key: int, s: torch.UntypedStorage) -> None:
        self.live[key] = s.nbytes()
        self.now += s.nbytes()
        weakref.finalize(s, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storages(tree_flatten((args, kwargs))[0])
        for key, s in _storages(tree_flatten(out)[0]).items():
            if key not in inputs and key not in self.live:
                self._add(key, s)
        self.peak = max(self.peak, self.now)
        return out


# torch.distributed function -> (kind, the argument whose bytes are the payload)
COLLECTIVES = {"all_reduce": ("all_reduce", "tensor"),
               "reduce_scatter_tensor": ("reduce_scatter", "input"),
               "_reduce_scatter_base": ("reduce_scatter", "input"),
               "reduce_scatter": ("reduce_scatter", "input_list"),
               "all_gather_into_tensor": ("all_gather", "output_tensor"),
               "_all_gather_base": ("all_gather", "output_tensor"),
               "all_gather": ("all_gather", "tensor_list"),
               "reduce": ("reduce", "tensor"), "broadcast": ("broadcast", "tensor")}


class CollectiveBytes:
    """Counts the payload bytes of torch.distributed collectives by (kind, group name) while on.
    Installed before DeepSpeed builds its communication backend, which keeps references to
    torch.distributed's functions."""

    def __init__(self, groups: dict):
        import torch.distributed as dist

        self.on = False
        self.bytes: Counter = Counter()
        self.groups = groups  # name -> callable returning the group (megatron's, rebuilt per TP)
        for name, (kind, arg) in COLLECTIVES.items():
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), kind, arg))

    def _group_name(self, group) -> str:
        import torch.distributed as dist

        for name, get in self.groups.items():
            g = get()
            if group is g:
                return name
        return "world" if group is None or group is dist.group.WORLD else "other"

    def _wrap(self, fn, kind: str, arg: str):
        signature = inspect.signature(fn)

        def counted(*args, **kwargs):
            if self.on:
                bound = signature.bind(*args, **kwargs).arguments
                x = bound[arg]
                tensors = x if isinstance(x, (list, tuple)) else [x]
                self.bytes[(kind, self._group_name(bound.get("group")))] += sum(
                    t.numel() * t.element_size() for t in tensors)
            return fn(*args, **kwargs)
        return counted


BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def deepspeed_json(stage: int, bucket: int | None, tmp: str) -> str:
    """configs/deepspeed/zero{stage}.json, or a copy in `tmp` with every bucket at `bucket`
    elements: at the tiny model the default 50M-element buckets would dwarf what is checked."""
    path = f"configs/deepspeed/zero{stage}.json"
    if bucket is None:
        return path
    from janus_pretrain.train.deepspeed_json import resolve_path

    ds = json.loads(resolve_path(path).read_text())
    zero = ds["zero_optimization"]
    for key in BUCKET_KEYS:
        if key in zero:
            zero[key] = bucket
    out = Path(tmp) / f"zero{stage}_bucket{bucket}_rank{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps(ds))
    return str(out)


def layout_config(objective: str, stage: int, tp: int, checkpointing: str, precision: str = "fp32",
                  deepspeed: str | None = None):
    from janus_pretrain.config import load_config

    return load_config(None, [
        "model=tiny", f"data.max_source_len={SHAPE['src_len']}",
        f"data.max_target_len={SHAPE['tgt_len']}", f"data.micro_batch_size={SHAPE['batch']}",
        f"parallel.precision={precision}",
        f"parallel.deepspeed_config={deepspeed or f'configs/deepspeed/zero{stage}.json'}",
        f"parallel.tensor_parallel={tp}", f"model.activation_checkpointing={checkpointing}",
        *OBJECTIVES[objective]])


def predicted(cfg, objective, host: dict, stage: int, tp: int, dp: int) -> dict:
    """The model's figures for one layout at the batch `host` actually collated."""
    from janus_pretrain.model import comm, memory
    from janus_pretrain.objectives.micro_batch import micro_batch
    from janus_pretrain.train.deepspeed_json import read_deepspeed_json

    mb = micro_batch(objective, host)
    ds = read_deepspeed_json(cfg)
    sizes = memory.parameter_sizes(cfg.model, SHAPE["vocab"], tp, cfg.objective.is_bang)
    states = memory.model_states(sum(sizes), stage, dp, cfg.parallel.precision,
                                 memory.ZeroBuckets.from_json(ds))
    acts = memory.activations(cfg.model, SHAPE["vocab"], mb, tp, cfg.parallel.precision,
                              cfg.model.activation_checkpointing == "full", device="cpu")
    trained = memory.trained_count(cfg, SHAPE["vocab"], tp)
    volumes = comm.step_bytes(cfg.model, mb, sizes, trained, comm.ZeroComm.from_json(ds), dp, tp,
                              cfg.parallel.precision, cfg.model.activation_checkpointing == "full")
    return {"memory": memory.peak_bytes(states, acts), "states": states,
            "activations": acts, "comm": volumes}


def worker(out: str, layouts: list, bucket: int | None) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    counter = CollectiveBytes({"tp": ps.get_tensor_model_parallel_group,
                               "dp": ps.get_data_parallel_group})
    from janus_pretrain.model import JanusModel
    from janus_pretrain.objectives.build import build_objective
    from janus_pretrain.parallel import state
    from janus_pretrain.tokenizer import PAD
    from janus_pretrain.train.engine import build_engine

    rows = []
    for objective_name, stage, tp, checkpointing, *precision in layouts:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        cfg = layout_config(objective_name, stage, tp, checkpointing, *precision,
                            deepspeed=deepspeed_json(stage, bucket, str(Path(out).parent)))
        topo = state.initialize(tp)
        before = set(live_storages())  # keys only: a reference would keep a storage alive
        torch.manual_seed(0)
        objective = build_objective(cfg)
        engine = build_engine(JanusModel(cfg.model, SHAPE["vocab"], PAD,
                                         mask_vector=cfg.objective.is_bang), cfg)
        rng = np.random.default_rng(state.data_parallel_rank())
        targets = [rng.integers(5, SHAPE["vocab"], SHAPE["tgt_len"] - 2)
                   for _ in range(SHAPE["batch"])]
        host = objective.collate([(None, t) for t in targets], rng)
        batch = {k: v.to(topo.device) for k, v in host.items()}

        def step():
            prep = objective.prepare(batch)
            loss, _ = objective.loss(engine(**prep.model_inputs), prep)
            engine.backward(loss)
            engine.step()

        step()
        counter.bytes.clear()
        counter.on = True
        with LiveBytes(exclude=before) as live:
            step()
        counter.on = False
        dp = state.data_parallel_size()
        rows.append({"objective": objective_name, "zero": stage, "tp": tp, "dp": dp,
                     "precision": cfg.parallel.precision,
                     "checkpointing": checkpointing, "measured_memory": live.peak,
                     "counted": {f"{k}/{g}": v for (k, g), v in counter.bytes.items()},
                     "predicted": predicted(cfg, objective, host, stage, tp, dp)})
        del engine, step, batch
        gc.collect()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    state.shutdown()


def run_layouts(layouts=LAYOUTS, bucket: int | None = None, timeout: int = 600) -> list[dict]:
    """Both ranks over `layouts`, in one torch.distributed.run, with the DeepSpeed JSONs' buckets
    at `bucket` elements (None: as configured); rank 0's rows."""
    from janus_pretrain.parallel.state import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        # Its own session, so that a timeout ends torchrun and both ranks, not torchrun alone.
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             f"--master_port={free_port()}", "-m", "janus_pretrain.bench.accounting", "--worker",
             str(out), json.dumps(layouts), json.dumps(bucket)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        if proc.returncode:
            raise RuntimeError(f"accounting worker failed:\n{stderr[-4000:]}")
        return json.loads(out.read_text())


def comm_pairs(row: dict) -> list[tuple[str, float, float]]:
    """(kind/group, predicted, counted) for every kind either side has."""
    counted, pred = row["counted"], row["predicted"]["comm"]
    return [(k, pred.get(k, 0.0), counted.get(k, 0)) for k in sorted(set(counted) | set(pred))
            if pred.get(k) or counted.get(k)]


# Peak MiB (torch.cuda.max_memory_allocated) of the rows of docs/performance.md "One H200
# (2026-12-04)": bench gpu at the base shape, batch 16 x (256 + 256), 32k vocabulary, one GPU.
H200_PEAK_MIB = {"bf16 ar sdpa": 5468, "bf16 janus sdpa": 9838, "bf16 ar flex": 5545,
                 "bf16 janus flex": 10087, "fp16 ar ZeRO-0": 4983, "bf16 janus ZeRO-2": 9351}


def h200_memory() -> None:
    """The model's GPU peak for the H200 table's rows beside their measured peaks: the same
    shapes and batches bench gpu built (bench/train.py `objective_config`, `host_batches`), the
    largest of its 13 batches; plain-loop rows as ZeRO-0 without DeepSpeed's buckets."""
    from janus_pretrain.bench.train import data_overrides, host_batches, objective_config
    from janus_pretrain.model import memory
    from janus_pretrain.objectives.micro_batch import micro_batch
    from janus_pretrain.train.deepspeed_json import resolve_path

    args = argparse.Namespace(model="base", batch=16, src_len=256, tgt_len=256, vocab=32000,
                              data=None, max_tokens=None)
    args.overrides = data_overrides(args)
    print("| H200 row | measured peak MiB | predicted MiB | pred/meas |\n|---|---:|---:|---:|")
    for row, measured in H200_PEAK_MIB.items():
        _, name, kind = row.split()
        engine = kind.startswith("ZeRO")
        stage = int(kind[-1]) if engine else 0
        precision = row.split()[0]
        cfg, objective = objective_config(name, args, (
            "model.attention_dropout=0", f"model.attention={'flex' if kind == 'flex' else 'sdpa'}"))
        ds = json.loads(resolve_path(f"configs/deepspeed/zero{stage}.json").read_text())
        buckets = memory.ZeroBuckets.from_json(ds) if engine else None
        states = memory.model_states(memory.parameter_count(cfg.model, args.vocab), stage, 1,
                                     precision, buckets)
        peak = max(memory.peak_bytes(states, memory.activations(
            cfg.model, args.vocab, micro_batch(objective, host), 1, precision, False))
            for host in host_batches(cfg, objective, args, 13))
        print(f"| {row} | {measured:,} | {peak / 2**20:,.0f} | {peak / 2**20 / measured:.3f} |")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench accounting",
                                description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--bucket", type=int, help="every DeepSpeed bucket at this many elements "
                   "(default: as configs/deepspeed/*.json set them, 50M)")
    p.add_argument("--h200", action="store_true",
                   help="instead: the model's peak memory beside the H200 table's (no GPU needed)")
    args = p.parse_args(argv)
    if args.h200:
        return h200_memory()
    rows = run_layouts(bucket=args.bucket)
    print(f"model=tiny batch={SHAPE['batch']} src={SHAPE['src_len']} tgt={SHAPE['tgt_len']} "
          f"vocab={SHAPE['vocab']} buckets={args.bucket or 'configured'}, 2 gloo ranks; "
          "peak memory per rank (MiB) and "
          "communication bytes of one step (KiB)")
    print("| objective | precision | ZeRO | TP | DP | ckpt | predicted MiB | measured MiB "
          "| pred/meas |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        pred, meas = r["predicted"]["memory"], r["measured_memory"]
        print(f"| {r['objective']} | {r['precision']} | {r['zero']} | {r['tp']} | {r['dp']} "
              f"| {r['checkpointing']} | {pred / 2**20:.2f} | {meas / 2**20:.2f} "
              f"| {pred / meas:.3f} |")
    print("\n| objective | precision | ZeRO | TP | ckpt | collective/group | predicted KiB "
          "| counted KiB | pred/counted |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        for kind, pred, counted in comm_pairs(r):
            ratio = f"{pred / counted:.4f}" if counted > 1024 else "scalars"
            print(f"| {r['objective']} | {r['precision']} | {r['zero']} | {r['tp']} "
                  f"| {r['checkpointing']} | {kind} | {pred / 1024:.1f} | {counted / 1024:.1f} "
                  f"| {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))
    else:
        main(sys.argv[1:])
