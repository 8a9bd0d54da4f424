"""``share_weights: {method: kmeans, ...}``: Deep Compression's weight sharing, centroid fine-tuning and
entropy-coded storage.

Each selected Conv/Linear layer's kept weights are clustered by 1-D k-means into ``2**bits`` shared values
(`torchslim.compact.sharing`); pruned weights (the pruning masks of earlier steps, or exact zeros) stay
exactly zero and are not stored. Unless ``finetune`` is null, the model is then fine-tuned by the ordinary
``finetune`` trainer: the gradient of each shared value is the sum over its cluster, so only the centroids
(and the model's other trainable parameters, e.g. biases) move while the cluster indices stay fixed. The
result is saved as a ``model.tslim`` file (`torchslim.compact.artifact`): codebooks, entropy-coded indices and
relative positions, and the remaining tensors stored as ``storage`` says.

Example recipe step::

    - share_weights:
        bits: 4
        layer_bits: {"fc3": 5}
        finetune: {epochs: 10, optimizer: {name: adam, lr: 0.0003, weight_decay: 0}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torchslim._config import check
from torchslim._deprecated import renamed
from torchslim.compact.artifact import CompactDeployable, Storage, encode_artifact, raw_fp32_bytes, round_to_storage_
from torchslim.compact.sharing import MAX_BITS, select_layers, share_weights_
from torchslim.core.modules import matches
from torchslim.recover.finetune import FinetuneConfig, finetune
from torchslim.registry import register_method


@dataclass(frozen=True)
class WeightSharingConfig:
    """Config of ``share_weights: {method: kmeans, ...}``.

    Args:
        bits: codebook size ``2**bits`` of every shared layer (1 to 8).
        layer_bits: module-name pattern (fnmatch) -> bits for matching layers (the first match wins).
        layers: module-name patterns (fnmatch) of the Conv/Linear layers to share.
        skip: module-name patterns left unshared (stored as other tensors).
        iterations: k-means passes at most (it stops once no centroid moves).
        finetune: the fine-tuning run of the shared values (and the other trainable parameters) afterwards
            (``finetune``'s fields: epochs, optimizer, distillation, ...); null: the centroids stay as k-means
            left them.
        storage: how codebooks and the other tensors are stored in the artifact.
    """

    bits: int = 4
    layer_bits: dict[str, int] = field(default_factory=dict)
    layers: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=list)
    iterations: int = 100
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    storage: Storage = field(default_factory=Storage)
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {
        "finetune_centroids": "finetune (a mapping fine-tunes the centroids, null: none)"}

    def __post_init__(self) -> None:
        check(1 <= self.bits <= MAX_BITS, "bits", f"must be in [1, {MAX_BITS}], got {self.bits}")
        for pattern, bits in self.layer_bits.items():
            check(1 <= bits <= MAX_BITS, f"layer_bits.{pattern}", f"must be in [1, {MAX_BITS}], got {bits}")
        check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")


def layer_bits(name: str, config: WeightSharingConfig) -> int:
    """Bits of the layer ``name``: its first matching ``layer_bits`` pattern, else ``config.bits``."""
    return next((bits for pattern, bits in config.layer_bits.items() if matches(name, [pattern])), config.bits)


def _details(deployable: CompactDeployable, shared: dict, training: dict | None) -> dict:
    _, sizes = encode_artifact(deployable.module, deployable.storage)
    raw = raw_fp32_bytes(deployable.module)
    layers = {name: {"bits": s.bits, "nonzero": int(s.keep.sum()), "weights": s.keep.numel()}
              for name, s in shared.items()}
    details = {"bits": sorted({s.bits for s in shared.values()}), "layers": layers, "bytes": sizes,
               "raw_fp32_bytes": raw, "ratio": round(raw / sizes["total"], 2),
               "storage": {"codebook": deployable.storage.codebook, "other": deployable.storage.other}}
    if training is not None:
        details["centroid_finetune"] = training
    return details


@register_method("share_weights", "kmeans", WeightSharingConfig)
def share_weights(context, config: WeightSharingConfig) -> CompactDeployable:
    """Share the selected layers' weights in place (then fine-tune the centroids); returns the compact model
    with ``details``: bits, the shared layers, bytes per artifact component, raw fp32 bytes and the ratio."""
    selected, refused = select_layers(context.model, config.layers, config.skip)
    for name, reason in refused.items():
        context.skip_layer(name, reason)
    plan = {name: layer_bits(name, config) for name in selected}
    # The keep-masks move into the parametrizations (which keep pruned weights at zero by construction); the
    # dense weights they were keyed by no longer exist as parameters.
    masks = {f"{name}.weight": context.masks.pop(f"{name}.weight") for name in plan
             if f"{name}.weight" in context.masks}
    shared = share_weights_(context.model, plan, masks, config.iterations)
    if not shared:
        context.skip_layer("*", "no Conv/Linear layers to share")
    training = None
    if shared and config.finetune is not None:
        training = finetune(context, config.finetune, name="centroids").details
    round_to_storage_(context.model, config.storage)
    deployable = CompactDeployable(context.model, storage=config.storage)
    deployable.details = _details(deployable, shared, training)
    return deployable


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "WeightSharing": "WeightSharingConfig",
})
