"""Channel rules for ``nn.MultiheadAttention``, which a traced run records as one call of
``F.multi_head_attention_forward`` (torch.export decomposes it into reshapes that mix batch and heads, which
the generic rules must block).

The module derives its head size from its width (``head_dim = embed_dim // num_heads``), so its own forward
cannot run with fewer heads at the same width. What it can run with is a smaller width at the same head count:
every head loses the same positions. So position p of every head is one channel class, paired with input
channel ``h * head_dim + p`` (the packed q/k/v rows are free parameters: any pairing is exact) and with the
output projection's input column of the same index; ``embed_dim``, ``kdim``, ``vdim`` and ``head_dim`` follow
(`torchslim.pruning.channel`).
"""

from __future__ import annotations

import numpy as np

from torchslim.graph.channels import _shape


def multi_head_attention(analysis, node) -> list:
    """``F.multi_head_attention_forward(query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias,
    bias_k, bias_v, add_zero_attn, dropout, out_proj_weight, out_proj_bias, ..., use_separate_proj_weight,
    ..., static_k, static_v, ...)``, inputs (L, N, E) or (L, E): returns the ids of (output, attention weights)."""
    args = list(node.args) + [None] * 25
    query, key, value, _, heads, in_weight, in_bias, bias_k, bias_v = args[:9]
    out_weight, out_bias, separate, static_k, static_v = args[11], args[12], args[17], args[21], args[22]
    graph = analysis.graph
    last = len(_shape(query)) - 1  # (L, N, E), or (L, E) unbatched
    ids = [analysis.ids(t).get(len(_shape(t)) - 1) for t in (query, key, value)]
    in_name, out_name = analysis.param(in_weight), analysis.param(out_weight)
    unusual = separate or any(a is not None for a in (bias_k, bias_v, static_k, static_v))
    if unusual or in_name is None or out_name is None or any(i is None for i in ids):
        reason = ("multi-head attention with separate projections, extra key/value biases or an input of fixed "
                  "width: its channels stay")
        analysis.block_all(node, reason)
        graph.skipped.setdefault(analysis.layer_of(node), reason)
        return [{}, {}]
    for other in ids[1:]:  # packed q/k/v projections read one width
        graph.uf.union(ids[0], other)
    width = ids[0]
    columns = width.reshape(heads, -1)
    for row in columns[1:]:  # every head keeps the same positions: the head count stays
        graph.uf.union(columns[0], row)
    graph.modules[analysis.module_of(in_name)] = "attention"
    graph.use(in_name, 1, width)
    graph.use(in_name, 0, np.tile(width, 3))
    if analysis.param(in_bias):
        graph.use(analysis.param(in_bias), 0, np.tile(width, 3))
    out_module = analysis.module_of(out_name)
    graph.modules[out_module] = "linear"
    out = graph.uf.new(_shape(out_weight)[0])
    graph.use(out_name, 1, width)
    graph.use(out_name, 0, out)
    if analysis.param(out_bias):
        graph.use(analysis.param(out_bias), 0, out)
    graph.producers.append((out_module, out))
    return [{last: out}, {}]
