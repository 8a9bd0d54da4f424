"""Model specs backed by other libraries: ``torchvision:``, ``timm:``, ``hf:`` (a local folder), ``file:``."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import InputError, describe, shorten
from torchslim.zoo import ModelBundle, register_model_prefix
from torchslim.zoo.preprocess import ImagePreprocess, TensorPreprocess, TextPreprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _need(module: str, extra: str, spec: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise InputError(f"model: {spec} needs {module} (pip install 'torchslim[{extra}]'): {error}") from None


@register_model_prefix("torchvision")
def torchvision_model(name: str) -> ModelBundle:
    spec = f"torchvision:{name}"
    models = _need("torchvision.models", "vision", spec)
    if name not in models.list_models():
        raise InputError(f"model: {spec}: torchvision has no model {name!r}")
    notes = []
    weights = models.get_model_weights(name).DEFAULT if _has_weights(models, name) else None
    model = models.get_model(name, weights=None)
    if weights is not None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if cached.exists():
            model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
            notes.append(f"{spec}: pretrained weights {weights} from the local torch hub cache")
        else:
            notes.append(f"{spec}: random weights (no pretrained file in the local torch hub cache)")
    preprocess = ImagePreprocess(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return ModelBundle(model=model, spec=spec, task="classification", modality="image", preprocess=preprocess,
                       example_inputs=preprocess.example, notes=notes)


def _has_weights(models, name: str) -> bool:
    try:
        return models.get_model_weights(name) is not None
    except (ValueError, KeyError):
        return False


@register_model_prefix("timm")
def timm_model(name: str) -> ModelBundle:
    spec = f"timm:{name}"
    timm = _need("timm", "vision", spec)
    if not timm.list_models(name) and name not in timm.list_models():
        raise InputError(f"model: {spec}: timm has no model {name!r}")
    model = timm.create_model(name, pretrained=False)
    config = getattr(model, "pretrained_cfg", None) or {}
    channels, size, _ = config.get("input_size", (3, 224, 224))
    crop = float(config.get("crop_pct", 0.875))
    preprocess = ImagePreprocess(size=size, resize=round(size / crop), mean=tuple(config.get("mean", IMAGENET_MEAN)),
                                 std=tuple(config.get("std", IMAGENET_STD)), channels=channels)
    return ModelBundle(model=model, spec=spec, task="classification", modality="image", preprocess=preprocess,
                       example_inputs=preprocess.example, notes=[f"{spec}: random weights (no hub access)"])


class MeanPooledEncoder(nn.Module):
    """A transformers encoder + attention-masked mean pooling (+ L2 normalisation): one vector per sentence."""

    def __init__(self, encoder: nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


class LogitsOnly(nn.Module):
    """A transformers model called with (input_ids, attention_mask), returning only its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class CausalLMScorer(nn.Module):
    """A transformers causal LM scored on whole sequences: per sequence ``[sum of next-token NLL, tokens]``.

    Perplexity over a data set is ``exp(sum of column 0 / sum of column 1)``; returning two numbers per sequence
    (not the logits) keeps evaluation memory small and lets every runtime be scored the same way. Padding (mask 0)
    is never predicted nor used as context. ``self.model`` is the language model itself (for ``generate()``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        targets = input_ids[:, 1:]
        counted = attention_mask[:, 1:].to(logits.dtype)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
        return torch.stack([(nll * counted).sum(1), counted.sum(1)], dim=1)


def _is_causal_lm(architectures: list[str]) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def load_hf_folder(path: str, spec: str, max_length: int = 128) -> ModelBundle:
    """Load a local Hugging Face folder offline: sequence classifiers give logits, causal LMs per-sequence
    next-token NLL (task "lm", scored by perplexity), other encoders mean-pooled vectors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(f"model: {spec}: {folder} is not a Hugging Face model folder (no config.json)")
    weights = {"local_files_only": True, "use_safetensors": _safetensors_weights(folder, spec)}
    try:
        config = json.loads((folder / "config.json").read_text())
        architectures = (config.get("architectures") if isinstance(config, dict) else None) or []
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"model: {spec}: {folder / 'config.json'}: not JSON ({describe(error, 120)})") from None
    transformers = _need("transformers", "nlp", spec)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    preprocess = TextPreprocess(tokenizer, max_length=max_length)
    if _is_causal_lm(architectures):
        if tokenizer.pad_token is None:  # GPT-2-style tokenizers have none; padding is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder, **weights)
        context = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
        preprocess = TextPreprocess(tokenizer, max_length=min(max_length, context or max_length))
        return ModelBundle(model=CausalLMScorer(lm).eval(), spec=spec, task="lm", modality="text",
                           preprocess=preprocess, example_inputs=preprocess.example)
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        model: nn.Module = LogitsOnly(transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, **weights))
        task = "classification"
    else:
        model = MeanPooledEncoder(transformers.AutoModel.from_pretrained(folder, **weights))
        task = "embedding"
    return ModelBundle(model=model.eval(), spec=spec, task=task, modality="text", preprocess=preprocess,
                       example_inputs=preprocess.example)


