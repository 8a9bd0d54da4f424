"""The recipe's ``export:`` entry: which artifacts other tools load are written next to torchslim's own.

    export: auto                      # the default: chosen from the model's origin and the final stage
    export: [huggingface, onnx]       # these kinds (a shorthand for {formats: [...]})
    export: none                      # torchslim's artifact only

Kinds: ``huggingface`` (a ``save_pretrained`` folder ``AutoModel*.from_pretrained`` opens; for a weight-only
int4/int8 stage a compressed-tensors checkpoint), ``onnx`` (an Optimum-style folder: ``model.onnx`` + config and
preprocessor/tokenizer files, preprocessing and labels in the ONNX metadata).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torchslim._config import check

KINDS = ("auto", "none", "huggingface", "onnx")


@dataclass(frozen=True)
class ExportConfig:
    """Which extra artifacts a run writes (see the module docstring).

    Args:
        formats: ``[auto]``, ``[none]``, or any of ``huggingface``, ``onnx``.
    """

    formats: list[Literal["auto", "none", "huggingface", "onnx"]] = field(default_factory=lambda: ["auto"])
    version: int = 1

    def __post_init__(self) -> None:
        check(len(self.formats) >= 1, "formats", "name at least one kind (or none)")
        check(len(set(self.formats)) == len(self.formats), "formats", f"names a kind twice: {self.formats}")
        special = [f for f in self.formats if f in ("auto", "none")]
        check(not special or len(self.formats) == 1, "formats", f"auto and none stand alone, got {self.formats}")


def export_from_recipe(value) -> dict:
    """The mapping form of the recipe's ``export:`` value (a kind, a list of kinds, or a mapping)."""
    if isinstance(value, str):
        return {"formats": [value]}
    if isinstance(value, list):
        return {"formats": value}
    return value
