"""Keeping a Hugging Face model's config true to its pruned shapes, so ``save_pretrained`` ->
``from_pretrained`` rebuilds it. A config holds one width for all layers: a field is updated when every layer
agrees, and otherwise reported (the model then reloads with `torchslim.load`)."""

from __future__ import annotations

from torch import nn


def _configs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost module holding each transformers config (inner layers often keep a reference too)."""
    found, seen = [], set()
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        if hasattr(config, "to_dict") and hasattr(config, "num_hidden_layers") and id(config) not in seen:
            seen.add(id(config))
            found.append((name, m))
    return found


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers, and transformers' Conv1D (a Linear stored transposed), by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))}


def _width(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.nf


def widths_before(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear's (in, out) features, recorded before pruning."""
    return {name: _width(m) for name, m in _linears(model).items()}


def update_configs(model: nn.Module, before: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Update ``intermediate_size`` (and, where the config states ``head_dim``, the head counts) of every
    transformers config in ``model``; returns notes (config owner -> what could not be expressed)."""
    notes = {}
    linears = {name: _width(m) for name, m in _linears(model).items()}
    for owner, module in _configs(model):
        config = module.config
        prefix = f"{owner}." if owner else ""
        field, inner = "intermediate_size", getattr(config, "intermediate_size", None)
        if "n_inner" in config.to_dict():  # GPT-2 style: n_inner, None meaning 4 x the hidden size
            field, inner = "n_inner", config.n_inner or 4 * config.hidden_size
        if inner:
            ffn = [n for n, (_, out) in before.items() if out == inner and n.startswith(prefix) and n in linears]
            widths = {linears[n][1] for n in ffn}
            if len(widths) == 1:
                setattr(config, field, widths.pop())
            elif widths:
                notes[owner or "model"] = (f"FFN widths differ per layer ({sorted(widths)}): config.intermediate_size "
                                           f"cannot say so; reload with torchslim.load")
        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None)
        if heads and not head_dim:
            hidden = getattr(config, "hidden_size", 0)
            queries = [n for n, (i, out) in before.items() if n.startswith(prefix)
                       and n.endswith(("query", "q_proj", "c_attn")) and n in linears and linears[n][1] != out]
            if queries:
                notes[owner or "model"] = (f"attention heads were pruned, but this config derives the head size "
                                           f"from hidden_size={hidden} / num_attention_heads: reload with "
                                           f"torchslim.load")
        elif heads and head_dim:
            for field, suffixes in (("num_attention_heads", ("q_proj", "query")),
                                    ("num_key_value_heads", ("k_proj", "key"))):
                counts = {linears[n][1] // head_dim for n in linears
                          if n.startswith(prefix) and n.endswith(suffixes)}
                if len(counts) == 1 and hasattr(config, field):
                    setattr(config, field, counts.pop())
                elif len(counts) > 1:
                    notes[owner or "model"] = f"{field} differs per layer: reload with torchslim.load"
    return notes
