"""``torchvision:NAME`` and ``timm:NAME``: image classifiers with their own preprocessing and local weights.

Preprocessing is the library's own: torchvision weights' ``transforms()`` (their resize, crop, interpolation and
normalisation) and timm's ``resolve_data_config`` + ``create_transform`` (the model's pretrained config: input size,
crop fraction, bicubic or bilinear, mean/std), applied to PIL images as those libraries' loaders do. The recipe's
``model:`` mapping overrides ``input_size``, ``crop_pct``, ``mean``, ``std`` and ``interpolation``.

Weights, in order: ``checkpoint:`` (a local file), else the local caches (torch hub's ``checkpoints/`` for
torchvision and timm's URL weights, the Hugging Face hub cache for timm's ``hf_hub_id`` weights), else random
weights — the report says which. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from torchslim.errors import InputError
from torchslim.zoo import ModelBundle, register_model_prefix
from torchslim.zoo.config import ModelConfig
from torchslim.zoo.preprocess import TransformPreprocess


def need(module: str, extra: str, spec: str):
    """Import ``module`` or raise InputError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise InputError(f"model: {spec} needs {module} (pip install 'torchslim[{extra}]'): {error}") from None


def _state_dict(path: Path, where: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{where}: checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled code, a truncated file, not a checkpoint at all
        raise InputError(f"{where}: checkpoint {path}: cannot read it as safetensors or a weights-only PyTorch file "
                         f"({type(error).__name__})") from None
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"{where}: checkpoint {path} holds no state dict of tensors")
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):  # saved from DataParallel/DistributedDataParallel
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str | Path, where: str) -> None:
    """Load a local checkpoint into ``model`` strictly (same keys and shapes). Raises InputError naming what
    does not fit."""
    path = Path(path)
    state = _state_dict(path, where)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise InputError(f"{where}: checkpoint {path} does not fit the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, shapes {wrong[:3]})")
    model.load_state_dict(state)


def _torch_hub_file(url: str | None) -> Path | None:
    if not url:
        return None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return cached if cached.is_file() else None


def _torchvision_weights(models, name: str):
    try:
        return models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def torchvision_transform(weights, overrides: dict):
    """The weights' ``transforms()``, rebuilt with the overrides (or torchvision's classification defaults)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    base = weights.transforms() if weights is not None else ImageClassification(crop_size=224)
    crop = overrides.get("input_size", base.crop_size[0])
    resize = round(crop / overrides["crop_pct"]) if "crop_pct" in overrides else (
        base.resize_size[0] if "input_size" not in overrides else round(crop * base.resize_size[0] / base.crop_size[0]))
    mode = InterpolationMode(overrides["interpolation"]) if "interpolation" in overrides else base.interpolation
    if not overrides:
        return base
    return ImageClassification(crop_size=crop, resize_size=resize, mean=tuple(overrides.get("mean", base.mean)),
                               std=tuple(overrides.get("std", base.std)), interpolation=mode,
                               antialias=base.antialias)


@register_model_prefix("torchvision")
def torchvision_model(name: str, config: ModelConfig | None = None) -> ModelBundle:
    """``torchvision:NAME``: a torchvision classifier with its weights' preprocessing (local weights or random)."""
    config = config or ModelConfig(spec=f"torchvision:{name}")
    spec = f"torchvision:{name}"
    models = need("torchvision.models", "vision", spec)
    if name not in models.list_models():
        raise InputError(f"model: {spec}: torchvision has no model {name!r}")
    weights = _torchvision_weights(models, name)
    kwargs = {} if config.num_classes is None else {"num_classes": config.num_classes}
    model = models.get_model(name, weights=None, **kwargs)
    notes = []
    cached = _torch_hub_file(getattr(weights, "url", None))
    if config.checkpoint:
        load_checkpoint(model, config.checkpoint, f"model: {spec}")
        notes.append(f"{spec}: weights from {config.checkpoint}")
    elif cached is not None and config.num_classes is None:
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
        notes.append(f"{spec}: pretrained weights {weights} from the local torch hub cache")
    else:
        notes.append(f"{spec}: random weights (no checkpoint: given and no pretrained file in the local torch hub "
                     f"cache)")
    transform = torchvision_transform(weights, config.image_overrides)
    settings = {"source": "torchvision weights.transforms()" + (" with overrides" if config.image_overrides else ""),
                "resize_shorter_side": transform.resize_size[0], "center_crop": transform.crop_size[0],
                "interpolation": transform.interpolation.value, "mean": list(transform.mean),
                "std": list(transform.std)}
    preprocess = TransformPreprocess(transform, transform.crop_size[0], settings)
    return ModelBundle(model=model, spec=spec, task="classification", modality="image", preprocess=preprocess,
                       example_inputs=preprocess.example, notes=notes, origin="torchvision")


def _timm_cached_file(pretrained_cfg: dict) -> Path | None:
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(hub_id, filename)
                if isinstance(found, str):
                    return Path(found)
        except ImportError:
            pass
    return _torch_hub_file(pretrained_cfg.get("url"))


def timm_transform(timm, model: nn.Module, overrides: dict):
    """timm's eval transform for ``model`` (``resolve_data_config`` + ``create_transform``) and its settings."""
    from timm.data import create_transform, resolve_data_config

    args = {}
    if "input_size" in overrides:
        args["input_size"] = (3, overrides["input_size"], overrides["input_size"])
    for name in ("crop_pct", "mean", "std", "interpolation"):
        if name in overrides:
            args[name] = tuple(overrides[name]) if name in ("mean", "std") else overrides[name]
    data_config = resolve_data_config(args, model=model)
    return create_transform(**data_config, is_training=False), data_config


@register_model_prefix("timm")
def timm_model(name: str, config: ModelConfig | None = None) -> ModelBundle:
    """``timm:NAME``: a timm model with its pretrained config's preprocessing (local weights or random)."""
    config = config or ModelConfig(spec=f"timm:{name}")
    spec = f"timm:{name}"
    timm = need("timm", "vision", spec)
    if not timm.list_models(name) and name not in timm.list_models():
        raise InputError(f"model: {spec}: timm has no model {name!r}")
    kwargs = {} if config.num_classes is None else {"num_classes": config.num_classes}
    model = timm.create_model(name, pretrained=False, **kwargs)
    cached = None if config.checkpoint else _timm_cached_file(dict(model.pretrained_cfg))
    if config.checkpoint:
        load_checkpoint(model, config.checkpoint, f"model: {spec}")
        note = f"{spec}: weights from {config.checkpoint}"
    elif cached is not None:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs)
        note = f"{spec}: pretrained weights from the local cache ({cached})"
    else:
        note = f"{spec}: random weights (no checkpoint: given and none in the local hub caches)"
    transform, data_config = timm_transform(timm, model, config.image_overrides)
    size = data_config["input_size"][-1]
    settings = {"source": "timm resolve_data_config + create_transform" + (
        " with overrides" if config.image_overrides else ""), "input_size": list(data_config["input_size"]),
        "crop_pct": data_config["crop_pct"], "crop_mode": data_config.get("crop_mode", "center"),
        "interpolation": data_config["interpolation"], "mean": list(data_config["mean"]),
        "std": list(data_config["std"])}
    preprocess = TransformPreprocess(transform, size, settings, channels=data_config["input_size"][0])
    return ModelBundle(model=model, spec=spec, task="classification", modality="image", preprocess=preprocess,
                       example_inputs=preprocess.example, notes=[note], origin="timm")
