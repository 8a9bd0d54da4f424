"""Surgery: slice every tensor that carries a removed channel, make the layers' attributes (``out_channels``,
``num_heads``, ...) follow, undo it, and rebuild a saved pruned model's shapes on a fresh instance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.core.modules import is_depthwise, named_tensors
from torchslim.errors import ArtifactError, InputError
from torchslim.graph import ChannelGraph
from torchslim.graph.sizes import integer_attributes
from torchslim.runtime import SHAPES_FORMAT, SIZE_ATTRIBUTES, TorchDeployable, load_safetensors


def _update_attributes(model: nn.Module, graph: ChannelGraph) -> None:
    for name, kind in graph.modules.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.modules.conv._ConvNd):
            _update_conv(module)
        elif isinstance(module, nn.RNNBase):
            module.hidden_size, module.input_size = module.weight_hh_l0.shape[1], module.weight_ih_l0.shape[1]
            module._init_flat_weights()  # its forward reads this list, not the parameters
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            _update_multihead_attention(module)
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]
        elif isinstance(module, nn.GroupNorm) and module.weight is not None:
            module.num_channels = module.weight.shape[0]  # the group count stays (equal widths per group)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = (module.weight.shape[0],)
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            module.embedding_dim = module.weight.shape[1]
        elif hasattr(module, "nf") and type(module).__name__ == "Conv1D":
            module.nf = module.weight.shape[1]  # transformers' Conv1D: weight (in, out), output width nf
    _update_attention_attributes(model)


def _update_multihead_attention(module: nn.MultiheadAttention) -> None:
    """Its forward derives the head size from the width: fewer positions per head, same head count. The
    softmax scale 1 / sqrt(head_dim) grows with the smaller head, so the query rows are scaled by
    sqrt(new / old) to keep every attention logit as it was (`load_pruned` overwrites the tensors after
    this, with the scaled ones that were saved)."""
    width = module.in_proj_weight.shape[1]
    old, new = module.head_dim, width // module.num_heads
    module.embed_dim = module.kdim = module.vdim = width
    module.head_dim = new
    if new != old:
        with torch.no_grad():
            module.in_proj_weight[:width].mul_((new / old) ** 0.5)
            if module.in_proj_bias is not None:
                module.in_proj_bias[:width].mul_((new / old) ** 0.5)


def _update_conv(module: nn.modules.conv._ConvNd) -> None:
    """Channel counts from the weight: (out, in / groups, ...), or (in, out / groups, ...) when transposed.
    A depthwise convolution stays depthwise (its groups follow its channels); other groups stay."""
    first, per_group = module.weight.shape[:2]
    if is_depthwise(module):
        module.groups = first
    if module.transposed:
        module.in_channels, module.out_channels = first, per_group * module.groups
    else:
        module.out_channels, module.in_channels = first, per_group * module.groups


_HEAD_SIZE = ("head_dim", "attention_head_size")


_HEAD_COUNT = ("num_heads", "num_attention_heads", "n_head")


_QUERY = ("q_proj", "query", "q", "c_attn")


def _update_attention_attributes(model: nn.Module) -> None:
    """Attention modules that keep their head count (and GPT-2's fused q/k/v split size) as attributes: make
    them match the pruned query projection, so code such as ``qkv.split(self.split_size)`` keeps working."""
    for module in model.modules():
        head_size = next((getattr(module, a) for a in _HEAD_SIZE if isinstance(getattr(module, a, None), int)), 0)
        query = next((getattr(module, q) for q in _QUERY if isinstance(getattr(module, q, None), nn.Module)), None)
        if not head_size or query is None:
            continue
        width = getattr(query, "out_features", None) or getattr(query, "nf", None)
        if not isinstance(width, int):
            continue
        if query is getattr(module, "c_attn", None):  # GPT-2: one projection makes q, k and v
            if not isinstance(getattr(module, "split_size", None), int) or hasattr(module, "q_attn"):
                continue
            module.split_size = width = width // 3
        if width % head_size:
            continue
        for attr in _HEAD_COUNT:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, width // head_size)
        if isinstance(getattr(module, "all_head_size", None), int):
            module.all_head_size = width


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, shared: nn.Parameter | None = None):
    """Replace the tensor called ``name``; returns what was set, so that aliases can share one object."""
    module_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(module_name) if module_name else model
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter):
        shared = shared if shared is not None else nn.Parameter(value, requires_grad=current.requires_grad)
        owner._parameters[attr] = shared
        return shared
    owner._buffers[attr] = value
    return value


def remove_channels(model: nn.Module, graph: ChannelGraph, chosen: set[int]) -> dict[str, list[int]]:
    """Slice every parameter and buffer that carries a chosen channel; returns the new shapes by name."""
    tensors = named_tensors(model)
    aliases: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        aliases.setdefault(id(tensor), []).append(name)
    keep: dict[str, dict[int, np.ndarray]] = {}
    for (name, dim), ids in graph.param_ids.items():
        mask = np.array([root not in chosen for root in graph.uf.roots(ids).tolist()])
        if not mask.all():
            keep.setdefault(name, {})[dim] = np.flatnonzero(mask)
    shapes = {}
    with torch.no_grad():
        for name, dims in keep.items():
            tensor = tensors[name].detach()
            for dim, index in dims.items():
                tensor = tensor.index_select(dim, torch.as_tensor(index, device=tensor.device))
            tensor = tensor.contiguous()
            shared = None
            for alias in aliases[id(tensors[name])]:
                shared = _set_tensor(model, alias, tensor, shared)
                shapes[alias] = list(tensor.shape)
    _update_attributes(model, graph)
    _update_sizes(model, graph, chosen)
    return shapes


def _update_sizes(model: nn.Module, graph: ChannelGraph, chosen: set[int]) -> None:
    """Attributes that size tensors the model's code creates (``self.hidden``, `torchslim.graph.sizes`) take
    the kept count; the root module records them (``SIZE_ATTRIBUTES``) so that the saved model says so."""
    for (path, attribute), ids in graph.sizes.items():
        kept = int(sum(root not in chosen for root in graph.uf.roots(ids).tolist()))
        if kept != len(ids):
            setattr(model.get_submodule(path) if path else model, attribute, kept)
            recorded = model.__dict__.setdefault(SIZE_ATTRIBUTES, {})
            recorded[f"{path}.{attribute}" if path else attribute] = kept


def set_size_attributes(model: nn.Module, attributes, where: str) -> None:
    """Set the attributes a saved pruned model records (``{"module.attribute": count}``) on a fresh instance.

    Raises:
        ArtifactError: the record is not a mapping of existing integer attributes to counts >= 1.
    """
    if attributes is None:
        return
    if not isinstance(attributes, dict):
        raise ArtifactError(f"{where}: 'attributes' must map module attributes to counts")
    for name, value in attributes.items():
        path, _, attribute = str(name).rpartition(".")
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            module = None
        if module is None or attribute not in integer_attributes(module):
            raise ArtifactError(f"{where}: attributes: the model has no integer attribute {name!r}; is this the "
                                f"original model class?")
        if type(value) is not int or value < 1:
            raise ArtifactError(f"{where}: attributes: {name!r} must be an integer >= 1, got {value!r}")
        setattr(module, attribute, value)
    model.__dict__[SIZE_ATTRIBUTES] = dict(attributes)


def _related(layer: str, where: str) -> bool:
    """Whether ``layer`` (where a reshape was recorded) is ``where`` (where the model failed) or inside it."""
    return layer == where or layer.startswith(where + ".") or where.startswith(layer + ".")


def _restore(model: nn.Module, original: nn.Module) -> None:
    """Put back every tensor and layer attribute of ``original`` (an unpruned deep copy) into ``model``."""
    model.__dict__.pop(SIZE_ATTRIBUTES, None)
    if SIZE_ATTRIBUTES in original.__dict__:
        model.__dict__[SIZE_ATTRIBUTES] = dict(original.__dict__[SIZE_ATTRIBUTES])
    for name, module in original.named_modules():
        target = model.get_submodule(name) if name else model
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers"):
                getattr(target, attr).update(value)
            elif not attr.startswith("_") and isinstance(value, (int, tuple)):
                setattr(target, attr, value)


def save_pruned(model: nn.Module, directory: str | Path) -> Path:
    """Weights as ``model.safetensors`` plus ``model.shapes.json`` (every tensor's shape); no pickle."""
    return TorchDeployable(model).save(Path(directory))


def _load_pruned(model: nn.Module, directory: str | Path, *, verify: bool = True) -> nn.Module:
    """Rebuild a pruned model on a fresh instance of its original class (changed in place and returned).

    Args:
        verify: check the files against the folder's ``manifest.json`` (see `torchslim.integrity`).

    Raises:
        ArtifactError: a damaged, altered or inconsistent file, named; nothing is allocated before the recorded
            shapes have been checked against the weights file's header.
    """
    from torchslim._validate import read_json, read_shapes
    from torchslim.integrity import verify_manifest

    directory = Path(directory)
    verify_manifest(directory, ["model.shapes.json", "model.safetensors"], verify=verify)
    resize_to_shapes(model, read_shapes(directory, SHAPES_FORMAT), directory)
    set_size_attributes(model, read_json(directory / "model.shapes.json").get("attributes"),
                        str(directory / "model.shapes.json"))
    load_safetensors(model, directory / "model.safetensors")
    return model


def resize_to_shapes(model: nn.Module, shapes: dict[str, list[int]], directory: Path) -> None:
    """Give every tensor of ``model`` the recorded shape (empty, to be loaded) and its layers the matching
    attributes (``out_features``, ...): the structure a channel-pruned model was saved with."""
    state = model.state_dict()
    tensors = named_tensors(model)
    aliases: dict[int, list[str]] = {}  # tied weights (an LM head sharing the embedding) stay one tensor
    for name, tensor in tensors.items():
        aliases.setdefault(id(tensor), []).append(name)
    graph, resized = ChannelGraph(), set()
    for name, shape in shapes.items():
        if name not in state:
            raise InputError(f"{directory}: the model has no tensor {name!r}; is this the original model class?")
        if list(state[name].shape) != shape and name not in resized:
            value, shared = torch.empty(shape, dtype=state[name].dtype), None
            for alias in aliases.get(id(tensors[name]), [name]):
                shared = _set_tensor(model, alias, value, shared)
                graph.modules[alias.rpartition(".")[0]] = "changed"
                resized.add(alias)
    _update_attributes(model, graph)
