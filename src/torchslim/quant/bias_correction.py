"""Bias correction: cancel the mean shift that rounding a layer's weights adds to its outputs.

Rounding ``W`` to ``W_q`` changes a layer's output by ``(W_q - W) x``; its expectation over the data,
``(W_q - W) E[x]``, is a per-output-channel offset that passes through every later layer and moves the logits
systematically (Nagel et al., "Data-Free Quantization", 2019; the effect is largest on depthwise convolutions,
whose few weights per channel round coarsely). With ``E[x]`` measured per input channel on calibration data,
subtracting the offset from the bias removes it; convolution padding is ignored (a border effect). Applied to
the exported, BatchNorm-folded ONNX graph, so exactly the layers the runtime quantizes are corrected, with
the grid it rounds to.
"""

from __future__ import annotations

import torch

from torchslim.quant.qmath import QScheme, fake_quantize, qparams


def quantized_weight(weight: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """``weight`` rounded the way the runtime rounds it: max-abs scale (per output channel where ``axis``)."""
    if scheme.axis is None:
        bound = weight.detach().abs().max()
    else:
        bound = weight.detach().abs().flatten(1).amax(dim=1)
    scale, zero_point = qparams(-bound, bound, scheme)
    return fake_quantize(weight, scale, zero_point, scheme)


def output_shift(delta: torch.Tensor, mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``delta @ mean`` for a linear weight ``[out, in]``, or the same per output channel of a (grouped)
    convolution weight ``[out, in / groups, *kernel]`` (every spatial tap sees the channel's mean)."""
    if delta.dim() == 2:
        return delta @ mean
    out_channels = delta.shape[0]
    per_input = delta.flatten(2).sum(dim=2).reshape(groups, out_channels // groups, -1)
    return (per_input * mean.reshape(groups, 1, -1)).sum(dim=-1).reshape(out_channels)


def correct_onnx_biases(model, means: dict[str, torch.Tensor], skip: set[str], scheme: QScheme) -> dict[str, float]:
    """Correct the bias of every Conv and Gemm node of ``model`` (a loaded, BatchNorm-folded ModelProto) whose
    input mean is in ``means`` and whose name is not in ``skip``; a missing bias is added. In place.

    Returns ``{node: largest |offset| / mean |output|}``, how much each layer moved.
    """
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    moved = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.name in skip or node.input[0] not in means:
            continue
        if len(node.input) < 2 or node.input[1] not in initializers:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = torch.from_numpy(numpy_helper.to_array(initializers[node.input[1]]).copy()).float()
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
            if not attrs.get("transB", 0):
                weight = weight.t()
        groups = int(attrs.get("group", 1))
        delta = quantized_weight(weight, scheme) - weight  # weights as [out, in, ...]: the scheme's axis 0
        mean = means[node.input[0]].float()
        shift = output_shift(delta, mean, groups)
        reference = output_shift(weight, mean, groups).abs().mean().clamp_min(1e-12)
        moved[node.name] = round(float(shift.abs().max() / reference), 6)
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name in initializers:
            bias = numpy_helper.to_array(initializers[bias_name]).astype("float32") - shift.numpy()
            initializers[bias_name].CopyFrom(numpy_helper.from_array(bias, bias_name))
        else:
            bias_name = node.name + ".corrected_bias"
            model.graph.initializer.append(numpy_helper.from_array(-shift.numpy().astype("float32"), bias_name))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = bias_name
    return moved
