"""Structured channel pruning: remove whole channels and neurons so the model is physically smaller and faster.

The model is captured with torch.export and analysed (`torchslim.graph.channels`): every prunable channel is a
class of coupled channel positions across layers. Classes are grouped (a residual stream, a block's hidden
width), scored by an importance criterion, and the lowest-scoring are removed from every parameter they touch;
module attributes (``out_channels``, ``num_features``, ``in_features``, ...) follow the new shapes. The result
is an ordinary ``nn.Module`` whose output shape is unchanged.

One module per concept:

- `config` — `ChannelPruningConfig` and `PruneResult`;
- `groups` — the dependency groups cut together;
- `importance` — the registered criteria that score channels (`register_importance`);
- `select` — which channels go for a ratio, and the bisection toward a MACs or latency target;
- `surgery` — slicing tensors, updating layer attributes, reloading saved shapes;
- `refit` — least-squares refit of the layers that lost inputs (``reconstruct``);
- `hf_config` — keeping a Hugging Face model's config consistent with its pruned widths;
- `run` — the run (`prune`) and the recipe step (``prune: {method: channel}``).

Example:
    >>> result = torchslim.prune(model, torchslim.ChannelPruningConfig(ratio=0.3), example_inputs)
    >>> result.macs_after / result.macs_before
"""

from torchslim._deprecated import renamed
from torchslim.pruning.channel.config import ChannelPruningConfig, PruneResult
from torchslim.pruning.channel.groups import channel_groups
from torchslim.pruning.channel.importance import CRITERIA, register_importance
from torchslim.pruning.channel.run import prune, prune_channels
from torchslim.pruning.channel.select import select_channels
from torchslim.pruning.channel.surgery import _load_pruned, remove_channels, resize_to_shapes, save_pruned  # noqa: F401

__all__ = [
    "CRITERIA", "ChannelPruningConfig", "PruneResult", "channel_groups", "prune", "prune_channels",
    "register_importance", "remove_channels", "resize_to_shapes", "save_pruned", "select_channels",
]

# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "ChannelPruning": "ChannelPruningConfig",
    "load_pruned": "_load_pruned",
})
