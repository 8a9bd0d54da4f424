"""Exporting models to formats other tools load; artifacts never use pickle.

- `export_onnx`: a module to an ONNX file (dynamic batch, and sequence for token inputs);
- `write_exports`: after a run, the artifact kinds the recipe's ``export:`` asks for (`ExportConfig`), each in a
  sub-folder of the output folder named after it: ``huggingface/`` (`torchslim.export.huggingface`: a
  ``save_pretrained`` folder, or a compressed-tensors checkpoint for weight-only int4/int8) and ``onnx/``
  (`torchslim.export.optimum`: an Optimum-style folder). ``auto`` picks them from the model's origin and the final
  stage: a transformers model gets ``huggingface`` when its final stage runs in PyTorch, ``onnx`` when it runs on
  ONNX Runtime (other
  models' ONNX artifact, ``model.onnx``, already carries the preprocessing and label metadata; ask for ``onnx``
  to get the folder layout too).
"""

from __future__ import annotations

from pathlib import Path

from torchslim.errors import InputError
from torchslim.export.config import ExportConfig
from torchslim.runtime.onnx import export_onnx

WRITERS = {"huggingface": "torchslim.export.huggingface:save_huggingface",
           "onnx": "torchslim.export.optimum:save_onnx_folder"}


def chosen_formats(config: ExportConfig, origin: str, runtime: str) -> list[str]:
    """The artifact kinds a run writes: the recipe's, or for ``auto`` those the model's origin and the final
    stage's runtime call for."""
    if config.formats == ["none"]:
        return []
    if config.formats != ["auto"]:
        return list(config.formats)
    if origin != "transformers":
        return []
    return {"torch": ["huggingface"], "onnxruntime": ["onnx"]}.get(runtime, [])


def check_exports(config: ExportConfig, bundle, where: str = "export") -> None:
    """Fail before any work when a named kind cannot apply to the model (huggingface needs a transformers model)."""
    if "huggingface" in config.formats and bundle.origin != "transformers":
        raise InputError(f"{where}.formats: huggingface needs a Hugging Face model ({bundle.spec} comes from "
                         f"{bundle.origin})")


def write_exports(directory: Path, final, context, config: ExportConfig, report: dict | None = None) -> dict:
    """Write the chosen artifact kinds into sub-folders of ``directory``; returns ``{kind: facts}``
    (``{"skipped": reason}`` where a kind does not apply to this stage), recorded in the report's ``exports``.
    (torchslim's own ONNX artifact already carries the preprocessing and label metadata: the pipeline sets it on
    ONNX stages before they are measured.)"""
    import importlib

    from torchslim.export.huggingface import ExportSkipped

    results = {}
    for kind in chosen_formats(config, context.bundle.origin, final.runtime):
        module, name = WRITERS[kind].split(":")
        target = directory / kind
        try:
            facts = getattr(importlib.import_module(module), name)(final, context, target)
            results[kind] = {"path": f"{kind}/", **facts}
        except ExportSkipped as reason:
            _remove(target)
            results[kind] = {"skipped": str(reason)}
    return results


def _remove(folder: Path) -> None:
    import shutil

    if folder.exists():
        shutil.rmtree(folder)


__all__ = ["ExportConfig", "chosen_formats", "check_exports", "export_onnx", "write_exports"]
