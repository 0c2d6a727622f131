"""The objective a run trains, chosen by objective.kind, and every loss term a run can log."""
from __future__ import annotations

from janus_pretrain.config import RunConfig
from janus_pretrain.objectives import bang, janus

# The order of the per-term sums in train/metrics.py's StepStats.
TERMS = janus.TERMS + bang.TERMS

# What the loop needs of one: collate, prepare, loss, flops and `terms` (those `loss` reports).
Objective = janus.JanusObjective | bang.BangObjective


def build_objective(cfg: RunConfig) -> Objective:
    """`janus` -> JanusObjective, `bang` / `bang_nar` -> BangObjective."""
    if cfg.objective.is_bang:
        return bang.BangObjective(cfg.objective, cfg.data.max_source_len, cfg.data.max_target_len)
    return janus.JanusObjective(cfg.objective, cfg.data.max_source_len, cfg.data.max_target_len,
                                cfg.model.length_classes)
