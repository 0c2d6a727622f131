"""A DeepSpeed training checkpoint's fp32 master weights and AdamW moments, read by slices; and
a resume at the checkpoint's own layout that reads only the rank's own files (`load_own_files`).

A rank resuming at another (TP, DP, ZeRO) layout needs, of each parameter, only the part its new
TP shard and ZeRO partition hold. The saved files are memory-mapped (torch's zip format, which
DeepSpeed writes by default), so reading a slice reads its pages only, and `release` unmaps them:
host memory grows by what the rank reads, not by the checkpoint (docs/fault_tolerance.md,
"Resuming at another layout"). Where the saved layout put a parameter's values is DeepSpeed's
own layout, as its ds_to_universal reads it:

- ZeRO-0: the TP rank's model states hold the whole TP-local weight, and torch's AdamW state by
  parameter index, in the optimizer's group order (optim.decay_groups);
- ZeRO-1/2: DP rank d's file holds a contiguous slice of each parameter group's flat fp32 buffer
  and moments; a parameter's fragments in DP rank order (`param_slice_mappings`) make its
  TP-local tensor;
- ZeRO-3: each parameter is padded to a multiple of the DP size and split into equal parts; DP
  rank d's flat buffer holds its parts of the group's parameters one after the other.

A split parameter's TP-local tensors are the chunks of the full one along its partition dim
(parallel/reshard.py); a replicated one is the same on every TP rank, which is checked.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from janus_pretrain.checkpoint import background, unpickle
from janus_pretrain.checkpoint.files import model_states_file, tp_size
from janus_pretrain.errors import JanusError
from janus_pretrain.optim import decay_groups
from janus_pretrain.parallel import reshard

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
RELEASE_BYTES = 64 * 2**20  # pages read that a SavedState keeps mapped before it unmaps them
_ZERO_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d{2})_(optim|model)_states\.pt")
# What DeepSpeed's training-state files hold besides tensors and plain values: its loss scalers,
# ZeRO stage enum and parameter-fragment records. Nothing else is unpickled.
_DEEPSPEED_STATE = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load(path: Path, mmap: bool = False) -> dict:
    return unpickle.load(path, "DeepSpeed training state", _DEEPSPEED_STATE, mmap=mmap)


def zero_files(checkpoint: Path, tp_rank: int, kind: str) -> list[Path]:
    """ZeRO files of one TP rank in data-parallel rank order."""
    found = {}
    for p in checkpoint.iterdir():
        m = _ZERO_FILE.fullmatch(p.name)
        if m and int(m.group(2)) == tp_rank and m.group(3) == kind:
            found[int(m.group(1))] = p
    return [found[d] for d in sorted(found)]


class Fragment(NamedTuple):
    """A run of a parameter's values in one saved flat tensor."""
    file: int      # index into the TP rank's files
    slot: object   # which flat tensor of the file: a parameter group, or the parameter (ZeRO-0)
    start: int     # where the run starts in that tensor
    offset: int    # where it starts in the flattened TP-local parameter
    numel: int


