"""The on-disk names of a janus-pretrain checkpoint: the only place they are spelled.

    <output_dir>/checkpoints/
        step_00000100/     one training checkpoint (a "step directory"):
            mp_rank_XX_model_states.pt           DeepSpeed: model (+ optimizer without ZeRO), per TP rank
            *zero_pp_rank_D_mp_rank_XX_optim_states.pt   DeepSpeed: ZeRO optimizer shards
            rng_rankRRRRR.pt                     every RNG of global rank R
            janus.json                           step, loader position, layout, run config
            tokenizer.model | tokenizer.json     the tokenizer the embedding rows belong to
                                                 (sentencepiece | Hugging Face; tokenizer.py)
            COMPLETE                             written last: the sha256 of every other file
        best/, averaged/   model-only checkpoints (weights per TP rank, janus.json, tokenizer, COMPLETE)
        latest             the name of the newest complete step directory (for people and tools)
        step_00000100.corrupt   a checkpoint that failed its checksums, set aside (store.set_aside):
                                its files kept, never resumed, decoded or pruned
"""
from __future__ import annotations

import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
META = "janus.json"
LATEST = "latest"
BEST = "best"          # model-only: the best checkpoint by validation
AVERAGED = "averaged"  # model-only: the mean of the newest k
STEP = re.compile(r"step_(\d{8})")
TMP_PREFIX = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"
# ZeRO-3 prefixes its per-DP-rank model states with zero_pp_rank_D_.
_MODEL_STATES = re.compile(r"(?:.*_)?mp_rank_(\d{2})_model_states\.pt")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def model_states_file(tp_rank: int) -> str:
    """DeepSpeed's name for the module (and, without ZeRO, optimizer) state of one TP rank."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def tp_rank_files(directory: Path, tp_rank: int) -> list[Path]:
    """Every DeepSpeed state file of one TP rank: its model states and its ZeRO shards."""
    return sorted(directory.glob(f"*mp_rank_{tp_rank:02d}_*states.pt"))


def has_zero_shards(files: list[Path]) -> bool:
    return any(f.name.endswith("_optim_states.pt") for f in files)


def tp_size(directory: Path) -> int:
    """How many TP ranks wrote the checkpoint (0 when it holds no model states)."""
    ranks = [int(m.group(1)) for p in directory.iterdir() if (m := _MODEL_STATES.fullmatch(p.name))]
    return max(ranks) + 1 if ranks else 0
