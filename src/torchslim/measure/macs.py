"""Multiply-accumulate operations of one forward pass, counted by ``torch.utils.flop_counter``.

The counter sees every matmul, convolution and attention kernel the model really dispatches (1 MAC = 2 FLOPs);
element-wise operations are not counted, as is the convention for MACs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchslim.core.modules import call_model


def _register_packed_matmuls() -> None:
    """Weight-only packed matmuls (``x @ W.T`` with W packed int4/int8) have no formula of their own in the
    counter; they cost what the float matmul costs: batch x out x in MACs."""
    from torch.utils.flop_counter import register_flop_formula

    def formula(x, *args, out_val=None, **kwargs) -> int:
        return 2 * x.numel() * out_val.shape[-1]

    for name in ("_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            try:
                register_flop_formula(op, get_raw=True)(formula)
            except Exception:  # registered already, or this torch changed the API: counted as before
                pass


_register_packed_matmuls()


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of ``model`` on ``example_inputs`` (one batch, as given: pass batch size 1 for per-sample MACs)."""
    # nn.MultiheadAttention / TransformerEncoderLayer's fused inference kernels have no formula in the
    # counter: count the same computation through the unfused path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            call_model(model, example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops()) // 2
