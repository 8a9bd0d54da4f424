"""Keeping a Hugging Face model's config true to its pruned shapes, so ``save_pretrained`` ->
``from_pretrained`` rebuilds it. A config holds one width for all layers: a field is updated when every layer
agrees, and otherwise reported (the model then reloads with `torchslim.load`)."""

from __future__ import annotations

import copy

from torch import nn

from torchslim.core.modules import linear_layers, weight_matrix


def _configs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost module holding each transformers config (inner layers often keep a reference too)."""
    found, seen = [], set()
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        if hasattr(config, "to_dict") and hasattr(config, "num_hidden_layers") and id(config) not in seen:
            seen.add(id(config))
            found.append((name, m))
    return found


def _width(module: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a linear-like layer."""
    out_features, in_features = weight_matrix(module).shape
    return in_features, out_features


def widths_before(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear's (in, out) features, recorded before pruning."""
    return {name: _width(m) for name, m in linear_layers(model).items()}


# Config fields holding a transformer's FFN width, by family (BERT/ViT/Llama, GPT-2, DistilBERT, OPT, BART, T5);
# ``encoder_``/``decoder_`` fields apply to the layers under an encoder/decoder module.
_FFN_FIELDS = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff")
_HEAD_SIZE_FIELDS = ("head_dim", "d_kv")  # configs that state the head size: the head count is then free
_HEAD_COUNT_FIELDS = (("num_attention_heads", ("q_proj", "query", "q")), ("num_heads", ("q_proj", "query", "q")),
                      ("num_key_value_heads", ("k_proj", "key", "k")))


def _update_ffn(config, prefix: str, before: dict, linears: dict) -> str | None:
    """Set every FFN-width field of ``config`` to the pruned width; returns a note when layers disagree."""
    values = config.to_dict()
    for field in _FFN_FIELDS:
        if field not in values or (values[field] is None and field != "n_inner"):
            continue
        inner = values[field] or 4 * getattr(config, "hidden_size", 0)  # GPT-2: n_inner None = 4 x hidden
        scope = field.split("_")[0] + "." if field.startswith(("encoder_", "decoder_")) else ""
        ffn = [n for n, (_, out) in before.items() if out == inner and n.startswith(prefix) and n in linears
               and (not scope or f".{scope}" in f".{n[len(prefix):]}")]
        widths = {linears[n][1] for n in ffn}
        if len(widths) == 1:
            setattr(config, field, widths.pop())
        elif widths:
            return (f"FFN widths differ per layer ({sorted(widths)}): config.{field} cannot say so; reload with "
                    f"torchslim.load")
    return None


def _update_heads(config, prefix: str, before: dict, linears: dict) -> str | None:
    """Head counts, where the config states the head size; otherwise a note when heads were pruned."""
    head_size = next((getattr(config, f) for f in _HEAD_SIZE_FIELDS if isinstance(getattr(config, f, None), int)),
                     None)
    if not head_size:
        if not getattr(config, "num_attention_heads", None):
            return None
        queries = [n for n, (_, out) in before.items() if n.startswith(prefix)
                   and n.endswith(("query", "q_proj", "q_lin", "c_attn")) and n in linears and linears[n][1] != out]
        if queries:
            return (f"attention heads were pruned, but this config derives the head size from "
                    f"hidden_size={getattr(config, 'hidden_size', '?')} / num_attention_heads: reload with "
                    f"torchslim.load")
        return None
    return _set_head_counts(config, head_size, prefix, linears)


def _set_head_counts(config, head_size: int, prefix: str, linears: dict) -> str | None:
    for field, suffixes in _HEAD_COUNT_FIELDS:
        counts = {linears[n][1] // head_size for n in linears if n.startswith(prefix) and n.endswith(suffixes)}
        if len(counts) == 1 and isinstance(getattr(config, field, None), int):
            setattr(config, field, counts.pop())
        elif len(counts) > 1:
            return f"{field} differs per layer: reload with torchslim.load"
    return None


def _try_head_dim(module: nn.Module, before: dict, linears: dict, prefix: str, differ: list[str]) -> list[str]:
    """Families whose attention reads ``config.head_dim`` when present (Qwen2, ...) but whose config does not
    store it: state the unpruned head size and the new head counts, and keep that only if the config then
    rebuilds more of the pruned shapes (else the fields are put back)."""
    config = module.config
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not differ or not heads or not hidden or "head_dim" in config.to_dict() or hidden % heads:
        return differ
    saved = {f: getattr(config, f, None) for f, _ in _HEAD_COUNT_FIELDS}
    config.head_dim = hidden // heads
    if _set_head_counts(config, hidden // heads, prefix, linears) is None:
        try:
            retry = _unexpressed(module)
        except Exception:  # e.g. BERT checks hidden_size % num_attention_heads: the family derives the size
            retry = differ
        if len(retry) < len(differ):
            return retry
    for field, value in saved.items():
        if isinstance(value, int):
            setattr(config, field, value)
    del config.head_dim
    return differ


def _unexpressed(module: nn.Module) -> list[str]:
    """Tensors of ``module`` whose shapes its (updated) config would not rebuild: a fresh instance is built
    from the config on the meta device (no memory) and the shapes compared."""
    import torch

    with torch.device("meta"):
        fresh = type(module)(copy.deepcopy(module.config))
    want = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    return [f"{name} {list(t.shape)} (the config builds {list(want[name])})"
            for name, t in module.state_dict().items() if name in want and tuple(t.shape) != want[name]]


def update_configs(model: nn.Module, before: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Update the FFN width (``intermediate_size`` and its per-family names) and, where the config states the
    head size, the head counts of every transformers config in ``model``; then check that the config rebuilds
    every pruned shape (so ``save_pretrained`` -> ``from_pretrained`` gives the same model). Returns notes
    (config owner -> what could not be expressed and how to reload instead)."""
    notes = {}
    linears = {name: _width(m) for name, m in linear_layers(model).items()}
    for owner, module in _configs(model):
        prefix = f"{owner}." if owner else ""
        key = owner or "model"
        for note in (_update_ffn(module.config, prefix, before, linears),
                     _update_heads(module.config, prefix, before, linears)):
            if note:
                notes[key] = note
        if all(before.get(n) == width for n, width in linears.items() if n.startswith(prefix)):
            continue  # nothing under this config changed width
        try:
            differ = _try_head_dim(module, before, linears, prefix, _unexpressed(module))
            if not differ:
                notes.pop(key, None)
        except Exception as error:  # a model class that cannot be built from its config alone
            differ, notes[key] = [], notes.get(key, f"could not check the config against the pruned shapes "
                                                    f"({type(error).__name__}): reload with torchslim.load")
        if differ:
            reason = notes.get(key) or (f"{type(module.config).__name__} cannot express the pruned widths: reload "
                                        f"with torchslim.load")
            notes[key] = f"{reason} ({len(differ)} tensor(s) differ from the config, e.g. {differ[0]})"
    return notes
