"""What a run reports: loss terms and throughput accumulated on the device, averaged over the
data-parallel group at each log interval, and written by rank 0 to the console (tqdm),
`<output_dir>/metrics.jsonl` and W&B; at the end, plotted to `<output_dir>/loss.png` (curves.py).

W&B runs offline unless WANDB_MODE says otherwise or WANDB_API_KEY is set; the offline run
directory is printed at the end so it can be `wandb sync`-ed. A resumed run continues the same
W&B run (its id is kept in `<output_dir>/wandb_run_id`), so a requeued job is one run; each
invocation writes its own offline directory `wandb/offline-run-<time>-<id>`, and syncing them
all, in order, fills the one run; a resumed invocation first sends again, from metrics.jsonl, the
steps a killed one may never have handed to W&B. WANDB_MODE=disabled writes metrics.jsonl alone and never
imports wandb (the one-GPU run carries no wandb: docs/gpu.md).
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from janus_pretrain.objectives.build import TERMS
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD
from janus_pretrain.train.curves import plot_curves


WANDB_ID_FILE = "wandb_run_id"
# The last step an invocation handed to W&B and saw W&B finish with (written by `close`).
WANDB_SYNCED_FILE = "wandb_synced_step"


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def real_tokens(host: dict[str, torch.Tensor]) -> int:
    """Non-padding source + target tokens of a collated batch: what tokens/s counts."""
    return int((host["src"] != PAD).sum() + (host["tgt"] != PAD).sum())


class StepStats:
    """Loss terms and token counts accumulated on the device between log intervals."""

    def __init__(self, device: torch.device, present: set[str]):
        self.device = device
        self.present = present
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(TERMS) + 1, device=self.device, dtype=torch.float64)
        self.step_sums = torch.zeros_like(self.sums)
        self.zero = torch.zeros((), device=self.device)  # the value of a term a batch lacks
        self.step_micro_batches = 0
        self.micro_batches = torch.zeros((), device=self.device, dtype=torch.float64)
        self.tokens = 0
        self.flops = 0.0
        self.start = time.perf_counter()

    def add(self, total: torch.Tensor, terms: dict[str, torch.Tensor],
            host: dict[str, torch.Tensor], flops: float) -> None:
        values = [terms.get(t, self.zero) for t in TERMS]
        self.step_sums += torch.stack([total.detach(), *values]).double()
        self.step_micro_batches += 1
        self.tokens += real_tokens(host)
        self.flops += flops

    def end_step(self, skipped: torch.Tensor | bool) -> None:
        """A skipped step's (non-finite) losses stay out of the averages; `skipped` may be a
        device flag (1.0 = skipped), so that no host sync decides it."""
        kept = 1.0 - torch.as_tensor(skipped, device=self.device, dtype=torch.float64)
        self.sums += torch.nan_to_num(self.step_sums) * kept
        self.micro_batches += self.step_micro_batches * kept
        self.step_sums.zero_()
        self.step_micro_batches = 0

    def reduce(self, prefix: str = "train") -> dict[str, float]:
        """Average over micro-batches and data-parallel ranks (a collective), then start anew:
        `<prefix>/loss`, `<prefix>/<term>`, and the throughput under `perf/`."""
        counts = torch.tensor([self.tokens, self.flops], device=self.device, dtype=torch.float64)
        group = state.data_parallel_group()
        dist.all_reduce(self.sums, group=group)
        dist.all_reduce(counts, group=group)
        dp = state.data_parallel_size()
        means = (self.sums / (self.micro_batches * dp)).tolist()
        elapsed = time.perf_counter() - self.start
        out = {f"{prefix}/loss": means[0]}
        out.update({f"{prefix}/{t}": v for t, v in zip(TERMS, means[1:]) if t in self.present})
        tokens, flops = counts.tolist()
        out["perf/tokens_per_s"] = tokens / elapsed
        out["perf/flops_per_s"] = flops / state.tensor_parallel_size() / elapsed
        self.reset()
        return out


def _logged_step(line: str) -> Optional[int]:
    """The step of a complete metrics.jsonl line; None for a line that a crash cut short."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


