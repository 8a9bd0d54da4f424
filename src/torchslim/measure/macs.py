"""Multiply-accumulate operations of one forward pass, counted by ``torch.utils.flop_counter``.

The counter sees every matmul, convolution and attention kernel the model really dispatches (1 MAC = 2 FLOPs);
element-wise operations are not counted, as is the convention for MACs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchslim.zoo import call_model


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of ``model`` on ``example_inputs`` (one batch, as given: pass batch size 1 for per-sample MACs)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call_model(model, example_inputs)
    return int(counter.get_total_flops()) // 2
