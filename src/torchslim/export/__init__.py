"""Exporting models to deployable formats (ONNX); artifacts never use pickle."""

from torchslim.export.onnx import export_onnx

__all__ = ["export_onnx"]
