"""Channel rules for recurrent layers (``aten.lstm``/``gru``/``rnn_tanh``/``rnn_relu``, as ``nn.LSTM``, ``nn.GRU``
and ``nn.RNN`` call them), used when `torchslim.pruning.channel.ChannelPruningConfig.recurrent` allows it.

A recurrent module has one ``hidden_size`` for all its layers and directions, so hidden unit j is one channel
class everywhere: row j of every gate block of every ``weight_ih``/``weight_hh``/bias, column j of every
``weight_hh``, feature j of the output in each direction and of the next layer's ``weight_ih``, and index j of
the returned states. Layers with projections (``proj_size``) keep their sizes.
"""

from __future__ import annotations

import numpy as np

from torchslim.graph.channels import _shape

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def recurrent(analysis, node, kind: str) -> list:
    """``kind(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)``:
    returns the ids of (output, h_n[, c_n])."""
    x, hx, params, has_biases, layers, _, _, bidirectional = node.args[:8]
    outputs = 3 if kind == "lstm" else 2
    directions, per = (2 if bidirectional else 1), (4 if has_biases else 2)
    names = [analysis.param(p) for p in params]
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    if not analysis.recurrent or None in names or len(names) != layers * directions * per:
        reason = ("recurrent layer: its input and hidden sizes are not pruned"
                  + ("" if analysis.recurrent else " (ChannelPruningConfig.recurrent allows it)"))
        analysis.block_all(node, reason)
        analysis.graph.skipped.setdefault(analysis.layer_of(node), reason)
        return [{} for _ in range(outputs)]
    graph, gates = analysis.graph, GATES[kind]
    hidden = graph.uf.new(_shape(params[1])[1])  # weight_hh: (gates x hidden, hidden)
    for state in states:  # a state passed in shares the hidden units
        if analysis.ids(state).get(2) is not None:
            graph.uf.union(hidden, analysis.ids(state)[2])
    rows, both = np.tile(hidden, gates), np.tile(hidden, directions)
    x_ids = analysis.ids(x).get(len(_shape(x)) - 1)
    for index in range(layers * directions):
        weight_ih, weight_hh, *biases = names[index * per:(index + 1) * per]
        graph.use(weight_hh, 0, rows)
        graph.use(weight_hh, 1, hidden)
        graph.use(weight_ih, 0, rows)
        inputs = x_ids if index < directions else both
        if inputs is not None:
            graph.use(weight_ih, 1, inputs)
        for bias in biases:
            graph.use(bias, 0, rows)
    module = analysis.module_of(names[0])
    graph.modules[module] = "recurrent"
    graph.producers.append((module, hidden))
    return [{len(_shape(x)) - 1: both}] + [{2: hidden} for _ in range(outputs - 1)]
