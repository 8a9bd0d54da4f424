"""Quantization methods (registered under the ``quantize`` step kind)."""
