"""Weight-only int4/int8 models as compressed-tensors checkpoints (the format llm-compressor writes, vLLM serves
and ``transformers`` loads with ``AutoModelForCausalLM.from_pretrained``).

Every packed ``nn.Linear`` of the Hugging Face model is written in the ``pack-quantized`` format: its codes packed
into int32 (``weight_packed``), ``weight_scale`` and, for asymmetric codes, the packed ``weight_zero_point``, with
``weight_shape``; one config group per (bits, group size, symmetric) scheme names its layers. The stored values
convert exactly: torchslim keeps ``w = (code - zero) * scale`` with unsigned codes, compressed-tensors the same with
signed codes, so both are shifted by ``2**(bits-1)``. What the format cannot express is written as its dequantized
float weights (exactly the values torchslim computes with) and listed in ``ignore`` with the reason: layers with
AWQ input scales, GPT-2's ``Conv1D`` (compressed-tensors quantizes ``nn.Linear`` only) and the output head
(transformers leaves it unquantized when it loads compressed-tensors, as llm-compressor's checkpoints do).

Loading: symmetric schemes load with a plain ``AutoModelForCausalLM.from_pretrained(folder)``; asymmetric ones
(torchslim's default int4 codes have zero points) need ``quantization_config=CompressedTensorsConfig(dequantize=
True)``: transformers' compressed loading path does not unpack packed zero points (llm-compressor issue 1618).
``facts["load_kwargs"]`` says which.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from torchslim.errors import InputError


def _scheme(layer) -> tuple[int, int, bool]:
    zero = 8 if layer.bits == 4 else 0  # the stored zero point of symmetric codes
    return layer.bits, layer.group_size, bool((layer.zeros == zero).all())


def _packed(layer) -> dict[str, torch.Tensor]:
    """A `WeightOnlyLinear`'s tensors in the pack-quantized layout (signed codes, float32 scales)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 8 if layer.bits == 4 else 0  # int4 codes are stored unsigned; int8 codes already signed
    codes = (layer.codes().to(torch.int16) - offset).to(torch.int8)
    zeros = (layer.zeros.float().round() - offset).to(torch.int8)
    tensors = {"weight_packed": pack_to_int32(codes, layer.bits), "weight_scale": layer.scales.float().contiguous(),
               "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if not _scheme(layer)[2]:
        tensors["weight_zero_point"] = pack_to_int32(zeros, layer.bits, packed_dim=0).contiguous()
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().float()
    return tensors


def _dense(layer, conv1d: bool) -> dict[str, torch.Tensor]:
    """A packed layer written as float: its dequantized weight (input scale folded in), in the layout of the
    module it replaced (GPT-2's Conv1D stores (in, out))."""
    with torch.no_grad():
        weight = layer.dequantized_weight(torch.float32)
        if layer.input_scale is not None:
            weight = weight * layer.input_scale.float()
    tensors = {"weight": (weight.t() if conv1d else weight).contiguous()}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().float()
    return tensors


def _original_types(model: nn.Module) -> dict[str, str]:
    """Module name -> the class name a fresh float copy of the Hugging Face model has there."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    return {name: type(m).__name__ for name, m in fresh.named_modules()}


def compressed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict, list[str], dict[str, str]]:
    """(state dict, scheme -> layer names, ignored layer names, layer -> why it is stored dense) of a weight-only
    Hugging Face model."""
    from torchslim.quant.weight_only import WeightOnlyEmbedding, WeightOnlyLinear

    originals = _original_types(model)
    tied = {id(m.qweight) for m in model.modules() if isinstance(m, WeightOnlyEmbedding) and m.is_shared}
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    state: dict[str, torch.Tensor] = {}
    schemes: dict[tuple, list[str]] = {}
    dense: dict[str, str] = {}
    done: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, WeightOnlyLinear):
            reason = None
            if module.input_scale is not None:
                reason = "AWQ input scales have no compressed-tensors form"
            elif originals.get(name) != "Linear":
                reason = f"{originals.get(name)} is not an nn.Linear (compressed-tensors packs nn.Linear only)"
            elif module is head:
                reason = "the output head (transformers keeps it unquantized when loading compressed-tensors)"
            elif id(module.qweight) in tied:
                reason = "tied to the input embedding (transformers shares one float weight between them)"
            tensors = _dense(module, originals.get(name) == "Conv1D") if reason else _packed(module)
            if reason:
                dense[name] = reason
            else:
                schemes.setdefault(_scheme(module), []).append(name)
            state.update({f"{name}.{k}": v for k, v in tensors.items()})
            done.add(name)
        elif isinstance(module, WeightOnlyEmbedding):
            with torch.no_grad():
                rows = module(torch.arange(module.num_embeddings))
            state[f"{name}.weight"] = rows.float().contiguous()
            dense.setdefault(name, "embedding tables stay float in compressed-tensors' Linear schemes")
            done.add(name)
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner not in done and key not in state:
            state[key] = value.detach().contiguous()
    ignore = sorted(n for n, t in originals.items() if t in ("Linear", "Conv1D") and not any(
        n in names for names in schemes.values()))
    return state, schemes, ignore, dense


def quantization_config(schemes: dict, ignore: list[str]) -> dict:
    """The ``quantization_config`` entry of config.json, validated by compressed-tensors itself."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {}
    for index, ((bits, group_size, symmetric), names) in enumerate(sorted(schemes.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="group" if group_size else "channel", group_size=group_size or None)
        targets = [f"re:^{re.escape(n)}$" for n in names]
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args)
    config = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                                ignore=ignore)
    return config.model_dump()


def save_compressed_tensors(model: nn.Module, directory: Path) -> dict:
    """Write ``model`` (a Hugging Face model with torchslim weight-only layers) as a compressed-tensors
    checkpoint folder: config.json with ``quantization_config`` and model.safetensors. Returns what was done.

    Raises:
        InputError: compressed-tensors is not installed.
    """
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise InputError("export: huggingface: a weight-only model is written as a compressed-tensors checkpoint, "
                         "which needs compressed-tensors (pip install 'torchslim[export]')") from None
    from safetensors.torch import save_file

    from torchslim.export.huggingface import ExportSkipped

    state, schemes, ignore, dense = compressed_state(model)
    if not schemes:
        raise ExportSkipped("no packed layer has a compressed-tensors form (" + "; ".join(
            f"{k}: {v}" for k, v in list(dense.items())[:2]) + "); torchslim's own artifact keeps them packed")
    import json

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config(schemes, ignore)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    asymmetric = any(not symmetric for (_, _, symmetric) in schemes)
    return {"format": "compressed-tensors pack-quantized",
            "quantized_layers": sum(len(v) for v in schemes.values()), "dense_layers": dense,
            "load_kwargs": "quantization_config=CompressedTensorsConfig(dequantize=True)" if asymmetric else ""}
