"""Model specs backed by other libraries: ``hf:`` (a local Hugging Face folder) and ``file:`` (your own Python).

``torchvision:`` and ``timm:`` live in `torchslim.zoo.vision`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._spec import load_factory
from torchslim.errors import InputError, describe
from torchslim.zoo import ModelBundle, register_model_prefix
from torchslim.zoo.config import ModelConfig
from torchslim.zoo.preprocess import ImagePreprocess, TensorPreprocess, TextPreprocess
from torchslim.zoo.vision import load_checkpoint, need

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics torchvision and timm normalise ImageNet images with
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class PixelLogits(nn.Module):
    """A transformers image classifier called with ``pixel_values``, returning only its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class ProcessorPreprocess:
    """Images through a Hugging Face image processor (its resize, crop, rescale and normalisation)."""

    def __init__(self, processor, channels: int = 3):
        self.processor, self.channels = processor, channels
        cropped = getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None)
        side = dict(cropped or getattr(processor, "size", None) or {})  # the side of the pixels it outputs
        self.size = int(side.get("height") or side.get("shortest_edge") or 224)

    def __call__(self, images) -> torch.Tensor:
        from torchslim.zoo.preprocess import to_pil

        return self.processor(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]

    def describe(self) -> dict:
        return {"kind": "image", "source": f"transformers {type(self.processor).__name__}",
                "processor": self.processor.to_dict(), "layout": "NCHW"}

    def example(self, batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, self.channels, self.size, self.size)


def _is_causal_lm(architectures: list[str]) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def _causal_lm(transformers, folder: Path, tokenizer, max_length: int, spec: str, weights: dict) -> ModelBundle:
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, **weights)
    context = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
    preprocess = TextPreprocess(tokenizer, max_length=min(max_length, context or max_length))
    return ModelBundle(model=CausalLMScorer(lm).eval(), spec=spec, task="lm", modality="text",
                       preprocess=preprocess, example_inputs=preprocess.example, origin="transformers",
                       source=str(folder))


def _image_classifier(transformers, folder: Path, spec: str, weights: dict) -> ModelBundle:
    processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForImageClassification.from_pretrained(folder, **weights)
    preprocess = ProcessorPreprocess(processor, getattr(model.config, "num_channels", 3))
    return ModelBundle(model=PixelLogits(model).eval(), spec=spec, task="classification", modality="image",
                       preprocess=preprocess, example_inputs=preprocess.example, origin="transformers",
                       source=str(folder))


def load_hf_folder(path: str, spec: str, max_length: int = 128) -> ModelBundle:
    """Load a local Hugging Face folder offline: sequence classifiers give logits, causal LMs per-sequence
    next-token NLL (task "lm", scored by perplexity), image classifiers logits of their image processor's
    pixels, other encoders mean-pooled vectors. ``max_length`` bounds the tokens of a text sample (a causal LM's
    is also bounded by its context)."""
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
    transformers = need("transformers", "nlp", spec)
    if any(a.endswith("ForImageClassification") for a in architectures):
        return _image_classifier(transformers, folder, spec, weights)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if _is_causal_lm(architectures):
        return _causal_lm(transformers, folder, tokenizer, max_length, spec, weights)
    preprocess = TextPreprocess(tokenizer, max_length=max_length)
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        model: nn.Module = LogitsOnly(transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, **weights))
        task = "classification"
    else:
        model = MeanPooledEncoder(transformers.AutoModel.from_pretrained(folder, **weights))
        task = "embedding"
    return ModelBundle(model=model.eval(), spec=spec, task=task, modality="text", preprocess=preprocess,
                       example_inputs=preprocess.example, origin="transformers", source=str(folder))


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
def hf_model(path: str, config: ModelConfig | None = None) -> ModelBundle:
    """``hf:PATH``: a local Hugging Face model folder (``save_pretrained`` layout); nothing is downloaded."""
    config = config or ModelConfig(spec=f"hf:{path}")
    if config.checkpoint or config.num_classes is not None or config.image_overrides:
        raise InputError(f"model: hf:{path}: a Hugging Face folder carries its own weights, head and processor; "
                         f"only max_length can be set")
    return load_hf_folder(path, spec=f"hf:{path}", max_length=config.max_length or 128)


