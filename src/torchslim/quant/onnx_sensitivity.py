"""Where quantization hurts, measured on a QDQ ONNX model, and whether the deployed kernels match the simulation.

`simulate` runs a QDQ model with graph optimisations off, so every QuantizeLinear / DequantizeLinear executes
literally in float: the textbook fake-quant simulation of that exact graph. `deployed_vs_simulated` compares it
with the optimised session (fused integer kernels): a gap means the kernels compute something else (int16
saturation of u8 x s8 pair sums, say) and is reported.

`layer_errors` scores each quantized layer by the noise it adds: the signal-to-noise ratio of its input minus
that of its quantized output, both measured inside the simulated int8 model against the float model's tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from torchslim.quant.onnx_ranges import session as _session, with_outputs as _with_outputs
from torchslim.quant.qmath import sqnr_db

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the layers that carry quantized weights


def deployed_vs_simulated(int8_path: Path, feed: dict[str, np.ndarray], threads: int = 0) -> dict:
    """Top-1 agreement and output SQNR of the optimised (integer-kernel) session against the simulation."""
    simulated = torch.from_numpy(_session(int8_path, False, threads).run(None, feed)[0])
    deployed = torch.from_numpy(_session(int8_path, True, threads).run(None, feed)[0])
    figures = {"sqnr_db": round(sqnr_db(simulated, deployed), 2)}
    if simulated.ndim == 2 and simulated.shape[1] > 1:
        figures["top1_agreement"] = round(float((simulated.argmax(1) == deployed.argmax(1)).float().mean()), 4)
    return figures


def layer_errors(float_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """For every layer with weights (Conv, Gemm, MatMul) whose input and output the QDQ graph quantizes: the
    SQNR (dB) lost across it, i.e. SQNR of its input minus SQNR of its quantized output, both against the float
    model's tensors in the simulated int8 model (higher: its own quantization hurts more). Keys are node names
    of the float graph."""
    import onnx

    float_model = onnx.load(str(float_path), load_external_data=False)
    int8_model = onnx.load(str(int8_path), load_external_data=False)
    # In a QDQ graph, tensor T of the float graph becomes T -> QuantizeLinear -> DequantizeLinear -> T'.
    dequantized = {}
    producers = {o: n for n in int8_model.graph.node for o in n.output}
    for node in int8_model.graph.node:
        if node.op_type == "DequantizeLinear":
            quant = producers.get(node.input[0])
            if quant is not None and quant.op_type == "QuantizeLinear":
                # (a quantized graph output T is renamed T_QuantizeLinear_Input)
                dequantized[quant.input[0].removesuffix("_QuantizeLinear_Input")] = node.output[0]
    consumers: dict[str, list] = {}
    for node in float_model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)

    def quantized_output(node) -> str | None:
        """The node's output as the QDQ graph quantizes it: directly, or after a ReLU / Clip that the
        quantizer folded into the node's output range."""
        tensor = node.output[0]
        while tensor not in dequantized:
            following = consumers.get(tensor, [])
            if len(following) != 1 or following[0].op_type not in ("Relu", "Clip"):
                return None
            tensor = following[0].output[0]
        return tensor

    layers = {n.name: (n.input[0], quantized_output(n)) for n in float_model.graph.node
              if n.op_type in WEIGHTED and n.input and n.input[0] in dequantized}
    layers = {name: pair for name, pair in layers.items() if pair[1] is not None}
    wanted_float = sorted({t for pair in layers.values() for t in pair})
    wanted_int8 = sorted({dequantized[t] for t in wanted_float})
    float_session = _session(_with_outputs(float_path, wanted_float), False)
    int8_session = _session(_with_outputs(int8_path, wanted_int8), False)
    noise: dict[str, list[float]] = {}
    for feed in feeds:
        reference = dict(zip(wanted_float, float_session.run(wanted_float, feed)))
        quantized = dict(zip(wanted_int8, int8_session.run(wanted_int8, feed)))

        def snr(tensor: str) -> float:
            value = sqnr_db(torch.from_numpy(reference[tensor]), torch.from_numpy(quantized[dequantized[tensor]]))
            return min(value, 120.0)

        for name, (source, result) in layers.items():
            noise.setdefault(name, []).append(snr(source) - snr(result))
    return {name: float(np.mean(values)) for name, values in noise.items()}
