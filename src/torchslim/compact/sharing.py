"""Weight sharing by 1-D k-means (Deep Compression, Han et al. 2016): each layer's weights become 2^bits shared
values (its codebook) and, per weight, the index of its value.

A shared layer keeps its class; its ``weight`` becomes a `torch.nn.utils.parametrize` parametrization,
``weight = codebook[indices]`` where the weight is kept and exactly 0 where it was pruned. The codebook is an
``nn.Parameter``: the backward of the gather sums the gradients of all the weights of a cluster, which is
exactly the centroid gradient of Deep Compression, so any trainer fine-tunes the centroids while the indices
(buffers) stay fixed.

Example:
    >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> shared = share_weights_(model, {"0": 4, "2": 4})
    >>> sorted(shared), shared_layers(model)["0"].codebook.numel()
    (['0', '2'], 16)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.core.modules import matches
from torchslim.pruning.magnitude import PRUNABLE

MAX_BITS = 8  # indices are stored as uint8


def kmeans_1d(values: torch.Tensor, clusters: int, iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars, initialised linearly over ``[min, max]`` (Deep Compression's best init).

    Vectorised: each pass assigns every value to its nearest centroid by binary search between the centroids'
    midpoints (1-D centroids stay sorted) and recomputes the means with one scatter-add. An empty cluster keeps
    its centroid. Runs in float64.

    Args:
        values: the values to cluster (any shape; flattened).
        clusters: the number of centroids ``k``.
        iterations: at most this many passes (it stops earlier once no centroid moves).

    Returns:
        ``(centroids, assignment)``: ``k`` sorted centroids (the values' dtype) and the index of each value's
        nearest centroid (int64).
    """
    flat = values.detach().flatten().double()
    if flat.numel() == 0:
        return values.new_zeros(clusters), torch.zeros(0, dtype=torch.long, device=values.device)
    centroids = torch.linspace(float(flat.min()), float(flat.max()), clusters, dtype=torch.float64,
                               device=flat.device)
    for _ in range(iterations):
        assignment = torch.bucketize(flat, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, flat)
        counts = torch.bincount(assignment, minlength=clusters)
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    centroids = centroids.to(values.dtype)
    assignment = torch.bucketize(flat, (centroids.double()[1:] + centroids.double()[:-1]) / 2)
    return centroids, assignment


class SharedWeight(nn.Module):
    """The parametrization ``weight = where(keep, codebook[indices], 0)``.

    Attributes:
        codebook: the ``2**bits`` shared values (an ``nn.Parameter``: fine-tuning trains it).
        indices: uint8, the weight's shape: each weight's codebook entry (0 where pruned).
        keep: bool, the weight's shape: False where the weight is pruned (and exactly zero).
    """

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor):
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("indices", indices.to(torch.uint8))
        self.register_buffer("keep", keep.to(torch.bool))

    @property
    def bits(self) -> int:
        return max(1, (self.codebook.numel() - 1).bit_length())

    def logical_numel(self) -> int:
        # `torchslim.measure.count_params` adds this to the parameters, the codebook among them: with it, a
        # shared layer counts as many parameters as its dense weight had.
        return self.keep.numel() - self.codebook.numel()

    def logical_nonzero(self) -> int:
        nonzero = int((self.keep & (self.codebook.detach()[self.indices.long()] != 0)).sum())
        return nonzero - int(self.codebook.detach().count_nonzero())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        values = self.codebook[self.indices.long()]  # uint8 would index as a mask
        return torch.where(self.keep, values, values.new_zeros(()))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # Nothing of the dense weight is kept: codebook, indices and keep-mask are the weight now.
        return weight.new_empty(0)


def shared_layers(model: nn.Module) -> dict[str, SharedWeight]:
    """``module name -> SharedWeight`` of every layer whose weight is shared."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for parametrization in module.parametrizations.weight:
                if isinstance(parametrization, SharedWeight):
                    found[name] = parametrization
    return found


def select_layers(model: nn.Module, layers: list[str], skip: list[str]) -> tuple[list[str], dict[str, str]]:
    """(names of the Conv/Linear layers matched by ``layers`` and not by ``skip``, {name: why not shareable})."""
    selected, refused = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE) or not matches(name, layers):
            continue
        if matches(name, skip):
            continue
        if parametrize.is_parametrized(module, "weight"):
            refused[name] = "weight already parametrized (shared or otherwise transformed)"
        elif not module.weight.is_floating_point():
            refused[name] = f"weight is {module.weight.dtype}, not floating point"
        else:
            selected.append(name)
    return selected, refused


def share_layer_(module: nn.Module, bits: int, keep: torch.Tensor | None = None,
                 iterations: int = 100) -> SharedWeight:
    """Cluster ``module.weight`` into ``2**bits`` values and parametrize it; returns the parametrization.

    Args:
        keep: keep-mask of the weight (False: pruned, stays exactly zero); exact zeros count as pruned too.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    weight = module.weight.detach()
    kept = weight != 0
    if keep is not None:
        kept &= keep.to(device=weight.device, dtype=torch.bool)
    codebook, assignment = kmeans_1d(weight[kept], 2 ** bits, iterations)
    indices = torch.zeros(weight.shape, dtype=torch.uint8, device=weight.device)
    indices[kept] = assignment.to(torch.uint8)
    shared = SharedWeight(codebook, indices, kept)
    parametrize.register_parametrization(module, "weight", shared, unsafe=True)
    module.parametrizations.weight.original.requires_grad_(False)
    return module.parametrizations.weight[0]


def share_weights_(model: nn.Module, bits: dict[str, int], masks: dict[str, torch.Tensor] | None = None,
                   iterations: int = 100) -> dict[str, SharedWeight]:
    """Share the weights of the named layers in place.

    Args:
        bits: module name -> bits of its codebook (``2**bits`` shared values).
        masks: ``"<module>.weight"`` -> keep-mask of pruned weights (as in ``StepContext.masks``).
        iterations: k-means passes at most.

    Returns:
        module name -> its `SharedWeight`.
    """
    masks = masks or {}
    return {name: share_layer_(model.get_submodule(name), layer_bits, masks.get(f"{name}.weight"), iterations)
            for name, layer_bits in bits.items()}


def _own_class(module: nn.Module) -> None:
    # A deep copy of a parametrized module shares its generated ``Parametrized<Class>`` with the original, and
    # removing a parametrization deletes the property from that class: the original would lose its weight.
    cls = module.__class__
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def unshare_(model: nn.Module) -> nn.Module:
    """Replace every shared weight by the plain dense tensor it computes (in place); returns ``model``.

    Safe on a deep copy: the original model keeps its shared weights.
    """
    for name in shared_layers(model):
        module = model.get_submodule(name)
        _own_class(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight.requires_grad_(True)
    return model