def _example_bundle(model: nn.Module, example, spec: str, config: ModelConfig) -> ModelBundle:
    """A `file:` model's bundle from its example input: NCHW floats are images (torchslim's resize/crop/normalise,
    ImageNet statistics unless overridden), ``(dense floats, integer ids)`` click-log rows, else tensors as they
    are."""
    from torchslim.zoo.dlrm import ClickPreprocess

    if isinstance(example, (tuple, list)) and len(example) == 2 and all(torch.is_tensor(t) for t in example) \
            and example[0].is_floating_point() and not example[1].is_floating_point() and example[1].ndim == 2:
        tables = [m.num_embeddings for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
        rows = tuple(tables) if len(tables) == example[1].shape[1] else (2 ** 31,) * example[1].shape[1]
        preprocess = ClickPreprocess(table_rows=rows, dense_features=example[0].shape[1])
        return ModelBundle(model=model, spec=spec, task="ctr", modality="clicks", preprocess=preprocess,
                           example_inputs=preprocess.example, origin="file")
    try:
        tensor = torch.as_tensor(example)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"model: {spec}: the example input is not a tensor ({describe(error, 120)})") from None
    square = tensor.ndim == 4 and tensor.shape[2] == tensor.shape[3]
    if square and tensor.is_floating_point() and tensor.shape[1] in (1, 3):
        size, channels = tensor.shape[-1], tensor.shape[1]
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
        preprocess = ImagePreprocess(size=size, resize=round(size / 0.875), mean=mean, std=std,
                                     channels=channels).overridden(config.image_overrides)
        return ModelBundle(model=model, spec=spec, task="classification", modality="image", preprocess=preprocess,
                           example_inputs=preprocess.example, origin="file")
    preprocess = TensorPreprocess(tuple(tensor.shape[1:]))
    return ModelBundle(model=model, spec=spec, task="classification", modality="tensor", preprocess=preprocess,
                       example_inputs=preprocess.example, origin="file")


def _call_user(function, what: str, spec: str, path: Path, *args):
    """Call a function of the user's ``file:`` module; what it raises is the user's fault, so an InputError."""
    try:
        return function(*args)
    except (Exception, SystemExit) as error:  # torchslim's own errors (a loader's) are kept whole: they say what to do
        limit = 600 if isinstance(error, InputError) else 200
        raise InputError(f"model: {spec}: {path}: {what} raised {describe(error, limit)}") from None


@register_model_prefix("file")
def file_model(target: str, config: ModelConfig | None = None) -> ModelBundle:
    """``file:path/to/module.py:factory``: ``factory()`` returns a module, or ``(module, example_input)``.

    Without an example input the module file may define ``example_inputs(batch_size)``; otherwise the model
    is assumed to take 3x224x224 images. An example input of NCHW floats makes it an image model (it combines
    with ``imagefolder:``), ``(dense, ids)`` a click-through model; ``checkpoint:`` loads weights into it.
    """
    spec = f"file:{target}"
    config = config or ModelConfig(spec=spec)
    factory, module = load_factory(target, "model")
    path = Path(target.rpartition(":")[0])
    made = _call_user(factory, f"{factory.__name__}()", spec, path)
    model, example = (made if isinstance(made, tuple) and len(made) == 2 else (made, None))
    if not isinstance(model, nn.Module):
        raise InputError(f"model: {spec}: {factory.__name__}() returned {type(model).__name__}, not a torch.nn.Module "
                         f"(or a (module, example_input) pair)")
    if config.checkpoint:
        load_checkpoint(model, config.checkpoint, f"model: {spec}")
    if example is None and callable(getattr(module, "example_inputs", None)):
        example = _call_user(module.example_inputs, "example_inputs(1)", spec, path, 1)
    if example is None:
        example = torch.zeros(1, 3, 224, 224)
    bundle = _example_bundle(model, example, spec, config)
    if config.max_length is not None or config.num_classes is not None:
        raise InputError(f"model: {spec}: max_length and num_classes do not apply to file: models")
    if config.image_overrides and bundle.modality != "image":
        raise InputError(f"model: {spec}: image preprocessing overrides need an image model (NCHW example input)")
    return bundle
