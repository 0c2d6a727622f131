"""Phase a of the one-GPU run (docs/gpu.md): the CUDA-only paths checked for correctness.

    python -m janus_pretrain.bench cuda --json PATH [--dry-run-cpu]

Checks (each independent: a failure is recorded and the next runs; --json is rewritten after
each, so a run cut short keeps the finished ones; the exit status is 1 if any failed):
    bf16_step        bf16 janus steps (bf16 weights, fp32 AdamW masters) lower the loss of a batch
    loss_scale_skip  a DeepSpeed fp16 step (dynamic loss scaling) whose gradient is made
                     non-finite is skipped: weights unchanged, loss scale lowered; the next step
                     updates (the NonFiniteGuard protocol of train/loop.py)
    zero2            DeepSpeed ZeRO-2 at world size 1 (NCCL on CUDA) gives ZeRO-0's losses
    checkpointing    activation_checkpointing=full gives the loss and gradients of none, dropout on
    decode           a tiny janus model trained on CPU for a few seconds (a copy task): AR greedy,
                     AR beam 5, NAR mask-predict T=4 and spec (exact) on the device produce the
                     CPU's tokens, sentence for sentence
    flex_sdpa        FlexAttention vs SDPA on the two-stream mask, bf16: the kernel's output and
                     q/k/v gradients, and a janus model's loss and gradients (model.attention)
Bf16 tolerances compare relative norms (|a - b| / |b| per tensor), since elementwise bf16 noise
is large where values are near zero. The dry run (CPU, gloo) runs every check but flex_sdpa
(no flex backward on CPU) at tiny shapes; there the fp16 check runs bf16 (DeepSpeed refuses fp16
on CPU) and the decode check compares CPU with CPU.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

from janus_pretrain.bench.train import device_run, Bf16Master, adamw, host_batches, objective_config
from janus_pretrain.model import JanusModel
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD

BF16_REL = 2e-2  # relative norm error allowed between two bf16 computations of the same thing
NO_DROPOUT = ("model.dropout=0", "model.attention_dropout=0")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def worst_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max(rel_error(a[k], b[k]) for k in a)


def device_batch(cfg, objective, args, device) -> dict:
    return {k: v.to(device) for k, v in host_batches(cfg, objective, args, 1)[0].items()}


def loss_and_grads(name: str, args, device, dtype, overrides: tuple) -> tuple:
    """Loss and parameter gradients of one forward/backward, weights and dropout seeded."""
    cfg, objective = objective_config(name, args, overrides)
    torch.manual_seed(0)
    model = JanusModel(cfg.model, args.vocab, PAD).to(device=device, dtype=dtype).train()
    batch = device_batch(cfg, objective, args, device)
    torch.manual_seed(1)
    prep = objective.prepare(batch)
    loss, _ = objective.loss(model(**prep.model_inputs), prep)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                   if p.grad is not None}


def check_flex_sdpa(device, args) -> dict:
    from janus_pretrain.model.flex import FlexMask

    cfg, objective = objective_config("janus", args, NO_DROPOUT)
    rule = objective.prepare(device_batch(cfg, objective, args, device)).model_inputs["nar_mask"]
    mask = rule.dense()
    b, t, s = mask.shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, 4, t, 64, device=device, dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for _ in range(3))
    outs, grads = {}, {}
    for kind in ("flex", "sdpa"):
        out = (FlexMask.rule(rule).attend(q, k, v) if kind == "flex" else
               F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]))
        outs[kind] = {"out": out.detach()}
        grads[kind] = dict(zip("qkv", torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    kernel = {"out": worst_rel(outs["flex"], outs["sdpa"]),
              "grads": worst_rel(grads["flex"], grads["sdpa"])}
    model = {kind: loss_and_grads("janus", args, device, torch.bfloat16,
                                  NO_DROPOUT + (f"model.attention={kind}",))
             for kind in ("flex", "sdpa")}
    found = {"kernel_out": kernel["out"], "kernel_grads": kernel["grads"],
             "model_loss": rel_error(model["flex"][0], model["sdpa"][0]),
             "model_grads": worst_rel(model["flex"][1], model["sdpa"][1])}
    assert max(found.values()) < BF16_REL, found
    return found


def check_bf16_step(device, args) -> dict:
    cfg, objective = objective_config("janus", args, NO_DROPOUT)
    torch.manual_seed(0)
    model = JanusModel(cfg.model, args.vocab, PAD).to(device=device, dtype=torch.bfloat16).train()
    opt = Bf16Master([p for p in model.parameters() if p.requires_grad], adamw)
    batch = device_batch(cfg, objective, args, device)
    losses = []
    for _ in range(args.steps_to_learn):
        torch.manual_seed(1)
        prep = objective.prepare(batch)
        loss, _ = objective.loss(model(**prep.model_inputs), prep)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
    return {"losses": losses}


def engine_for(name: str, precision: str, stage: int, args, overrides: tuple = ()):
    from janus_pretrain.train.engine import build_engine

    cfg, objective = objective_config(name, args, overrides + (
        f"parallel.precision={precision}",
        f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json",
        f"data.micro_batch_size={args.batch}", "optim.warmup_steps=0"))
    torch.manual_seed(0)
    return build_engine(JanusModel(cfg.model, args.vocab, PAD), cfg), cfg, objective


def check_loss_scale_skip(device, args) -> dict:
    from janus_pretrain.train.nonfinite import NonFiniteGuard

    precision = "bf16" if device.type == "cpu" else "fp16"
    engine, cfg, objective = engine_for("ar", precision, 0, args, NO_DROPOUT)
    guard = NonFiniteGuard(engine)
    batch = device_batch(cfg, objective, args, device)
    # DeepSpeed's fp16 property; bf16 has no loss scale (MasterWeights without ZeRO)
    scale = lambda: getattr(engine.optimizer, "loss_scale", None)  # noqa: E731
    weights = lambda: [p.detach().float().clone() for p in engine.module.parameters()]  # noqa: E731

    def step(factor: float) -> None:
        prep = objective.prepare(batch)
        loss, _ = objective.loss(engine(**prep.model_inputs), prep)
        guard.add_loss(loss * factor)
        engine.backward(loss * factor)  # factor inf: every gradient inf or nan
        guard.before_update(False)
        engine.step()
        guard.after_update()
        guard.settle()

    before, scale_before = weights(), scale()
    step(math.inf)
    skipped, after_bad, scale_after = engine.skipped_steps, weights(), scale()
    step(1.0)
    moved = max(float((a - b).abs().max()) for a, b in zip(weights(), after_bad))
    found = {"precision": precision, "skipped_steps": skipped, "scale_before": scale_before,
             "scale_after": scale_after, "moved_by_good_step": moved,
             "unchanged_by_bad_step": all(torch.equal(a, b) for a, b in zip(before, after_bad))}
    assert skipped == 1 and engine.skipped_steps == 1 and found["unchanged_by_bad_step"], found
    assert moved > 0, found
    assert precision == "bf16" or scale_after < scale_before, found
    return found


def check_zero2(device, args) -> dict:
    import torch.distributed as dist

    losses = {}
    for stage in (0, 2):
        engine, cfg, objective = engine_for("janus", "bf16", stage, args, NO_DROPOUT)
        batch = device_batch(cfg, objective, args, device)
        losses[stage] = []
        for _ in range(3):
            torch.manual_seed(1)
            prep = objective.prepare(batch)
            loss, _ = objective.loss(engine(**prep.model_inputs), prep)
            engine.backward(loss)
            engine.step()
            losses[stage].append(float(loss))
    found = {"backend": dist.get_backend(), "zero0": losses[0], "zero2": losses[2]}
    assert max(abs(a - b) / abs(b) for a, b in zip(losses[2], losses[0])) < BF16_REL, found
    assert device.type == "cpu" or found["backend"] == "nccl", found
    return found


def check_checkpointing(device, args) -> dict:
    plain = loss_and_grads("janus", args, device, torch.float32, ("model.dropout=0.3",))
    ckpt = loss_and_grads("janus", args, device, torch.float32,
                          ("model.dropout=0.3", "model.activation_checkpointing=full"))
    found = {"loss": rel_error(ckpt[0], plain[0]), "grads": worst_rel(ckpt[1], plain[1])}
    assert max(found.values()) < 1e-5, found
    return found


def copy_task(objective, args, n: int, rng) -> dict:
    return objective.collate([(x, x) for x in (rng.integers(5, args.vocab, rng.integers(4, 12))
                                               for _ in range(n))], rng)


def check_decode(device, args) -> dict:
    from janus_pretrain.generate.api import DecodeOptions, Generator

    cfg, objective = objective_config("janus", args, NO_DROPOUT)
    torch.manual_seed(0)
    model = JanusModel(cfg.model, args.vocab, PAD).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    for _ in range(args.decode_train_steps):
        prep = objective.prepare(copy_task(objective, args, 32, rng))
        loss, _ = objective.loss(model(**prep.model_inputs), prep)
        loss.backward()
        opt.step()
        opt.zero_grad()
    sources = [s[s != PAD] for s in copy_task(objective, args, 16, rng)["src"].numpy()]
    cpu = Generator(model, None, cfg, torch.device("cpu"))
    twin = JanusModel(cfg.model, args.vocab, PAD)  # no deepcopy: the layers hold process groups
    twin.load_state_dict(model.state_dict())
    dev = Generator(twin.to(device), None, cfg, device)
    modes = {"ar_greedy": dict(mode="ar", beam=1), "ar_beam5": dict(mode="ar", beam=5),
             "nar_T4": dict(mode="nar", iterations=4), "spec_exact": dict(mode="spec")}
    found = {"train_loss": loss.item()}
    for name, options in modes.items():
        opts = DecodeOptions(max_len=24, **options)
        want = [h.tokens for h in cpu.decode_ids(sources, opts)]
        got = [h.tokens for h in dev.decode_ids(sources, opts)]
        found[name] = {"equal": sum(map(np.array_equal, want, got)), "of": len(want)}
    assert all(found[m]["equal"] == found[m]["of"] for m in modes), found
    return found


# flex_sdpa last: compiling it is the slowest, and a run cut short keeps the others.
CHECKS = {"bf16_step": check_bf16_step, "loss_scale_skip": check_loss_scale_skip,
          "zero2": check_zero2, "checkpointing": check_checkpointing, "decode": check_decode,
          "flex_sdpa": check_flex_sdpa}
SHAPES = {False: dict(model="tiny", batch=8, src_len=64, tgt_len=64, vocab=1000, steps_to_learn=5,
                      decode_train_steps=200),
          True: dict(model="tiny", batch=2, src_len=16, tgt_len=16, vocab=64, steps_to_learn=3,
                     decode_train_steps=3)}


def main(argv: list[str]) -> None:
    args, device = device_run("cuda", __doc__.splitlines()[0], argv, SHAPES, "flex_sdpa")
    results = {}
    only = os.environ.get("CHECKS", "").split() or list(CHECKS)  # gpu_run.sh's rerun of a few
    if unknown := sorted(set(only) - set(CHECKS)):
        sys.exit(f"bench cuda: CHECKS names no check {unknown}; the checks: {' '.join(CHECKS)}")
    for name, check in ((n, CHECKS[n]) for n in only):
        start = time.perf_counter()
        if name == "flex_sdpa" and device.type == "cpu":
            results[name] = {"status": "skipped", "why": "no flex backward on CPU"}
        else:
            try:
                results[name] = {"status": "pass", **check(device, args)}
            except Exception as e:  # noqa: BLE001 - a failed check is a result, the next one runs
                traceback.print_exc()
                results[name] = {"status": "fail", "error": f"{type(e).__name__}: {e}"[:2000]}
        results[name]["seconds"] = time.perf_counter() - start
        print(f"cuda check {name:<16} {results[name]['status']:<8} "
              f"{results[name]['seconds']:6.1f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"device": str(device), "checks": results}, indent=1))
    state.shutdown()
    if any(r["status"] == "fail" for r in results.values()):
        sys.exit(1)
