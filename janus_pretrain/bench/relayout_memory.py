"""Host memory of a resume at another layout, per rank, against the state the rank holds.

    python -m janus_pretrain.bench memory --relayout --model tiny [--precision fp32]

A TP = 2 x DP = 2 ZeRO-2 run takes one step on random data and saves (DeepSpeed's files, as
training writes them); then each target layout (those tests/test_layout_resume.py resumes at)
starts its engine in fresh gloo processes and loads the checkpoint through checkpoint/relayout.py.
Per rank it reports, in MiB:
    own     the model states the rank holds once loaded: parameters, fp32 masters and moments
            (gradients left out, so the ratio errs high)
    extra   the high-water mark of resident memory (VmHWM, reset just before the load) above
            what the process held before it (with its moments allocated), less any part of
            `own` the load itself allocated
    ratio   (own + extra) / own: peak model-state memory during the resume over the rank's own
At ZeRO 1/2 the load ends by gathering the module from the fp32 partitions, the all-gather every
optimizer step makes: gloo allocates a temporary for it (about the module's size over DP, in the
extra here; the training step has it too), NCCL gathers in place. On a GPU the rank's state is
in device memory and the host holds only the mapped pages (the predicted extra).
The "whole" row has one process read the entire checkpoint at TP = 1 (relayout.read, what every
rank did before a resume read slices) for reference. Below the table, the same sums for BANG's
400M and a 1.5B shape: own from the planner's model states (model/memory.py), extra as the
measured rows bound it: the largest of the rank's three fp32 shares (weights, two moments: one is
read at a time: the mapped pages of the old files), which the reader unmaps after every
`slices.RELEASE_BYTES` it has read, so at most that much plus the rank's largest parameter slice
(a whole parameter without ZeRO, at most its partition at ZeRO 1/2, a 1/DP part at ZeRO-3); the
slices are copied from the mapped files straight into the engine's tensors.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SOURCE = (2, 2, 2)                              # TP, DP, ZeRO stage
TARGETS = ((1, 2, 1), (1, 1, 0), (2, 1, 3))     # as tests/test_layout_resume.py
VOCAB = 8000


def _config(preset: str, precision: str, tp: int, stage: int):
    from janus_pretrain.config import load_config

    return load_config(None, [f"model={preset}", "data.max_source_len=64",
                              "data.max_target_len=64", "data.micro_batch_size=2",
                              f"parallel.precision={precision}", f"parallel.tensor_parallel={tp}",
                              f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json"])


def _engine(preset: str, precision: str, tp: int, stage: int):
    from janus_pretrain.model import JanusModel
    from janus_pretrain.parallel import state
    from janus_pretrain.tokenizer import PAD
    from janus_pretrain.train.engine import build_engine

    cfg = _config(preset, precision, tp, stage)
    topo = state.initialize(tp)
    torch.manual_seed(0)
    return cfg, topo, build_engine(JanusModel(cfg.model, VOCAB, PAD), cfg)


def save_worker(preset: str, precision: str, directory: str) -> None:
    """One step of the source layout, then DeepSpeed's checkpoint under `directory`/saved."""
    from janus_pretrain.objectives.janus import JanusObjective
    from janus_pretrain.parallel import state

    cfg, topo, engine = _engine(preset, precision, SOURCE[0], SOURCE[2])
    obj = JanusObjective(cfg.objective, 64, 64, cfg.model.length_classes)
    rng = np.random.default_rng(state.data_parallel_rank())
    batch = obj.collate([(None, rng.integers(5, VOCAB, 60)) for _ in range(2)], rng)
    prep = obj.prepare({k: v.to(topo.device) for k, v in batch.items()})
    loss, _ = obj.loss(engine(**prep.model_inputs), prep)
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(directory, tag="saved", save_latest=False)
    state.shutdown()


def _status(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _own(engine, stage: int) -> int:
    from janus_pretrain.bench.memory import measure

    sizes = measure(engine, stage)
    return sizes["params"] + sizes["optimizer"]


def load_worker(preset: str, precision: str, target: str, directory: str, out: str) -> None:
    """The target layout's engine, then the load, measured; "whole" reads everything instead."""
    from janus_pretrain.checkpoint import relayout
    from janus_pretrain.parallel import state

    tp, dp, stage = (1, 1, 0) if target == "whole" else map(int, target.split(","))
    _, topo, engine = _engine(preset, precision, tp, stage)
    checkpoint = Path(directory) / "saved"
    # The moments as the load leaves them, allocated first: a load into freed heap pages would
    # not show in the peak
    relayout.init_moments(engine, 0.0)
    gc.collect()
    own_before = _own(engine, stage)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss = _status("VmRSS")
    if target == "whole":
        held = relayout.read(checkpoint, relayout.Layout(*SOURCE), engine.module)
    else:
        relayout.load(engine, checkpoint, relayout.Layout(*SOURCE))
    peak = _status("VmHWM")
    gc.collect()
    own = _own(engine, stage)
    extra = peak - rss - (own - own_before)
    if target == "whole":
        del held
    with open(f"{out}.rank{topo.rank}", "w") as f:
        json.dump({"own": own, "extra": extra}, f)
    state.shutdown()


def _launch(nproc: int, *args: str) -> None:
    from janus_pretrain.parallel.state import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                          f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                          "-m", "janus_pretrain.bench.relayout_memory", *args],
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"bench memory --relayout: {' '.join(args[:2])} failed:\n"
                         f"{out.stderr[-3000:]}")


