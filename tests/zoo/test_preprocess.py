"""Preprocessing from the model's own source (torchvision weights' transforms, timm's data config), recipe overrides,
and local weights (checkpoint:, the torch hub cache, the Hugging Face hub cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from torchslim.errors import InputError
from torchslim.zoo import resolve_model
from torchslim.zoo.config import ModelConfig


def photos(count: int = 3) -> list[np.ndarray]:
    import skimage.data

    return [np.asarray(skimage.data.astronaut())[i * 40:i * 40 + 300, i * 30:i * 30 + 260] for i in range(count)]


def test_timm_models_get_timm_s_own_eval_transform_and_overrides():
    timm = pytest.importorskip("timm")
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    bundle = resolve_model("timm:resnet10t")
    settings = bundle.preprocess.describe()
    assert settings["input_size"] == [3, 176, 176] and settings["interpolation"] == "bicubic"
    reference = create_transform(**resolve_data_config({}, model=timm.create_model("resnet10t")))
    images = photos()
    expected = torch.stack([reference(Image.fromarray(i)) for i in images])
    assert torch.equal(bundle.preprocess(images), expected)
    custom = resolve_model(ModelConfig(spec="timm:resnet10t", input_size=128, interpolation="bilinear",
                                       mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]))
    batch = custom.preprocess(images)
    assert batch.shape == (3, 3, 128, 128) and custom.preprocess.describe()["interpolation"] == "bilinear"
    assert custom.example_inputs(2).shape == (2, 3, 128, 128)


def test_torchvision_models_get_their_weights_own_transform():
    torchvision = pytest.importorskip("torchvision")
    from PIL import Image

    bundle = resolve_model("torchvision:resnet18")
    reference = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    images = photos()
    assert torch.equal(bundle.preprocess(images), torch.stack([reference(Image.fromarray(i)) for i in images]))


def test_torchvision_overrides_rebuild_its_transform():
    pytest.importorskip("torchvision")
    bundle = resolve_model(ModelConfig(spec="torchvision:resnet18", input_size=160, interpolation="bicubic"))
    settings = bundle.preprocess.describe()
    chosen = (settings["center_crop"], settings["resize_shorter_side"], settings["interpolation"])
    assert chosen == (160, 183, "bicubic")
    assert bundle.preprocess(photos(1)).shape == (1, 3, 160, 160)


def test_checkpoint_and_torch_hub_cache_weights(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    save_file(state, str(tmp_path / "mine.safetensors"))
    bundle = resolve_model(ModelConfig(spec="torchvision:resnet18", checkpoint=str(tmp_path / "mine.safetensors")))
    assert torch.equal(bundle.model.conv1.weight, state["conv1.weight"])
    wrapped = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    bundle = resolve_model(ModelConfig(spec="torchvision:resnet18", checkpoint=str(wrapped)))
    assert torch.equal(bundle.model.fc.weight, state["fc.weight"])
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / Path(url).name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = resolve_model("torchvision:resnet18")
    assert torch.equal(cached.model.conv1.weight, state["conv1.weight"])
    assert any("local torch hub cache" in n for n in cached.notes)


def test_timm_weights_from_the_hugging_face_hub_cache(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants
    from safetensors.torch import save_file

    torch.manual_seed(2)
    state = timm.create_model("resnet10t").state_dict()
    snapshot = tmp_path / "models--timm--resnet10t.c3_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (tmp_path / "models--timm--resnet10t.c3_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet10t.c3_in1k" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    bundle = resolve_model("timm:resnet10t")
    assert torch.equal(bundle.model.fc.weight, state["fc.weight"])
    assert any("pretrained weights from the local cache" in n for n in bundle.notes)


def test_unsafe_or_mismatched_checkpoints_are_bad_input(tmp_path):
    pytest.importorskip("torchvision")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a pickled module, not a state dict
    with pytest.raises(InputError, match="cannot read it as safetensors or a weights-only PyTorch file"):
        resolve_model(ModelConfig(spec="torchvision:resnet18", checkpoint=str(pickled)))
    with pytest.raises(InputError, match="checkpoint .* not found"):
        resolve_model(ModelConfig(spec="torchvision:resnet18", checkpoint=str(tmp_path / "absent.pt")))
    with pytest.raises(InputError, match="only max_length can be set"):
        resolve_model(ModelConfig(spec=f"hf:{tmp_path}", input_size=10))


def test_builtin_image_preprocessing_takes_overrides():
    bundle = resolve_model(ModelConfig(spec="builtin:tiny-test-cnn", input_size=24, interpolation="bicubic"))
    assert bundle.preprocess.size == 24 and bundle.preprocess.interpolation == "bicubic"
    assert bundle.preprocess([np.zeros((30, 40, 1), np.uint8)]).shape == (1, 1, 24, 24)
    with pytest.raises(InputError, match="max_length applies to text models only"):
        resolve_model(ModelConfig(spec="builtin:tiny-test-cnn", max_length=12))


def test_hugging_face_image_classifiers_use_their_image_processor(tmp_path):
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path)
    bundle = resolve_model(f"hf:{tmp_path}")
    assert (bundle.task, bundle.modality, bundle.origin) == ("classification", "image", "transformers")
    images = photos(2)
    pixels = bundle.preprocess(images)
    from PIL import Image

    expected = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, expected)
    assert bundle.model(pixels).shape == (2, 3) and bundle.example_inputs(1).shape == (1, 3, 32, 32)
