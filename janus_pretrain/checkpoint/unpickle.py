"""torch.load that runs no code: how every torch-pickled checkpoint file is read here (model
states, RNG files, DeepSpeed's ZeRO shards), so a file from someone else is refused, not run."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import torch

from janus_pretrain.errors import JanusError


def load(path: Path, holds: str, allowed: Sequence = (), mmap: bool = False) -> dict:
    """`path` loaded with weights_only=True: tensors, plain values and the `allowed` classes.
    Anything else (a crafted pickle) is one error naming the class torch refused; `holds` says
    what the file should hold. A file torch cannot read (truncated) is one error naming it.
    With `mmap`, the tensors of a file in torch's zip format map the file instead of being read:
    only the pages a caller touches are read (a file in the legacy format is read whole)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        why = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise JanusError(f"checkpoint: {path} holds more than {holds}; refused without running it "
                         f"({why[:120]})") from None
    except (RuntimeError, EOFError) as e:  # torch's reader on a truncated or damaged file
        raise JanusError(f"checkpoint: {path} cannot be read: it is truncated or corrupt "
                         f"({str(e).splitlines()[0][:120]})") from None
