"""ONNX artifacts other tools load: an Optimum-style folder, and preprocessing and labels inside the ONNX file.

The folder holds ``model.onnx`` with the input and output names Optimum's ``ORTModelFor*`` classes use
(``input_ids``/``attention_mask``, ``pixel_values``; ``logits``), the model's ``config.json`` (for Hugging Face
models their own, with ``id2label``; else a small config naming the task and the classes) and its tokenizer or
image processor files. Every ONNX file torchslim writes carries ``metadata_props``: ``torchslim.preprocessing``
(JSON: how raw samples become the inputs), ``torchslim.labels`` (JSON class names, where the data names them),
``torchslim.task`` and ``torchslim.model``.
"""

from __future__ import annotations

import json
from pathlib import Path

from torchslim.export.huggingface import ExportSkipped, label_names, save_preprocessing, transformers_model
from torchslim.runtime.onnx import write_onnx  # noqa: F401  (re-exported: the Optimum folder's writer)

INPUT_NAMES = {"text": ["input_ids", "attention_mask"], "image": ["pixel_values"], "clicks": ["dense", "ids"]}
OUTPUT_NAMES = {"classification": "logits", "ctr": "logits", "embedding": "sentence_embedding"}


def metadata(context) -> dict[str, str]:
    """The ``metadata_props`` entries for the run's model and data."""
    describe = getattr(context.bundle.preprocess, "describe", None)
    entries = {"torchslim.task": context.bundle.task, "torchslim.model": context.bundle.spec,
               "torchslim.preprocessing": json.dumps(describe() if callable(describe) else {"kind": "unknown"})}
    if context.data.class_names:
        entries["torchslim.labels"] = json.dumps(context.data.class_names)
    return entries


def _config(context, directory: Path) -> str:
    model = transformers_model(context.model)
    if model is not None:
        label_names(model, context.data.class_names)
        model.config.save_pretrained(directory)
        return "transformers config"
    names = context.data.class_names
    config = {"torchslim": {"model": context.bundle.spec, "origin": context.bundle.origin,
                            "task": context.bundle.task}}
    if names:
        config.update(num_labels=len(names), id2label={str(i): n for i, n in enumerate(names)},
                      label2id={n: i for i, n in enumerate(names)})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return "torchslim config"


def save_onnx_folder(final, context, directory: Path) -> dict:
    """Write the Optimum-style ONNX folder; returns what was written (raises `ExportSkipped`)."""
    task, modality = context.bundle.task, context.bundle.modality
    if task == "lm":
        raise ExportSkipped("a language model is scored through its NLL wrapper; export it with huggingface")
    directory.mkdir(parents=True, exist_ok=True)
    if final.runtime == "onnxruntime":
        source, exporter = final.path, "the final stage's own ONNX file"
    elif final.runtime == "torch":
        from torchslim.runtime.onnx import export_onnx

        source = directory / "exported.onnx"
        exporter = export_onnx(final.module, context.example_inputs(1), source)
    else:
        raise ExportSkipped(f"the final stage runs on {final.runtime}, which has no ONNX form")
    write_onnx(Path(source), directory / "model.onnx", metadata(context), INPUT_NAMES.get(modality),
               OUTPUT_NAMES.get(task))
    if source == directory / "exported.onnx":
        Path(source).unlink()
    facts = {"format": "onnx (Optimum layout)", "onnx": exporter, "config": _config(context, directory),
             "preprocessing": save_preprocessing(context.bundle.preprocess, directory),
             "inputs": INPUT_NAMES.get(modality), "output": OUTPUT_NAMES.get(task),
             "loads_with": "onnxruntime.InferenceSession (the folder's layout is Optimum's ORTModel layout)"}
    return facts


__all__ = ["metadata", "save_onnx_folder", "write_onnx"]
