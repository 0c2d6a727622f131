"""The shipped DeepSpeed JSONs, as DeepSpeed itself reads them."""
from __future__ import annotations

import json

import pytest
from conftest import REPO


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_zero_1_and_2_reduce_gradients_during_backward(name):
    """overlap_comm: gradient buckets are reduced while backward still runs (DeepSpeed leaves it
    off at ZeRO-1 and 2 unless asked; at ZeRO-1 it has been supported since 0.13)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
    config = DeepSpeedZeroConfig(**zero["zero_optimization"])
    assert config.overlap_comm and config.contiguous_gradients
