"""Graph capture and dependency analysis: which channels of which layers must be cut together."""

from torchslim.graph.capture import capture
from torchslim.graph.channels import ChannelGraph, analyse_channels

__all__ = ["ChannelGraph", "analyse_channels", "capture"]
