"""SmoothQuant on the ONNX graph, for the matrix multiplies a LayerNorm fold cannot reach.

`torchslim.quant.smooth` folds the smoothing division into the LayerNorm that feeds a group of Linear layers,
which adds nothing to the graph but applies only where nothing else reads that LayerNorm's output. In a post-LN
encoder (BERT, MiniLM) the LayerNorm's output also feeds the residual, and the attention output and second
feed-forward layers read no LayerNorm at all: there the division has to be an operation of its own. This pass
works on the float ONNX model that ONNX Runtime's quantizer then calibrates: every group of MatMul/Gemm nodes
with a constant 2-D weight that read one activation gets a ``Mul`` by ``1 / s`` in front of them (left float)
and ``s`` multiplied into the rows of their weights that read it, so the float function is unchanged and the
quantizer calibrates the smoothed activation. ``s`` per group as in `smooth.best_scale` (alpha searched on the
activation rows of the calibration batches by the simulated int8 error); a group no alpha helps, or whose
weights other nodes share, is left as it was and listed with the reason.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from torchslim.quant.smooth import ALPHAS, best_scale


def _weighted_groups(graph, initializers: dict) -> dict[str, list[tuple]]:
    """``{activation: [(node, weight name, weight is out x in), ...]}`` of the MatMul/Gemm nodes that multiply an
    activation by a constant 2-D float weight."""
    from onnx import TensorProto, helper

    groups: dict[str, list[tuple]] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        weight = initializers.get(w)
        if x in initializers or weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("transA", 0):
            continue
        groups.setdefault(x, []).append((node, w, bool(attributes.get("transB", 0))))
    return groups


def _activation_rows(path: Path, names: list[str], feeds: list[dict], max_rows: int) -> dict[str, np.ndarray]:
    """Up to ``max_rows`` rows (last axis = channels) of each named activation, from running ``path`` on
    ``feeds`` with those tensors added as outputs (unoptimised, so every tensor keeps its name)."""
    from torchslim.quant.onnx_ranges import session, with_outputs

    run = session(with_outputs(path, names), optimise=False)
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    counts = dict.fromkeys(names, 0)
    for feed in feeds:
        if min(counts.values()) >= max_rows:
            break
        for name, value in zip(names, run.run(names, feed)):
            if counts[name] < max_rows:
                rows[name].append(np.asarray(value, dtype=np.float32).reshape(-1, value.shape[-1]))
                counts[name] += len(rows[name][-1])
    return {n: np.concatenate(r)[:max_rows] for n, r in rows.items() if r}


def smooth_onnx(source: Path, target: Path, feeds: list[dict], alphas: tuple[float, ...] = ALPHAS,
                max_rows: int = 4096) -> dict:
    """Smooth the MatMul/Gemm groups of the float ONNX model ``source`` and write it to ``target`` (see the
    module docstring). Returns ``{"smoothed": {activation: {"nodes", "alpha", "error_before", "error_after"}},
    "refused": {activation: why}, "muls": [the Mul nodes added]}``; ``target`` is written only when a group
    was smoothed."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    groups, refused = {}, {}
    for activation, members in _weighted_groups(graph, initializers).items():
        if any(uses[w] > 1 for _, w, _ in members):
            refused[activation] = "a weight is shared with another node"
        else:
            groups[activation] = members
    rows = _activation_rows(source, list(groups), feeds, max_rows) if groups else {}
    smoothed, muls = {}, []
    for index, (activation, members) in enumerate(groups.items()):
        if activation not in rows:
            refused[activation] = "not run on the calibration data"
            continue
        weights = {w: numpy_helper.to_array(initializers[w]) for _, w, _ in members}
        out_by_in = [torch.from_numpy(weights[w].copy() if transposed else weights[w].T.copy())
                     for _, w, transposed in members]
        scale, found = best_scale(torch.from_numpy(rows[activation]), out_by_in, alphas)
        if scale is None:
            refused[activation] = f"no alpha lowers the simulated int8 error ({found['error_before']:.3g})"
            continue
        s = scale.numpy().astype(np.float32)
        for _, w, transposed in members:
            grown = weights[w] * (s[None, :] if transposed else s[:, None])
            initializers[w].CopyFrom(numpy_helper.from_array(grown.astype(np.float32), w))
        inverse, output, name = f"{activation}_smooth_inv", f"{activation}_smoothed", f"smooth_{index}"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
        first = min(list(graph.node).index(node) for node, _, _ in members)
        graph.node.insert(first, helper.make_node("Mul", [activation, inverse], [output], name=name))
        for node, _, _ in members:
            node.input[0] = output
        muls.append(name)
        smoothed[activation] = {"nodes": [node.name for node, _, _ in members], **found}
    if smoothed:
        onnx.save(model, str(target))
    return {"smoothed": smoothed, "refused": refused, "muls": muls}
