"""``builtin:images``: random square crops of the natural photos bundled in scikit-image and scikit-learn.

Evaluation crops come from one set of photos and calibration/training crops from another, so a quantizer
never calibrates on the pictures it is scored on. No labels: pretrained classifiers are scored by agreement
with the uncompressed model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from torchslim.data import DataBundle, register_builtin_data

EVAL_PHOTOS = ("astronaut", "coffee", "rocket", "sklearn:china", "camera", "coins", "brick", "clock")
CALIB_PHOTOS = ("chelsea", "sklearn:flower", "hubble_deep_field", "immunohistochemistry", "retina", "moon",
                "grass", "gravel")
EVAL_CROPS_PER_PHOTO = 80
TRAIN_CROPS_PER_PHOTO = 64
VAL_CROPS_PER_PHOTO = 16
MIN_CROP = 96


def _load_photo(name: str) -> np.ndarray | None:
    try:
        if name.startswith("sklearn:"):
            from sklearn.datasets import load_sample_image

            photo = load_sample_image(name.split(":", 1)[1] + ".jpg")
        else:
            import skimage.data

            photo = getattr(skimage.data, name)()
    except Exception:  # a photo missing from this install is skipped and reported
        return None
    photo = np.asarray(photo)
    return photo[:, :, None] if photo.ndim == 2 else photo[:, :, :3]


@dataclass(frozen=True)
class Crop:
    photo: int
    top: int
    left: int
    size: int
    flip: bool


class CropList(Sequence):
    """Crops materialised on access (uint8 HxWxC), so hundreds of crops cost no memory up front."""

    def __init__(self, photos: list[np.ndarray], crops: list[Crop]):
        self.photos, self.crops = photos, crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index):  # type: ignore[override]
        crop = self.crops[index]
        patch = self.photos[crop.photo][crop.top:crop.top + crop.size, crop.left:crop.left + crop.size]
        return np.ascontiguousarray(patch[:, ::-1] if crop.flip else patch)


def _draw_crops(photos: list[np.ndarray], per_photo: int, rng: np.random.Generator) -> list[Crop]:
    crops = []
    for index, photo in enumerate(photos):
        h, w = photo.shape[:2]
        for _ in range(per_photo):
            size = int(rng.integers(MIN_CROP, min(h, w) + 1))
            crops.append(Crop(index, int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)),
                              size, bool(rng.integers(0, 2))))
    return crops


@register_builtin_data("images")
def load_images(seed: int = 0) -> DataBundle:
    """Random square crops of the photos bundled in scikit-image and scikit-learn (no labels)."""
    rng = np.random.default_rng(1234)  # crops are fixed, whatever the recipe's seed
    loaded = {name: _load_photo(name) for name in EVAL_PHOTOS + CALIB_PHOTOS}
    missing = [name for name, photo in loaded.items() if photo is None]
    eval_photos = [loaded[n] for n in EVAL_PHOTOS if loaded[n] is not None]
    calib_photos = [loaded[n] for n in CALIB_PHOTOS if loaded[n] is not None]
    test = CropList(eval_photos, _draw_crops(eval_photos, EVAL_CROPS_PER_PHOTO, rng))
    train = CropList(calib_photos, _draw_crops(calib_photos, TRAIN_CROPS_PER_PHOTO, rng))
    val = CropList(calib_photos, _draw_crops(calib_photos, VAL_CROPS_PER_PHOTO, rng))
    order = np.random.default_rng(seed).permutation(len(train.crops))[:256]
    calib = CropList(calib_photos, [train.crops[i] for i in order])
    notes = [f"images: {len(test)} evaluation crops from {len(eval_photos)} photos; "
             f"{len(train)} train / {len(val)} val crops from {len(calib_photos)} other photos"]
    if missing:
        notes.append(f"images: photos not available in this install: {', '.join(missing)}")
    return DataBundle(spec="builtin:images", modality="image",
                      splits={"train": train, "val": val, "test": test, "calib": calib},
                      labels={"train": None, "val": None, "test": None, "calib": None}, notes=notes)
