"""Activation ranges of an ONNX model measured with torchslim's observers, as ONNX Runtime quantizer overrides.

The float model runs in ONNX Runtime with every intermediate float tensor added to its outputs; each tensor
feeds one observer (`torchslim.quant.observers`), and the chosen ranges become scales and zero points
(`torchslim.quant.qmath`) handed to ONNX Runtime's QDQ writer as ``TensorQuantOverrides``. ONNX Runtime then
places QuantizeLinear/DequantizeLinear pairs where its integer kernels can fuse them, carrying our numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from torchslim.quant.observers import Observer, make_observer
from torchslim.quant.qmath import QScheme


def float_tensors(model) -> list[str]:
    """Names of the graph inputs and node outputs that are float tensors (what activation quantization reads)."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    names += [o for node in model.graph.node for o in node.output if o]
    return [n for n in dict.fromkeys(names) if types.get(n) == TensorProto.FLOAT]


def session(model_or_path, optimise: bool, threads: int = 0):
    """An ONNX Runtime CPU session; ``optimise=False`` runs every node literally (QDQ pairs included)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        options.intra_op_num_threads = threads
    source = model_or_path if isinstance(model_or_path, bytes) else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def with_outputs(model_or_path, names: list[str]) -> bytes:
    """The model (a path or a loaded ModelProto) with the float tensors ``names`` added to its outputs."""
    import onnx

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def observe_activations(path: Path, batches: Iterable[dict[str, np.ndarray]], observer: str, scheme: QScheme,
                        threads: int = 0, means_of: Iterable[str] = ()) -> tuple[dict[str, Observer], int,
                                                                                 dict[str, torch.Tensor]]:
    """Run the float ONNX model on ``batches`` (input name -> array) and observe every float tensor; also
    returns the mean per channel (dimension 1) of the tensors named in ``means_of`` (for bias correction)."""
    import onnx

    model = onnx.load(str(path))
    names = float_tensors(model)
    # The model's outputs keep their full range whatever the observer: clipping logits changes the argmax.
    outputs = {o.name for o in model.graph.output}
    run = session(with_outputs(model, names), optimise=False, threads=threads)  # unoptimised: every tensor kept
    observers = {name: make_observer("minmax" if name in outputs else observer, scheme) for name in names}
    wanted = set(means_of)
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    samples = 0
    for feed in batches:
        values = run.run(names, feed)
        samples += len(next(iter(feed.values())))
        for name, value in zip(names, values):
            tensor = torch.from_numpy(np.asarray(value))
            observers[name].observe(tensor)
            if name in wanted and tensor.dim() >= 2:
                dims = [d for d in range(tensor.dim()) if d != 1]
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + tensor.sum(dim=dims).double(), count + tensor.numel() // tensor.shape[1])
    return observers, samples, {name: (total / count).float() for name, (total, count) in sums.items()}


def quant_overrides(observers: dict[str, Observer]) -> dict[str, list[dict]]:
    """TensorQuantOverrides (scale and zero point per tensor) from the observers' ranges and schemes."""
    overrides = {}
    for name, observer in observers.items():
        if observer.lo is None:
            continue
        scale, zero_point = observer.qparams()
        dtype = np.int8 if observer.scheme.signed else np.uint8
        overrides[name] = [{"scale": np.array(float(scale), dtype=np.float32),
                            "zero_point": np.array(int(zero_point), dtype=dtype)}]
    return overrides
