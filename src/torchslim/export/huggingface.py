"""A compressed Hugging Face model as a ``save_pretrained`` folder that ``AutoModel*.from_pretrained`` opens.

The transformers model inside torchslim's wrapper (`torchslim.zoo.hub.LogitsOnly` and its kin) is saved with its
own keys, its config (widths and head counts already updated by the pruning step; class names from the data as
``id2label``) and its tokenizer or image processor. Before writing, a float copy is built from the config on the
meta device and its tensor shapes compared with the compressed model's, so a folder that would not load is never
written (the reason is reported instead). Weight-only int4/int8 models are written as compressed-tensors
checkpoints (`torchslim.export.compressed_tensors`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class ExportSkipped(Exception):
    """An artifact kind does not apply to this model or stage; the message says why (reported, not an error)."""


def transformers_model(module: nn.Module) -> nn.Module | None:
    """The outermost transformers ``PreTrainedModel`` inside ``module`` (or ``module`` itself), else None."""
    for _, candidate in module.named_modules():
        if callable(getattr(candidate, "save_pretrained", None)) and hasattr(getattr(candidate, "config", None),
                                                                              "to_dict"):
            return candidate
    return None


def _shape_mismatches(model: nn.Module) -> list[str]:
    """Tensors whose shape differs from a fresh model built from ``model.config`` (which is what loads)."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k}: {found[k]} vs config's {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    missing = [f"{k}: missing" for k in expected if k not in found]
    extra = [f"{k}: not in the config's model" for k in found if k not in expected]
    return wrong + missing + extra


def label_names(model: nn.Module, class_names: list[str] | None) -> None:
    """Name the classifier's outputs after the data's classes (``id2label``), where the counts agree."""
    config = model.config
    if class_names and getattr(config, "num_labels", None) == len(class_names):
        config.id2label = dict(enumerate(class_names))
        config.label2id = {name: i for i, name in enumerate(class_names)}


def save_preprocessing(preprocess, directory: Path) -> list[str]:
    """The tokenizer or image processor files of a Hugging Face model's preprocess; returns what was saved."""
    saved = []
    for attribute in ("tokenizer", "processor"):
        owner = getattr(preprocess, attribute, None)
        if owner is not None and callable(getattr(owner, "save_pretrained", None)):
            owner.save_pretrained(directory)
            saved.append(type(owner).__name__)
    return saved


def save_huggingface(final, context, directory: Path) -> dict:
    """Write the final stage as a Hugging Face folder; returns what was written (raises `ExportSkipped`)."""
    from torchslim.quant.weight_only import WeightOnlyLinear

    if final.runtime != "torch":
        raise ExportSkipped(f"the final stage runs on {final.runtime}; its artifact is the onnx export")
    model = transformers_model(final.module)
    if model is None:
        raise ExportSkipped("the model holds no transformers model")
    label_names(model, context.data.class_names)
    if any(isinstance(m, WeightOnlyLinear) for m in model.modules()):
        from torchslim.export.compressed_tensors import save_compressed_tensors

        facts = save_compressed_tensors(model, directory)
    else:
        wrong = _shape_mismatches(model)
        if wrong:
            raise ExportSkipped(f"its config cannot describe the compressed shapes ({'; '.join(wrong[:3])}); "
                                f"reload torchslim's artifact with torchslim.load")
        model.save_pretrained(directory, safe_serialization=True)
        facts = {"format": "transformers save_pretrained"}
    facts["preprocessing"] = save_preprocessing(context.bundle.preprocess, directory)
    facts["loads_with"] = f"transformers.{_auto_class(model)}.from_pretrained"
    return facts


def _auto_class(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, auto in (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                         ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                         ("ForImageClassification", "AutoModelForImageClassification")):
        if name.endswith(suffix):
            return auto
    return "AutoModel"
