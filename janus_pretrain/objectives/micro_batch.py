"""The shape one collated micro-batch gives the memory and communication accounting
(model/memory.py, model/comm.py): which decoder passes an objective runs and which stream
groups its loss keeps, read from the objective itself so the planner and `bench accounting`
describe the step the training loop runs."""
from __future__ import annotations

from janus_pretrain.model.flops import bang_passes, decoder_passes
from janus_pretrain.model.memory import MicroBatch
from janus_pretrain.objectives.bang import BangObjective
from janus_pretrain.objectives.build import Objective
from janus_pretrain.objectives.losses import slot_streams


def micro_batch(objective: Objective, host: dict) -> MicroBatch:
    """The MicroBatch of a collated batch (`objective.collate`): BANG's one pass of main plus
    predicting streams, or JANUS's AR pass and two-stream pass with the loss's AR stream and
    stacked slot streams (K = the batch's masked slots)."""
    b, s = host["src"].shape
    length = host["tgt"].shape[1]
    if isinstance(objective, BangObjective):
        passes = bang_passes(objective.cfg.kind == "bang", objective.streams, length)
        return MicroBatch(b, s, tuple(passes), (passes[0][1],),
                          causal=(objective.cfg.kind != "bang",))
    k = host["masked_pos"].shape[1]
    passes = decoder_passes(objective.needs_ar, objective.needs_nar, length, k)
    names = objective.terms - {"length"}
    streams = (length - 1,) if "ce_ar" in names else ()
    slots = slot_streams(tuple(names))
    streams += (len(slots) * k,) if slots else ()
    stacked = (len(slots) + ("ar_m" in slots)) * k if slots else 0
    causal = (True, False) if objective.needs_ar else (False,)
    return MicroBatch(b, s, tuple(passes), streams, objective.encoder_passes,
                      causal[:len(passes)], stacked)