def predicted(preset: str, overrides: dict, stage: int, tp: int, dp: int, precision: str,
              vocab: int = 50265) -> tuple[int, float, float]:
    """(parameters, own bytes, extra bytes) of one rank resuming at (tp, dp, stage)."""
    from janus_pretrain.checkpoint.slices import RELEASE_BYTES
    from janus_pretrain.model.memory import model_states, parameter_sizes

    model = dataclasses.replace(_config(preset, precision, 1, 0).model, **overrides)
    sizes = parameter_sizes(model, vocab, tp)
    numel = sum(sizes)
    states = model_states(numel, stage, dp, precision)
    share = numel / dp if stage > 0 else numel  # what the rank holds of each fp32 tensor
    largest = {0: max(sizes), 3: max(sizes) / dp}.get(stage, min(max(sizes), share))
    return numel * tp, states["params"] + states["optimizer"], \
        min(4 * share, RELEASE_BYTES + 4 * largest)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench memory --relayout",
                                description=__doc__.splitlines()[0])
    p.add_argument("--relayout", action="store_true")
    p.add_argument("--model", default="tiny")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        _launch(SOURCE[0] * SOURCE[1], "--save", args.model, args.precision, tmp)
        for target in ("whole", *(",".join(map(str, t)) for t in TARGETS)):
            out = str(Path(tmp) / target)
            nproc = 1 if target == "whole" else int(target[0]) * int(target[2])
            _launch(nproc, "--load", args.model, args.precision, target, tmp, out)
            rows[target] = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]
    mib = 2 ** 20
    print(f"model={args.model} precision={args.precision}; checkpoint written at TP=2 x DP=2, "
          f"ZeRO-2; MiB per rank")
    print(f"{'resumed at':<22} {'rank':>4} {'own':>9} {'extra':>9} {'ratio':>6} "
          f"{'predicted own':>13} {'extra':>9}")
    for target, ranks in rows.items():
        name = "whole (TP=1, read all)" if target == "whole" else \
            "TP={} x DP={}, ZeRO-{}".format(*target.split(","))
        for r, m in enumerate(ranks):
            own = rows["1,1,0"][0]["own"] if target == "whole" else m["own"]  # its layout's
            tp, dp, stage = (1, 1, 0) if target == "whole" else map(int, target.split(","))
            _, own_est, extra_est = predicted(args.model, {}, stage, tp, dp, args.precision, VOCAB)
            print(f"{name:<22} {r:>4} {own / mib:>9.1f} {m['extra'] / mib:>9.1f} "
                  f"{(own + m['extra']) / own:>6.2f} {own_est / mib:>13.1f} " +
                  (f"{'-':>9}" if target == "whole" else f"{extra_est / mib:>9.1f}"))
    print("\npredicted (own: params + masters + moments; extra: the fp32 share of one tensor, at "
          "most the release interval + the largest slice); GiB per rank, vocabulary 50,265")
    print(f"{'model':<6} {'layout':<26} {'params':>8} {'own':>7} {'extra':>7} {'ratio':>6}")
    shapes = {"400M": {}, "1.5B": {"hidden_size": 2048, "ffn_hidden_size": 8192, "num_heads": 32}}
    for label, overrides in shapes.items():
        for tp, dp, stage in ((1, 64, 1), (2, 32, 1), (1, 64, 3), (1, 1, 0)):
            numel, own, extra = predicted("large", overrides, stage, tp, dp, "bf16")
            print(f"{label:<6} {f'TP={tp} x DP={dp}, ZeRO-{stage} bf16':<26} {numel / 1e6:>7.0f}M "
                  f"{own / 2**30:>7.2f} {extra / 2**30:>7.2f} {(own + extra) / own:>6.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--save"]:
        save_worker(*sys.argv[2:5])
    elif sys.argv[1:2] == ["--load"]:
        load_worker(*sys.argv[2:7])
    else:
        main(sys.argv[1:])
