"""Float regions in a QDQ ONNX model: between layers kept float, tensors stay float.

ONNX Runtime's QDQ writer leaves an excluded layer's weights float but still quantizes every activation around
it (``Q -> DQ`` pairs on its input and output), so even a model with every Conv excluded computes on uint8
activations (measured on EfficientNet-Lite0: all 49 Conv/Gemm layers excluded still lost 3.9 points of top-1
agreement). `float_regions` removes that rounding wherever nothing int8 needs it: a tensor produced by a float
node (a kept layer, the graph input, or an operator all of whose inputs are float) is read directly by its
float consumers; a ``Q -> DQ`` pair stays only for the int8 consumers that fuse it. Operators the QDQ writer
folded into a quantized output (a ReLU or Clip after a Conv or an Add, made redundant by the output's range)
are put back after a float node, from the float graph.
"""

from __future__ import annotations

import copy

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_FOLDABLE = {"Relu", "Clip"}


def float_regions(model, prepared, kept: set[str]) -> int:
    """Rewire ``model`` (a QDQ ModelProto, in place) so that the ``kept`` weighted nodes and the operators
    between them compute on float tensors; ``prepared`` is the float ModelProto the QDQ model was written from.
    Returns how many node inputs now read a float tensor instead of a dequantized one."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    float_weights = {t.name for t in graph.initializer if t.data_type == 1 and len(t.dims) >= 2}  # FLOAT
    # Layers already float (kept by an earlier pass, or no integer kernel takes them) count as kept.
    kept = set(kept) | {n.name for n in graph.node if n.op_type in WEIGHTED and len(n.input) > 1
                        and n.input[1] in float_weights}
    float_producers = {o: n for n in prepared.graph.node for o in n.output}
    producers = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    available = {i.name for i in graph.input if i.name not in initializers}  # float tensors
    raw = {}  # DequantizeLinear output -> the float tensor its Q -> DQ pair rounds
    rewired = 0
    for node in list(graph.node):
        if node.op_type == "DequantizeLinear":
            quantize = producers.get(node.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear" and quantize.input[0] in available:
                raw[node.output[0]] = quantize.input[0]
            continue
        if node.op_type == "QuantizeLinear":
            continue
        activations = [i for i in node.input if i and i not in initializers and i not in _constants(graph)]
        is_float = node.name in kept or (node.op_type not in WEIGHTED and activations and all(
            i in available or i in raw for i in activations))
        if not is_float:
            continue
        for index, name in enumerate(node.input):
            if name in raw:
                node.input[index] = raw[name]
                rewired += 1
        available.update(node.output)
        available.update(_restore_folded_activation(graph, node, prepared, float_producers))
    # A graph output whose rounding is no longer needed: its float producer writes it directly.
    for node in list(graph.node):
        if node.op_type == "DequantizeLinear" and node.output[0] in graph_outputs and node.output[0] in raw:
            source = raw[node.output[0]]
            users = [n for n in graph.node if source in n.input]
            if all(n.op_type == "QuantizeLinear" for n in users):
                producer = next(n for n in graph.node if source in n.output)
                producer.output[list(producer.output).index(source)] = node.output[0]
                for user in users:
                    graph.node.remove(user)
                graph.node.remove(node)
                rewired += 1
    _drop_unused_qdq(graph)
    return rewired


def _constants(graph) -> set[str]:
    return {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def _restore_folded_activation(graph, node, prepared, float_producers: dict) -> list[str]:
    """Put back after a float ``node`` the ReLU / Clip the QDQ writer folded into its quantized output (the
    float graph has that activation producing the tensor ``node`` now writes); returns the tensors restored."""
    from onnx import helper

    restored = []
    present = {t.name for t in graph.initializer}
    for index, tensor in enumerate(node.output):
        original = float_producers.get(tensor)
        if original is None or original.op_type not in _FOLDABLE or original.op_type == node.op_type:
            continue
        node.output[index] = tensor + "_before_" + original.op_type.lower()
        for name in original.input[1:]:
            if name and name not in present:
                graph.initializer.append(next(t for t in prepared.graph.initializer if t.name == name))
        activation = helper.make_node(original.op_type, [node.output[index], *original.input[1:]], [tensor],
                                      name=original.name + "_float",
                                      **{a.name: helper.get_attribute_value(a) for a in original.attribute})
        graph.node.insert(list(graph.node).index(node) + 1, activation)
        restored.append(tensor)
    return restored


def _drop_unused_qdq(graph) -> None:
    """Remove QuantizeLinear / DequantizeLinear nodes nothing reads any more, and initializers no node reads."""
    outputs = {o.name for o in graph.output}
    freed: set[str] = set()
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        unused = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and not any(o in read for o in n.output)]
        if not unused:
            break
        for node in unused:
            freed.update(node.input)
            graph.node.remove(node)
    for tensor in [t for t in graph.initializer if t.name in freed and t.name not in read]:  # scales, zero points
        graph.initializer.remove(tensor)


def dequantize_layers(model, prepared, nodes: set[str]) -> None:
    """Make the weighted ``nodes`` of a QDQ ModelProto float in place: their weight and bias become the float
    graph's again (``prepared``, before any bias correction) and `float_regions` frees the tensors between
    them. The same model the QDQ writer gives when told to exclude them, without quantizing again."""
    graph = model.graph
    float_nodes = {n.name: n for n in prepared.graph.node if n.name in nodes}
    float_tensors = {t.name: t for t in prepared.graph.initializer}
    present = {t.name for t in graph.initializer}
    produced = {o for n in graph.node for o in n.output}  # (the QDQ writer names a bias's DQ output as the bias)
    for node in graph.node:
        original = float_nodes.get(node.name)
        if original is None:
            continue
        del node.input[len(original.input):]  # (a bias that bias correction added)
        for index in range(1, len(node.input)):
            name = original.input[index]
            if name not in float_tensors:
                continue
            stored = name + "_float" if name in produced else name
            node.input[index] = stored
            if stored not in present:
                tensor = copy.deepcopy(float_tensors[name])
                tensor.name = stored
                graph.initializer.append(tensor)
                present.add(stored)
    float_regions(model, prepared, set(nodes))
