"""``torchslim profile SPEC``: one model measured as it is (eager PyTorch, float weights)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from torchslim.measure.latency import set_threads
from torchslim.measure.stage import measure_deployable
from torchslim.runtime import TorchDeployable
from torchslim.zoo import resolve_model


def profile_model(spec: str, batch_size: int = 32, threads: int = 0, warmup: int = 3, repeats: int = 10) -> dict:
    """Params, MACs (per sample), artifact bytes, latency at batch 1 and ``batch_size``, and peak memory.

    Example:
        >>> profile_model("torchvision:resnet50")["macs"]  # about 4.1 G at 224x224
        4111514624
    """
    threads = set_threads(threads)
    bundle = resolve_model(spec)
    with tempfile.TemporaryDirectory(prefix="torchslim-profile-") as scratch:
        result = measure_deployable(TorchDeployable(bundle.model), Path(scratch), bundle.example_inputs(batch_size),
                                    batch_size, bundle.example_inputs(1), warmup=warmup, repeats=repeats)
    return {"spec": spec, "threads": threads, **{k: v for k, v in result.items() if k != "artifact"}}
