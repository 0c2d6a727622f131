"""`janus-pretrain plan`: before booking GPUs, which layouts fit, how fast each runs, how long the
run takes.

    janus-pretrain plan --model large --objective janus --gpus 64 --gpus-per-node 8 \\
        --gpu-memory 80 --global-batch 2048 --tokens 2.1e12 [--node h100] [--json]

Every layout (TP size x ZeRO stage x micro-batch x activation checkpointing, DP = GPUs / TP, the
accumulation derived from the global batch as `train.global_batch` does: global batch =
micro-batch x accumulation x DP) is priced with the accounting the benchmarks check:
- memory per GPU: janus_pretrain/model/memory.py (model states, DeepSpeed buffers, the
  micro-batch's activations for this objective, the framework's fixed overhead);
- compute: the objective's own FLOP count of a collated micro-batch (`objective.flops`,
  model/flops.py) at the MFU the same objective reached on one H200 (MFU below), scaled to the
  node's matmul peak; activation checkpointing adds one forward (4/3 of the FLOPs);
- communication: janus_pretrain/model/comm.py's payloads over ring collectives, the DP group
  inside a node or across nodes, TP always inside a node; ZeRO 1-3 with `overlap_comm` hide
  gradient reduction behind backward (2/3 of compute; ZeRO-1 only the last micro-batch's) and
  ZeRO-3's gathers behind forward;
  TP's all-reduces sit on the critical path;
- the optimizer step: Adam reads and writes its partition's states once, at the node's memory
  bandwidth.
Layouts that fit are ranked by predicted tokens/s. Tokens are target (corpus) tokens: a sample
is one max_target_len block of text. The micro-batch's masked slots K (janus) and noised source
length come from the objective's collator run on full-length synthetic rows.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from janus_pretrain.config import RunConfig, load_config
from janus_pretrain.errors import JanusError
from janus_pretrain.model import memory
from janus_pretrain.objectives.micro_batch import micro_batch
from janus_pretrain.model import comm

# Model FLOP utilisation per objective: docs/performance.md, "One H200 (2026-12-04)", bf16,
# base shape, batch 16 x (256 + 256): ar = "bf16 ar sdpa" (19.0%), janus = "bf16 janus flex"
# (8.9%: the SDPA row is bimodal). BANG has no GPU row yet; its decoder pass is one masked pass
# over (1 + N) T rows like janus's two-stream pass, so it takes janus's figure until measured.
MFU = {"ar": 0.190, "janus": 0.089, "bang": 0.089}
# The bf16 matmul peak the MFU figures divide by: measured on the H200 before each row (673-680
# TFLOP/s). H100 SXM has the same compute die and clocks; A100 is scaled by the nominal ratio.
H200_MATMUL = 676e12


@dataclass(frozen=True)
class Node:
    """A GPU node kind: matmul peak (FLOP/s), memory bandwidth (B/s), per-GPU link bandwidth
    inside the node (NVLink) and to other nodes (its share of the NICs), bytes/s one way."""

    name: str
    matmul: float
    hbm: float
    intra: float
    inter: float


# Link rates are nominal one-way bandwidths times 0.8 (what ring collectives reach of a link is an
# assumption here, not a measurement: override with --intra-gbs / --inter-gbs).
NODES = {
    "h100": Node("8x H100 SXM, NVLink 4 (450 GB/s), 400 Gb/s IB per GPU", H200_MATMUL, 3.35e12,
                 0.8 * 450e9, 0.8 * 50e9),
    "h200": Node("8x H200 SXM, NVLink 4 (450 GB/s), 400 Gb/s IB per GPU", H200_MATMUL, 4.8e12,
                 0.8 * 450e9, 0.8 * 50e9),
    "a100": Node("8x A100 SXM, NVLink 3 (300 GB/s), 200 Gb/s IB per GPU",
                 H200_MATMUL * 312 / 989, 2.0e12, 0.8 * 300e9, 0.8 * 25e9),
}
OBJECTIVES = {
    "janus": ("configs/pretrain/base.yaml", ()),
    "ar": ("configs/pretrain/base.yaml", ("objective.weights.ce_ar=1", "objective.weights.ce_nar=0",
                                          "objective.weights.ce_aux=0",
                                          "objective.weights.kl_ar_aux=0",
                                          "objective.weights.kl_nar_aux=0")),
    "bang": ("configs/pretrain/bang_base.yaml", ()),
}
TP_SIZES = (1, 2, 4, 8)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEEPSPEED_JSON = "configs/deepspeed/zero{}.json"


@dataclass
class Cluster:
    gpus: int
    gpus_per_node: int
    gpu_memory: float  # bytes
    node: Node


@dataclass
class Layout:
    tp: int
    dp: int
    zero: int
    micro_batch: int
    grad_accum: int
    checkpointing: str
    memory: dict  # bytes by part
    step: dict  # seconds by part
    tokens_per_s: float
    days: float

    @property
    def peak(self) -> float:
        return sum(self.memory.values())


def run_config(objective: str, model: str, overrides: tuple[str, ...] = ()) -> RunConfig:
    path, extra = OBJECTIVES[objective]
    return load_config(path, [f"model={model}", "parallel.precision=bf16", *extra, *overrides])


def micro_batch_host(cfg: RunConfig, objective, rows: int) -> dict:
    """A collated micro-batch of `rows` full-length synthetic targets (the collator's masking
    and noise decide K and the source length)."""
    rng = np.random.default_rng(0)
    n = cfg.data.max_target_len - 2
    return objective.collate([(None, rng.integers(5, 1000, n)) for _ in range(rows)], rng)


def ring_time(payloads: dict[str, float], group: int, bandwidth: float) -> float:
    return sum(b * comm.wire_factor(kind.split("/")[0], group) for kind, b in payloads.items()
               ) / bandwidth


def price(cfg: RunConfig, objective_name: str, cluster: Cluster, vocab: int, tp: int, zero: int,
          micro: int, checkpointing: str, global_batch: int, tokens: float, host: dict,
          objective) -> Layout:
    """Memory, step time and speed of one layout."""
    from janus_pretrain.train.deepspeed_json import resolve_path

    dp = cluster.gpus // tp
    accum = global_batch // (micro * dp)
    precision = cfg.parallel.precision
    ds = json.loads(resolve_path(DEEPSPEED_JSON.format(zero)).read_text())
    sizes = memory.parameter_sizes(cfg.model, vocab, tp, cfg.objective.is_bang)
    numel = sum(sizes)
    mb = micro_batch(objective, host)
    ckpt = checkpointing == "full"
    states = memory.model_states(numel, zero, dp, precision, memory.ZeroBuckets.from_json(ds))
    acts = memory.activations(cfg.model, vocab, mb, tp, precision, ckpt)
    parts = {**memory.peak_parts(states, acts), "overhead": memory.FRAMEWORK_OVERHEAD}

    node = cluster.node
    flops = objective.flops(host, cfg.model, vocab) * (4 / 3 if ckpt else 1) / tp * accum
    compute = flops / (MFU[objective_name] * node.matmul)
    zc = comm.ZeroComm.from_json(ds)
    trained = memory.trained_count(cfg, vocab, tp)
    payload = comm.step_bytes(cfg.model, mb, sizes, trained, zc, dp, tp, precision, ckpt, accum)
    dp_bw = node.inter if tp * dp > cluster.gpus_per_node else node.intra
    tp_time = ring_time({k: v for k, v in payload.items() if k.endswith("/tp")}, tp, node.intra)
    dp_payload = {k: v for k, v in payload.items() if k.endswith("/dp")}
    if zc.overlap_comm and zero >= 1:
        # Gradient reductions hide behind backward (2/3 of compute): every micro-batch's at ZeRO
        # 2/3, the last micro-batch's only at ZeRO-1, which reduces once per step; ZeRO-3's
        # gathers hide behind forward (1/3); the all-gather of updated parameters after the step
        # at ZeRO 1/2 hides behind nothing.
        reduce = {k: v for k, v in dp_payload.items() if k != "all_gather/dp"}
        gather = {k: v for k, v in dp_payload.items() if k == "all_gather/dp"}
        window = 2 * compute / 3 / (accum if zero == 1 else 1)
        dp_time = max(0.0, ring_time(reduce, dp, dp_bw) - window)
        dp_time += (max(0.0, ring_time(gather, dp, dp_bw) - compute / 3) if zero == 3
                    else ring_time(gather, dp, dp_bw))
    else:
        dp_time = ring_time(dp_payload, dp, dp_bw)
    # Adam over this rank's partition: read and write params, grads, m, v and the fp32 master
    width = memory.WIDTH[precision]
    optimizer = 2 * (2 * width + 12) * numel / (dp if zero >= 1 else 1) / node.hbm
    step = {"compute": compute, "comm": tp_time + dp_time, "optimizer": optimizer}
    tokens_per_s = global_batch * (cfg.data.max_target_len - 2) / sum(step.values())
    return Layout(tp, dp, zero, micro, accum, checkpointing, parts, step, tokens_per_s,
                  tokens / tokens_per_s / 86400)


def layouts(cfg: RunConfig, objective_name: str, cluster: Cluster, vocab: int, global_batch: int,
            tokens: float) -> list[Layout]:
    """Every layout the cluster and global batch allow, fitting or not, fastest first."""
    from janus_pretrain.objectives.build import build_objective

    objective = build_objective(cfg)
    hosts: dict[int, dict] = {}
    out = []
    for tp in TP_SIZES:
        if (tp > cluster.gpus_per_node or cluster.gpus % tp or cfg.model.num_heads % tp
                or cfg.model.vocab_divisible_by % tp):
            continue
        dp = cluster.gpus // tp
        for micro in MICRO_BATCHES:
            if global_batch % (micro * dp):
                continue
            if micro not in hosts:
                hosts[micro] = micro_batch_host(cfg, objective, micro)
            for zero in (0, 1, 2, 3):
                for ckpt in ("none", "full"):
                    out.append(price(cfg, objective_name, cluster, vocab, tp, zero, micro, ckpt,
                                     global_batch, tokens, hosts[micro], objective))
    return sorted(out, key=lambda x: (-x.tokens_per_s, x.peak))


def chosen_layout(fits: list[Layout], within: float = 0.02) -> Layout:
    """Among the layouts within `within` of the fastest: the largest micro-batch (the MFU was
    measured at 16 sequences of 256 tokens; small micro-batches are likelier to run below it
    than the model says), then the lowest ZeRO stage and TP size (fewer collectives whose
    overlap the model assumes), then no recomputation."""
    near = [r for r in fits if r.tokens_per_s >= (1 - within) * fits[0].tokens_per_s]
    return min(near, key=lambda r: (-r.micro_batch, r.zero, r.tp, r.checkpointing != "none",
                                    -r.tokens_per_s))


def overrides(cfg: RunConfig, model: str, objective: str, layout: Layout, global_batch: int,
              tokens: float) -> list[str]:
    """The config overrides that run `layout`: the global batch as `train.global_batch` where the
    config has it (the accumulation then derives from DP), else as `train.grad_accum`."""
    steps = math.ceil(tokens / (global_batch * (cfg.data.max_target_len - 2)))
    batch = (f"train.global_batch={global_batch}" if hasattr(cfg.train, "global_batch")
             else f"train.grad_accum={layout.grad_accum}")
    return [f"model={model}", *OBJECTIVES[objective][1], "parallel.precision=bf16",
            f"parallel.tensor_parallel={layout.tp}",
            f"parallel.deepspeed_config={DEEPSPEED_JSON.format(layout.zero)}",
            f"data.micro_batch_size={layout.micro_batch}", batch,
            f"model.activation_checkpointing={layout.checkpointing}", f"train.steps={steps}"]


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def table(rows: list[Layout], limit: int | None, gpu_memory: float) -> str:
    head = ("| TP | DP | ZeRO | micro | accum | ckpt | params | grads | optim | buffers | "
            "activations | overhead | GiB/GPU | fits | compute ms | comm ms | optim ms | "
            "step ms | tokens/s | days |")
    lines = [head, "|" + "---:|" * 5 + "---|" + "---:|" * 7 + "---|" + "---:|" * 6]
    for r in rows[:limit]:
        m, s = r.memory, r.step
        lines.append(
            f"| {r.tp} | {r.dp} | {r.zero} | {r.micro_batch} | {r.grad_accum} | {r.checkpointing} "
            f"| {_gib(m['params'])} | {_gib(m['grads'])} | {_gib(m['optimizer'])} "
            f"| {_gib(m['buffers'])} | {_gib(m['activations'])} | {_gib(m['overhead'])} "
            f"| {_gib(r.peak)} | {'yes' if r.peak <= gpu_memory else 'no'} "
            f"| {1e3 * s['compute']:.0f} | {1e3 * s['comm']:.0f} "
            f"| {1e3 * s['optimizer']:.0f} | {1e3 * sum(s.values()):.0f} | {r.tokens_per_s:,.0f} "
            f"| {r.days:.1f} |")
    return "\n".join(lines)


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="janus-pretrain plan",
                                     description=__doc__.splitlines()[0])
    p.add_argument("--model", default="large", help="a preset of configs/model/ (default large)")
    p.add_argument("--objective", default="janus", choices=sorted(OBJECTIVES))
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    p.add_argument("--global-batch", type=int, required=True,
                   help="sequences per optimizer step (train.global_batch): micro-batch x "
                        "accumulation x DP")
    p.add_argument("--tokens", type=float, required=True, help="target tokens of the whole run")
    p.add_argument("--node", default="h100", choices=sorted(NODES), help="link and peak preset")
    p.add_argument("--intra-gbs", type=float, help="per-GPU bandwidth inside a node, GB/s")
    p.add_argument("--inter-gbs", type=float, help="per-GPU bandwidth between nodes, GB/s")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--top", type=int, default=10, help="layouts shown (0: all that fit)")
    p.add_argument("--all", action="store_true", help="also list the layouts that do not fit")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("overrides", nargs="*",
                   help="key=value config overrides (e.g. model.hidden_size=2048)")
    return p


def cluster_of(args) -> Cluster:
    for name in ("gpus", "gpus_per_node", "global_batch", "vocab"):
        if getattr(args, name) <= 0:
            raise JanusError(f"plan: --{name.replace('_', '-')} must be positive")
    if args.gpu_memory <= 0 or args.tokens <= 0:
        raise JanusError("plan: --gpu-memory and --tokens must be positive")
    if args.gpus % args.gpus_per_node and args.gpus > args.gpus_per_node:
        raise JanusError(f"plan: --gpus {args.gpus} is not a whole number of nodes of "
                         f"--gpus-per-node {args.gpus_per_node}")
    node = NODES[args.node]
    for name in ("intra_gbs", "inter_gbs"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise JanusError(f"plan: --{name.replace('_', '-')} must be positive")
    if args.intra_gbs is not None or args.inter_gbs is not None:
        node = Node(node.name + " (links overridden)", node.matmul, node.hbm,
                    node.intra if args.intra_gbs is None else args.intra_gbs * 1e9,
                    node.inter if args.inter_gbs is None else args.inter_gbs * 1e9)
    return Cluster(args.gpus, min(args.gpus_per_node, args.gpus), args.gpu_memory * 2**30, node)


@dataclass
class Plan:
    """The layouts priced for one cluster and run, fastest first, and the one chosen."""

    cluster: Cluster
    model: str
    objective: str
    parameters: int
    rows: list[Layout]  # those that fit (every layout with --all)
    chosen: Layout
    overrides: list[str]
    sbatch: str

    def to_json(self) -> dict:
        memory_limit = self.cluster.gpu_memory
        return {"cluster": asdict(self.cluster), "model": self.model, "objective": self.objective,
                "parameters": self.parameters,
                "layouts": [asdict(r) | {"peak": r.peak, "fits": r.peak <= memory_limit}
                            for r in self.rows],
                "chosen": asdict(self.chosen) | {"peak": self.chosen.peak},
                "overrides": self.overrides, "sbatch": self.sbatch}

    def render(self, top: int) -> str:
        c, best = self.cluster, self.chosen
        return "\n".join([
            f"{self.model} ({self.parameters / 1e6:,.0f}M parameters), objective "
            f"{self.objective}, {c.gpus} GPUs of {c.gpu_memory / 2**30:g} GiB, "
            f"{c.gpus_per_node} per node ({c.node.name})",
            f"{len(self.rows)} layouts listed, fastest first:", "",
            table(self.rows, top or None, c.gpu_memory), "",
            f"chosen: TP {best.tp} x DP {best.dp}, ZeRO {best.zero}, micro-batch "
            f"{best.micro_batch} x {best.grad_accum} accumulated, checkpointing "
            f"{best.checkpointing}: {_gib(best.peak)} GiB/GPU, {best.tokens_per_s:,.0f} tokens/s, "
            f"{best.days:.1f} days",
            "overrides: " + " ".join(self.overrides),
            self.sbatch])


def plan(args) -> Plan:
    cluster = cluster_of(args)
    cfg = run_config(args.objective, args.model, tuple(args.overrides))
    rows = layouts(cfg, args.objective, cluster, args.vocab, args.global_batch, args.tokens)
    if not rows:
        raise JanusError(f"plan: --global-batch {args.global_batch} is not a multiple of "
                         f"micro-batch x DP for any layout of {args.gpus} GPUs (try a multiple of "
                         f"{args.gpus})")
    fits = [r for r in rows if r.peak <= cluster.gpu_memory]
    if not fits:
        least = min(rows, key=lambda r: r.peak)
        raise JanusError(f"plan: no layout fits in {args.gpu_memory:g} GiB per GPU; the smallest "
                         f"needs {_gib(least.peak)} GiB (TP {least.tp}, ZeRO {least.zero}, "
                         f"micro-batch {least.micro_batch}, checkpointing {least.checkpointing})")
    best = chosen_layout(fits)
    chosen = overrides(cfg, args.model, args.objective, best, args.global_batch,
                       args.tokens) + list(args.overrides)
    nodes = max(1, args.gpus // cluster.gpus_per_node)
    sbatch = (f"sbatch --nodes={nodes} --gpus-per-node={cluster.gpus_per_node} "
              f"slurm/pretrain.sbatch {OBJECTIVES[args.objective][0]} " + " ".join(chosen))
    return Plan(cluster, args.model, args.objective,
                memory.parameter_count(cfg.model, args.vocab, 1, cfg.objective.is_bang),
                rows if args.all else fits, best, chosen, sbatch)


def main(args) -> None:
    result = plan(args)
    print(json.dumps(result.to_json(), indent=1) if args.json else result.render(args.top))
