"""`janus-finetune evaluate`: decode a task's test split in every setting, score it, time it.

Settings are AR beam search (the task's beam) and greedy (`ar_greedy`), NAR mask-predict with
T = 1, 4 and 10, BANG's one-pass NAR (`bang_nar`) and speculative decoding (`spec_exact`: AR
greedy's output, drafted by the NAR stream; `spec_relaxed`: GAD++'s acceptance) for checkpoints
that trained both AR and NAR (generate/spec.py); a checkpoint is only decoded in the modes its objective trained
(ObjectiveConfig.decoding_modes: the `ar` ablation has no NAR stream worth decoding, `cmlm`
no AR one, `bang_ar` decodes AR with its predicting stream, `bang_nar` only in one pass).
Two timings per setting, on this machine: `latency_ms` is wall time per sentence decoding one
sentence at a time (the first `latency_sentences` of the split), `sentences_per_s` is the
throughput of decoding the whole split in batches; greedy and spec rows add
`passes_per_sentence` (decoder passes, batch 1) and spec rows `tokens_per_iteration`. Results go to one JSON file, with the
hardware they were measured on, and the run's in-loop validation curve (`train.eval_interval`)
when its metrics.jsonl has one.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from janus_pretrain.checkpoint.weights import resolve
from janus_pretrain.generate.api import DecodeOptions, Generator
from janus_pretrain.train.validation import read_best
from finetune import metrics
from finetune.tasks import TaskSpec, read_split

NAR_ITERATIONS = (1, 4, 10)


def settings(task: TaskSpec, gen: Generator) -> dict[str, dict]:
    """Setting name (the W&B mode names: docs/training.md, Logging) -> DecodeOptions keywords."""
    d, modes = task.decoding, gen.cfg.objective.decoding_modes()
    out = {}
    if "ar" in modes:
        out[f"ar_beam{d.beam}"] = dict(mode="ar", beam=d.beam, length_penalty=d.length_penalty,
                                       max_len=d.max_len)
        out["ar_greedy"] = dict(mode="ar", beam=1, max_len=d.max_len)
    if "nar" in modes:
        out.update({f"nar_T{t}": dict(mode="nar", iterations=t, max_len=d.max_len)
                    for t in NAR_ITERATIONS})
    if "ar" in modes and "nar" in modes and gen.cfg.objective.kind == "janus":
        out.update({f"spec_{a}": dict(mode="spec", spec_accept=a, max_len=d.max_len)
                    for a in ("exact", "relaxed")})
    if "bang_nar" in modes:
        out["bang_nar"] = dict(mode="bang_nar", max_len=d.max_len)
    return out


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu": cpu, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__}


def validation_curve(task: TaskSpec, checkpoint: Path) -> list[dict]:
    """The in-loop validation lines (`eval/<task>/...`, with their step) of the run a checkpoint
    belongs to (`<run>/checkpoints/<name>`), oldest first; [] where it has none."""
    log = checkpoint.parent.parent / "metrics.jsonl"
    if not log.is_file():
        return []
    prefix = f"eval/{task.name}/"
    lines = (json.loads(line) for line in log.read_text().splitlines() if line.strip())
    return [{"step": d["step"], **{k[len(prefix):]: v for k, v in d.items()
                                   if k.startswith(prefix)}}
            for d in lines if any(k.startswith(prefix) for k in d)]


def evaluate(task: TaskSpec, checkpoint: str, split: str = "test", limit: Optional[int] = None,
             latency_sentences: int = 50, batch_size: int = 32, name: Optional[str] = None,
             root: Optional[str] = None) -> dict:
    """-> {"task", "system", "checkpoint", "settings": {setting: {metric: value, latency_ms,
    sentences_per_s}}, ...}; also keeps a few sample outputs per setting."""
    sources, refs = read_split(task, split, root)
    sources, refs = sources[:limit], refs[:limit]
    ckpt = resolve(checkpoint)
    gen = Generator.from_checkpoint(ckpt)
    encoded = gen.source_ids(sources)
    results = {}
    for setting, options in settings(task, gen).items():
        start = time.perf_counter()
        hyps = gen.generate(sources, batch_size=batch_size, **options)
        elapsed = time.perf_counter() - start
        k = min(latency_sentences, len(sources))
        start = time.perf_counter()
        gen.decode_ids(encoded[:k], DecodeOptions(**options, batch_size=1))  # one at a time
        latency = (time.perf_counter() - start) / max(k, 1)
        scores = metrics.score(task.metrics, hyps, refs)
        counted = {"passes_per_sentence": gen.stats.passes_per_sentence} if gen.stats.passes else {}
        if options["mode"] == "spec":
            counted["tokens_per_iteration"] = gen.stats.tokens_per_iteration
        results[setting] = {**scores, "latency_ms": 1000 * latency, **counted,
                            "sentences_per_s": len(sources) / elapsed,
                            "samples": [{"source": s, "reference": r, "output": h}
                                        for s, r, h in list(zip(sources, refs, hyps))[:3]]}
        shown = ", ".join(f"{m} {v:.2f}" if v is not None else f"{m} n/a"
                          for m, v in scores.items())
        print(f"evaluate: {task.name} {setting}: {shown}; {1000 * latency:.1f} ms/sentence, "
              f"{len(sources) / elapsed:.1f} sentences/s", flush=True)
    notes = sorted({n for r in results.values() for n in metrics.unavailable(r)})
    return {"task": task.name, "split": split, "sentences": len(sources),
            "system": name or ckpt.parent.parent.name, "checkpoint": str(ckpt),
            "objective": gen.cfg.objective.masking, "kind": gen.cfg.objective.kind,
            "weights": vars(gen.cfg.objective.weights),
            "metrics": list(task.metrics), "settings": results, "notes": notes,
            "hardware": hardware(), "validation_curve": validation_curve(task, ckpt),
            "selected": read_best(ckpt)}


def write(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return path
