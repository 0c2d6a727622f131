"""Console progress (tqdm) and W&B logging, on global rank 0 only.

W&B runs offline unless WANDB_MODE says otherwise or WANDB_API_KEY is set; the offline run
directory is printed at the end so it can be `wandb sync`-ed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from tqdm import tqdm


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    def __init__(self, enabled: bool, total_steps: int, start_step: int, output_dir: Path,
                 project: str, name: Optional[str], config: dict):
        self.enabled = enabled
        self.bar = None
        self.run = None
        if not enabled:
            return
        import wandb

        output_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=str(output_dir), config=config,
                              mode=wandb_mode(), resume="allow")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        mininterval=1.0)

    def log(self, step: int, metrics: dict[str, float], steps_done: int) -> None:
        if not self.enabled:
            return
        self.bar.update(steps_done)
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                             tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
        terms = " ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in metrics.items())
        self.bar.write(f"step {step}: {terms}")
        self.run.log(metrics, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(text)

    def close(self) -> Optional[str]:
        """Finish; returns the W&B run directory."""
        if not self.enabled:
            return None
        self.bar.close()
        run_dir = self.run.dir
        self.run.finish()
        return str(Path(run_dir).parent)