ALLOW_PICKLE_ENV = "TORCHSLIM_ALLOW_PICKLE"


def _safetensors_weights(folder: Path, spec: str) -> bool:
    """True when ``folder`` holds safetensors weights (always preferred). A folder with only pickled weights
    (``pytorch_model.bin``) is refused unless ``TORCHSLIM_ALLOW_PICKLE=1``: unpickling runs code, and although
    transformers restricts it (``weights_only``), a weights file should not need it."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return True
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not pickled:
        raise InputError(f"model: {spec}: {folder} holds no weights (expected model.safetensors)")
    if os.environ.get(ALLOW_PICKLE_ENV) != "1":
        raise InputError(f"model: {spec}: {folder} holds only pickled weights ({pickled[0]}); convert them to "
                         f"model.safetensors (model.save_pretrained(folder) does), or set {ALLOW_PICKLE_ENV}=1 to "
                         f"let transformers unpickle them (restricted to tensors)")
    return False


@register_model_prefix("hf")
def hf_model(path: str) -> ModelBundle:
    return load_hf_folder(path, spec=f"hf:{path}")


def _call_user(function, what: str, spec: str, path: Path, *args):
    """Call a function of the user's ``file:`` module; what it raises is the user's fault, so an InputError."""
    try:
        return function(*args)
    except (Exception, SystemExit) as error:  # torchslim's own errors (a loader's) are kept whole: they say what to do
        limit = 600 if isinstance(error, InputError) else 200
        raise InputError(f"model: {spec}: {path}: {what} raised {describe(error, limit)}") from None


@register_model_prefix("file")
def file_model(target: str) -> ModelBundle:
    """``file:path/to/module.py:factory``: ``factory()`` returns a module, or ``(module, example_input)``.

    Without an example input the module file may define ``example_inputs(batch_size)``; otherwise the model
    is assumed to take images of 3x224x224.
    """
    spec = f"file:{target}"
    path_text, sep, factory_name = target.rpartition(":")
    if not sep or not path_text or not factory_name:
        raise InputError(f"model: {spec}: expected file:path/to/module.py:factory")
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"model: {spec}: file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"torchslim_user_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        raise InputError(f"model: {spec}: importing {path} failed: {describe(error, 200)}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise InputError(f"model: {spec}: {path} defines no callable {shorten(factory_name)}")
    made = _call_user(factory, f"{factory_name}()", spec, path)
    model, example = (made if isinstance(made, tuple) and len(made) == 2 else (made, None))
    if not isinstance(model, nn.Module):
        raise InputError(f"model: {spec}: {factory_name}() returned {type(model).__name__}, not a torch.nn.Module "
                         f"(or a (module, example_input) pair)")
    if example is None and callable(getattr(module, "example_inputs", None)):
        example = _call_user(module.example_inputs, "example_inputs(1)", spec, path, 1)
    if example is None:
        preprocess = ImagePreprocess(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return ModelBundle(model=model, spec=spec, task="classification", modality="image",
                           preprocess=preprocess, example_inputs=preprocess.example)
    try:
        shape = tuple(torch.as_tensor(example).shape[1:])
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"model: {spec}: the example input is not a tensor ({describe(error, 120)})") from None
    preprocess = TensorPreprocess(shape)
    return ModelBundle(model=model, spec=spec, task="classification", modality="tensor", preprocess=preprocess,
                       example_inputs=preprocess.example)
