"""Channel rule for tensors the model's own code creates (``zeros``/``ones``/``empty``/``full`` and their
``new_*`` forms): a recurrent state built as ``x.new_zeros(b, self.hidden, h, w)`` or ``torch.zeros(b,
self.hidden)``.

Every channel of such a tensor holds the same value, so any of them can go. What fixes its width is the size in
the call, which the captured graph holds as a number. When that number is the value of one integer attribute of
the module whose forward creates the tensor (``self.hidden``), and of no other dimension of the tensor, that
dimension gets channel ids like a layer's output; pruning them sets the attribute to the kept count
(`torchslim.pruning.channel.surgery`), so the module's code builds the narrower tensor itself. Without the model,
a size no attribute names, or one several attributes (or dimensions) share, the tensor carries no ids and what
it meets keeps its channels, as before. The batch dimension (0) is never such a dimension.
"""

from __future__ import annotations

from torch import nn

from torchslim.graph.channels import _shape


def _creator(model: nn.Module, node) -> tuple[str, nn.Module] | None:
    """The module (path, module) whose forward made ``node``: the innermost one on its module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    try:
        return path, (model.get_submodule(path) if path else model)
    except AttributeError:
        return None


def integer_attributes(module: nn.Module) -> dict[str, int]:
    """The public integer attributes of ``module`` itself (not its children's; booleans excluded) above 1."""
    return {name: value for name, value in vars(module).items()
            if not name.startswith("_") and type(value) is int and value > 1}


def filled_tensor(analysis, node, model: nn.Module | None) -> dict:
    """Ids for the dimensions of a created tensor whose size one attribute of its creating module names (see
    the module docstring); records ``(module, attribute) -> ids`` in ``analysis.graph.sizes``."""
    shape = _shape(node)
    found = _creator(model, node) if model is not None and shape else None
    if found is None:
        return {}
    path, module = found
    attributes = integer_attributes(module)
    graph, out = analysis.graph, {}
    for dim, size in enumerate(shape):
        names = [name for name, value in attributes.items() if value == size]
        if dim == 0 or len(names) != 1 or list(shape[1:]).count(size) != 1:
            continue
        ids = graph.uf.new(size)
        key = (path, names[0])
        if key in graph.sizes:  # one attribute, one width: every tensor it sizes keeps the same count
            graph.uf.union(graph.sizes[key], ids)
        else:
            graph.sizes[key] = ids
        # If the code also uses the number otherwise (a size computed from it, say) the pruned model fails its
        # check, and `prune` keeps these channels, as it does for reshapes to written sizes.
        graph.literal_reshapes.append((ids, analysis.layer_of(node)))
        out[dim] = ids
    return out