@dataclass
class SavedRank:
    """One saved TP rank: each parameter's TP-local shape and where its values lie."""
    paths: list[Path]
    shapes: dict[str, torch.Size]
    fragments: dict[str, list[Fragment]]
    tensor: Callable[[dict, object, str], torch.Tensor]  # (loaded file, slot, key) -> flat tensor
    steps: set                                           # Adam step counts found
    _open: dict = field(default_factory=dict)

    def copy_flat(self, out: torch.Tensor, name: str, key: str, lo: int) -> None:
        """out[:] = elements [lo, lo + len(out)) of the flattened TP-local `key` tensor of
        `name`."""
        hi = lo + out.numel()
        for f in self.fragments[name]:
            a, b = max(lo, f.offset), min(hi, f.offset + f.numel)
            if a < b:
                out[a - lo:b - lo].copy_(self._view(f, key)[a - f.offset:b - f.offset])

    def copy_rows(self, out: torch.Tensor, name: str, key: str, first: int, row: int, a: int
                  ) -> None:
        """out[r] = columns [a, a + out.shape[1]) of row first + r of the TP-local tensor seen
        as rows of `row` elements: rows within one fragment in one strided copy each, the few
        that cross a fragment boundary one at a time."""
        rows, width = out.shape
        done = []
        for f in self.fragments[name]:
            r0 = max(0, -(-(f.offset - a) // row) - first)
            r1 = min(rows, (f.offset + f.numel - a - width) // row - first + 1)
            if r0 < r1:
                view = self._view(f, key)
                start = view.storage_offset() + (first + r0) * row + a - f.offset
                out[r0:r1].copy_(view.as_strided((r1 - r0, width), (row, 1), start))
                done.append((r0, r1))
        at = 0
        for r0, r1 in sorted(done) + [(rows, rows)]:
            for r in range(at, r0):
                self.copy_flat(out[r], name, key, (first + r) * row + a)
            at = max(at, r1)

    def _view(self, f: Fragment, key: str) -> torch.Tensor:
        if f.file not in self._open:
            self._open[f.file] = load(self.paths[f.file], mmap=True)
        return self.tensor(self._open[f.file], f.slot, key).narrow(0, f.start, f.numel)

    def release(self) -> None:
        self._open.clear()


def _without_zero(checkpoint: Path, tp_rank: int, order: list[str]) -> SavedRank:
    path = checkpoint / model_states_file(tp_rank)
    saved = load(path, mmap=True)
    optim = saved["optimizer"]
    if not isinstance(optim, dict) or "state" not in optim:  # bf16/fp16 wrap the torch state
        raise JanusError(f"checkpoint: {checkpoint} (ZeRO-0, {_precision(saved)}) resumes at its own "
                         f"layout only; ZeRO-0 checkpoints change layout in fp32")
    ids = [i for group in optim["param_groups"] for i in group["params"]]
    index = dict(zip(order, ids))
    shapes = {n: saved["module"][n].shape for n in order[:len(ids)] if n in saved["module"]}

    def tensor(file: dict, name: str, key: str) -> torch.Tensor:
        if key == "fp32":
            return file["module"][name].float().reshape(-1)
        return file["optimizer"]["state"][index[name]][key].reshape(-1)

    return SavedRank([path], shapes, {n: [Fragment(0, n, 0, 0, s.numel())] for n, s in shapes.items()},
                     tensor, {float(optim["state"][i]["step"]) for i in ids})


def _precision(saved: dict) -> str:
    config = saved.get("ds_config", {})
    return next((p for p in ("bf16", "fp16") if config.get(p, {}).get("enabled")), "fp32")


def _zero12(checkpoint: Path, tp_rank: int) -> SavedRank:
    groups = load(checkpoint / model_states_file(tp_rank), mmap=True)["param_shapes"]
    paths = zero_files(checkpoint, tp_rank, "optim")
    fragments, done, steps = {}, {}, set()
    for d, path in enumerate(paths):
        sd = load(path, mmap=True)["optimizer_state_dict"]
        for g, mappings in enumerate(sd["param_slice_mappings"]):
            steps.add(float(sd["base_optimizer_state"]["state"][g]["step"]))
            for name, m in mappings.items():
                offset = done.get(name, 0)
                fragments.setdefault(name, []).append(Fragment(d, g, m.start, offset, m.numel))
                done[name] = offset + m.numel

    def tensor(file: dict, g: int, key: str) -> torch.Tensor:
        sd = file["optimizer_state_dict"]
        if key == "fp32":
            return sd["single_partition_of_fp32_groups"][g]
        return sd["base_optimizer_state"]["state"][g][key]

    shapes = {name: shape for group in groups for name, shape in group.items()}
    return SavedRank(paths, shapes, fragments, tensor, steps)


def _zero3(checkpoint: Path, tp_rank: int) -> SavedRank:
    groups = load(zero_files(checkpoint, tp_rank, "model")[0], mmap=True)["param_shapes"]
    paths = zero_files(checkpoint, tp_rank, "optim")
    dp, fragments = len(paths), {}
    for g, group in enumerate(groups):
        start = 0
        for name, shape in group.items():
            numel = shape.numel()
            part = -(-numel // dp)
            fragments[name] = [Fragment(d, g, start, d * part, min(part, numel - d * part))
                               for d in range(dp) if d * part < numel]
            start += part
    steps = {float(load(p, mmap=True)["optimizer_state_dict"]["optimizer_state_dict"]["state"][g]
                   ["step"]) for p in paths for g in range(len(groups))}

    def tensor(file: dict, g: int, key: str) -> torch.Tensor:
        sd = file["optimizer_state_dict"]
        return sd["fp32_flat_groups"][g] if key == "fp32" else sd["optimizer_state_dict"]["state"][g][key]

    shapes = {name: shape for group in groups for name, shape in group.items()}
    return SavedRank(paths, shapes, fragments, tensor, steps)


def _runs(lo: int, hi: int, row: int) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first column, end column): flat [lo, hi) of rows of `row` elements as
    at most three runs of rows that take the same columns."""
    first, last = lo // row, (hi - 1) // row
    if first == last:
        return [(first, first + 1, lo - first * row, hi - first * row)]
    middle = [(first + 1, last, 0, row)] if last > first + 1 else []
    return [(first, first + 1, lo - first * row, row), *middle, (last, last + 1, 0, hi - last * row)]


class SavedState:
    """The fp32 weights and AdamW moments of `checkpoint` (written at ZeRO stage `zero_stage`),
    by slices of any TP layout of `model`'s parameters; `engine` is DeepSpeed's model states of
    TP rank 0 (LR schedule, step counters)."""

    def __init__(self, checkpoint: Path, zero_stage: int, model: nn.Module):
        decay, no_decay = decay_groups(model)
        read = {0: lambda t: _without_zero(checkpoint, t, decay + no_decay),
                3: lambda t: _zero3(checkpoint, t)}.get(zero_stage, lambda t: _zero12(checkpoint, t))
        self.ranks = [read(t) for t in range(tp_size(checkpoint))]
        steps = set().union(*(r.steps for r in self.ranks))
        if len(steps) != 1:
            raise JanusError(f"checkpoint: {checkpoint} holds different Adam step counts {sorted(steps)}")
        self.step = steps.pop()
        names = {name for name, _ in model.named_parameters()}
        if set(self.ranks[0].shapes) != names:
            missing = sorted(names ^ set(self.ranks[0].shapes))[0]
            raise JanusError(f"checkpoint: {checkpoint} does not fit this model (parameter {missing}); "
                             f"set model= to its shape")
        self.dims = reshard.split_dims(model)
        self.shapes = {name: full_shape(shape, self.dims.get(name), len(self.ranks))
                       for name, shape in self.ranks[0].shapes.items()}
        self.engine = load(checkpoint / model_states_file(0), mmap=True) if zero_stage < 3 else \
            load(zero_files(checkpoint, 0, "model")[0], mmap=True)
        self.release()

    def region(self, name: str, key: str, tp_rank: int, tp_world: int, lo: int, hi: int
               ) -> torch.Tensor:
        """Elements [lo, hi) of the flattened `key` tensor of `name` that TP rank `tp_rank` of
        `tp_world` holds (a new tensor; `read_into` fills one the caller has)."""
        out = torch.empty(max(hi - lo, 0))
        self.read_into(out, name, key, tp_rank, tp_world, lo)
        return out

    def read_into(self, out: torch.Tensor, name: str, key: str, tp_rank: int, tp_world: int,
                  lo: int) -> None:
        """out[:] = elements [lo, lo + len(out)) of the flattened `key` tensor of `name` that TP
        rank `tp_rank` of `tp_world` holds, copied from the saved TP ranks whose chunks overlap
        it, with no copy in between."""
        hi = lo + out.numel()
        if hi <= lo:
            return
        dim = self.dims.get(name)
        if dim is None:
            self.ranks[0].copy_flat(out, name, key, lo)
            for t, rank in enumerate(self.ranks[1:], start=1):
                other = torch.empty_like(out)
                rank.copy_flat(other, name, key, lo)
                if not torch.equal(other, out):
                    raise JanusError(f"checkpoint: replicated parameter {name} differs between TP "
                                     f"rank 0 and TP rank {t}")
        else:  # the full tensor as rows: a TP chunk takes the same columns of every row
            row = math.prod(self.shapes[name][dim:])
            old, new = row // len(self.ranks), row // tp_world
            base, at = tp_rank * new, 0
            for first, end, c0, c1 in _runs(lo, hi, new):
                dest = out[at:at + (end - first) * (c1 - c0)].view(end - first, c1 - c0)
                at += dest.numel()
                for t, rank in enumerate(self.ranks):
                    a, b = max(base + c0, t * old), min(base + c1, (t + 1) * old)
                    if a >= b:
                        continue
                    part = dest[:, a - base - c0:b - base - c0]
                    if end - first == 1:
                        rank.copy_flat(part[0], name, key, first * old + a - t * old)
                    else:
                        rank.copy_rows(part, name, key, first, old, a - t * old)
        self._read += out.numel() * out.element_size()
        if self._read >= RELEASE_BYTES:
            self.release()

    def release(self) -> None:
        """Unmap the files (and drop the pages read); the next read maps them again."""
        for rank in self.ranks:
            rank.release()
        self._read = 0


def full_shape(local: torch.Size, dim, tp_world: int) -> torch.Size:
    """The TP = 1 shape of a parameter whose TP-local shape is `local` (split along `dim`)."""
    if dim is None:
        return torch.Size(local)
    return torch.Size([s * tp_world if i == dim else s for i, s in enumerate(local)])


def load_own_files(engine, checkpoint: Path) -> Optional[str]:
    """engine.load_checkpoint of a checkpoint written at this layout (its return's path), where
    each rank reads only its own files: at ZeRO 1/2 DeepSpeed would have every DP rank read the
    TP rank's whole module from the model states; here the module is instead gathered from the
    fp32 partitions each rank loads from its own ZeRO file (equal to the saved module: a step
    leaves the module a copy of the partitions, as `update_lp_params` makes it)."""
    if engine.zero_optimization_stage() not in (1, 2):
        return engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)[0]
    with background.checkpoint_engine(engine, _ModelStatesWithoutModule(engine.checkpoint_engine)):
        loaded, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                           load_module_strict=False)
    if loaded is not None:
        engine.optimizer.update_lp_params()
    return loaded


class _ModelStatesWithoutModule:
    """A DeepSpeed checkpoint engine whose model states come without the module's weights (the
    file mapped, those pages never read); every other call is the wrapped engine's."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path: str, map_location=None):
        if not path.endswith("_model_states.pt"):
            return self.inner.load(path, map_location=map_location)
        return {**load(Path(path), mmap=True), "module": {}}

    def __getattr__(self, name):
        return getattr(self.inner, name)