def drop_metrics_after(path: Path, step: int) -> None:
    """Steps past the checkpoint we resume from (logged before a crash) will be logged again;
    so will a line that a crash cut short."""
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if (logged := _logged_step(line)) is not None and logged <= step]
    path.write_text("".join(kept))


def wandb_run_id(output_dir: Path, start_step: int) -> str:
    """The run's W&B id, kept in `<output_dir>/wandb_run_id`: a resumed (requeued) invocation
    continues the same W&B run; a fresh one (step 0) starts a new run."""
    path = output_dir / WANDB_ID_FILE
    if start_step and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B's own ids are 8 characters of [a-z0-9]
    path.write_text(run_id + "\n")
    return run_id


class RunLogger:
    """Decides when to log (every `log_interval` steps and at the last step) and writes the
    metrics; every rank calls `after_step` (the averaging is a collective), rank 0 writes."""

    def __init__(self, enabled: bool, output_dir: Path, total_steps: int, start_step: int,
                 log_interval: int, peak_flops: float, project: str, name: Optional[str],
                 config: dict):
        self.enabled, self.log_interval, self.peak_flops = enabled, log_interval, peak_flops
        self.file = output_dir / "metrics.jsonl"
        self.first: Optional[dict] = None
        self.last: Optional[dict] = None
        self.steps_since_log = 0
        self.run = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        # W&B cannot take back logged steps, and a killed invocation's steps may never have left
        # its process (W&B writes its .wandb file every 15 s). So a resumed run sends again,
        # from metrics.jsonl, every step after the last one a finished invocation handed over
        # (WANDB_SYNCED_FILE), then logs past it; W&B keeps a step's first value, and resuming
        # is exact, so a step it already has keeps the same value.
        synced = output_dir / WANDB_SYNCED_FILE
        self.wandb_from = int(synced.read_text()) if start_step and synced.is_file() else 0
        synced.unlink(missing_ok=True)  # until this invocation finishes
        self.wandb_last = self.wandb_from
        if self.file.is_file():
            drop_metrics_after(self.file, start_step)
        if wandb_mode() != "disabled":
            import wandb

            self.run = wandb.init(project=project, name=name, dir=str(output_dir), config=config,
                                  mode=wandb_mode(), id=wandb_run_id(output_dir, start_step),
                                  resume="allow")
            # Online, a resumed W&B run knows the steps its server holds.
            self.wandb_from = max(self.wandb_from, self.run.starting_step - 1)
            for line in self.file.read_text().splitlines() if self.file.is_file() else ():
                logged = json.loads(line)
                self._log_wandb(logged.pop("step"), logged)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        mininterval=1.0)

    def after_step(self, step: int, done: bool, stats: StepStats, engine) -> None:
        self.steps_since_log += 1
        if step % self.log_interval and not done:
            return
        metrics = stats.reduce()
        metrics["train/lr"] = engine.get_lr()[0]
        norm = engine.get_global_grad_norm()
        if norm is not None:
            metrics["train/grad_norm"] = float(norm)
        metrics["train/skipped_steps"] = engine.skipped_steps
        metrics["perf/mfu"] = metrics.pop("perf/flops_per_s") / self.peak_flops
        if self.enabled:
            self._write(step, metrics)
        self.steps_since_log = 0

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.file, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.first = self.first or metrics
        self.last = metrics
        self.bar.update(self.steps_since_log)
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                             tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
        terms = " ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in metrics.items())
        self.bar.write(f"step {step}: {terms}")
        self._log_wandb(step, metrics)

    def write_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics (train/validation.py): a line of their own in metrics.jsonl."""
        if not self.enabled:
            return
        with open(self.file, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        self._log_wandb(step, metrics)

    def _log_wandb(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None and step > self.wandb_from:
            self.run.log(metrics, step=step)
            self.wandb_last = step

    def close(self) -> Optional[str]:
        """Finish: plot the run's curves beside metrics.jsonl (curves.py); returns the W&B run
        directory (rank 0)."""
        if not self.enabled:
            return None
        self.bar.close()
        if self.file.is_file():
            plot_curves(self.file)
        if self.run is None:
            return None
        run_dir = self.run.dir
        self.run.finish()
        (self.file.parent / WANDB_SYNCED_FILE).write_text(f"{self.wandb_last}\n")
        return str(Path(run_dir).parent)
