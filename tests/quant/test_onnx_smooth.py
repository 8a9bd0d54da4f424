"""SmoothQuant on the ONNX graph (`torchslim.quant.onnx_smooth`): each group of MatMuls with constant weights
reading one activation gets its own ``Mul`` by ``1 / s``, the float function is unchanged, a post-LN LayerNorm
(whose output also feeds the residual, which the LayerNorm fold must refuse) is smoothed too, and a weight two
nodes share is left alone."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).parent))
from test_smooth import _block  # noqa: E402

from torchslim.quant.onnx_smooth import smooth_onnx  # noqa: E402
from torchslim.runtime.onnx import export_onnx  # noqa: E402


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_each_weighted_group_gets_one_mul_and_the_float_function_is_unchanged(tmp_path):
    block = _block()
    with torch.no_grad():
        block.norm2.weight[5] = 40.0  # an outlier after the post-LN LayerNorm too (it also feeds the residual)
    calibration, held_out = torch.randn(8, 16, 32), torch.randn(4, 16, 32)
    export_onnx(block, calibration[:2], tmp_path / "float.onnx")
    result = smooth_onnx(tmp_path / "float.onnx", tmp_path / "smoothed.onnx", [{"input_0": calibration.numpy()}])
    # three groups read a weighted MatMul: norm1's output (q, k, v), the attention output (out), norm2's (fc)
    assert len(result["smoothed"]) + len(result["refused"]) == 3
    nodes = {activation: len(found["nodes"]) for activation, found in result["smoothed"].items()}
    assert nodes["layer_norm"] == 3 and nodes["layer_norm_1"] == 1
    for activation in ("layer_norm", "layer_norm_1"):  # the outliers: the simulated int8 error drops >= 4x
        found = result["smoothed"][activation]
        assert found["error_after"] < found["error_before"] / 4 and 0.3 <= found["alpha"] <= 0.8
    graph = onnx.load(str(tmp_path / "smoothed.onnx")).graph
    muls = [n for n in graph.node if n.op_type == "Mul" and n.name in result["muls"]]
    assert len(muls) == len(result["smoothed"]) and {m.input[0] for m in muls} == set(result["smoothed"])
    reference, smoothed = _run(tmp_path / "float.onnx", held_out), _run(tmp_path / "smoothed.onnx", held_out)
    assert float(np.abs(smoothed - reference).max() / np.abs(reference).max()) < 1e-5


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x):
        return self.linear(x) + self.linear(x.relu())


def test_a_weight_two_nodes_share_is_left_alone(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    export_onnx(_Shared().eval(), x[:2], tmp_path / "float.onnx")
    result = smooth_onnx(tmp_path / "float.onnx", tmp_path / "smoothed.onnx", [{"input_0": x.numpy()}])
    assert result["smoothed"] == {} and result["muls"] == []
    assert sorted(result["refused"].values()) == ["a weight is shared with another node"] * 2
    assert not (tmp_path / "smoothed.onnx").exists()
