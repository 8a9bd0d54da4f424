"""Measurement, one module per concern: parameters, MACs, artifact bytes, latency, peak memory, task metrics."""

from torchslim.measure.latency import LatencyResult, measure_latency, set_threads
from torchslim.measure.layer_latency import LatencyTable, LayerShape
from torchslim.measure.macs import count_macs
from torchslim.measure.memory import peak_memory_bytes
from torchslim.measure.metrics import (
    accuracy, cosine_similarity_stats, kl_divergence, perplexity, roc_auc, top1_agreement,
)
from torchslim.measure.params import count_nonzero_params, count_params
from torchslim.measure.size import artifact_bytes

__all__ = [
    "LatencyResult", "LatencyTable", "LayerShape", "accuracy", "artifact_bytes", "cosine_similarity_stats",
    "count_macs", "count_nonzero_params", "count_params", "kl_divergence", "measure_latency", "peak_memory_bytes",
    "perplexity", "roc_auc", "set_threads", "top1_agreement",
]
