"""ONNX files for ONNX Runtime: a PyTorch module exported with a dynamic batch dimension (and sequence, for token
inputs) (`export_onnx`), and a copy with metadata entries set and inputs/outputs renamed (`write_onnx`).

The torch.export-based exporter (torch.onnx.export(dynamo=True), needs onnxscript) is tried first; models it
cannot capture fall back to the TorchScript-based exporter. Which one produced the file is returned.
"""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._progress import ticking
from torchslim.errors import InputError, describe

OPSET = 18


def _dynamic_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    # Batch is always dynamic; token inputs (integer, batch x sequence) also vary in length.
    return (0, 1) if tensor.ndim >= 2 and not tensor.is_floating_point() else (0,)


def export_onnx(module: nn.Module, example_inputs: Any, path: str | Path, *, dynamic_batch: bool = True) -> str:
    """Write ``module`` as ONNX to ``path`` (weights inside the file); returns the exporter used.

    Raises:
        InputError: onnx/onnxscript are missing, or neither exporter can capture the model.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise InputError("ONNX export needs the onnx extra: pip install 'torchslim[onnx]'") from None
    path = Path(path)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    names = [f"input_{i}" for i in range(len(args))]
    module = module.eval()
    errors = []
    with ticking(f"exporting {path.name} to ONNX"):
        for exporter in ("dynamo", "torchscript"):
            try:
                _export_with(exporter, module, args, names, path, dynamic_batch)
                return exporter
            except Exception as error:  # record and try the next exporter
                errors.append(f"{exporter}: {describe(error)}")
    raise InputError(f"ONNX export failed ({'; '.join(errors)})")


def _export_with(exporter: str, module: nn.Module, args: tuple, names: list[str], path: Path,
                 dynamic_batch: bool) -> None:
    """One try of ``torch.onnx.export`` with ``exporter`` ("dynamo" or "torchscript"), its chatter silenced."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = tuple(dict.fromkeys(_dynamic_dims(t), torch.export.Dim.AUTO) for t in args)
            shapes = shapes if dynamic_batch else None
            program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=["output"],
                                        dynamic_shapes=shapes, opset_version=OPSET, external_data=False)
            program.save(str(path))
        else:
            axes = {n: {d: ("batch", "sequence")[d] for d in _dynamic_dims(t)} for n, t in zip(names, args)}
            axes = {**axes, "output": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names,
                              output_names=["output"], dynamic_axes=axes, opset_version=OPSET)


def _rename(graph_names, nodes, old: str, new: str) -> None:
    for value in graph_names:
        if value.name == old:
            value.name = new
    for node in nodes:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == old:
                    field[i] = new


def write_onnx(source: Path, target: Path, entries: dict[str, str], inputs: list[str] | None = None,
               output: str | None = None) -> None:
    """Copy an ONNX file with ``entries`` set in its metadata and, where given, its inputs/output renamed."""
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    if inputs and len(inputs) == len(graph.input):
        for value, name in zip(list(graph.input), inputs):
            _rename(list(graph.input) + list(graph.value_info), graph.node, value.name, name)
    if output and len(graph.output) == 1:
        _rename(list(graph.output) + list(graph.value_info), graph.node, graph.output[0].name, output)
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    tmp = target.with_name(target.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(target)
