"""``imagefolder:PATH``: a folder with one sub-folder of images per class (the torchvision ImageFolder layout).

Files are split 70/10/20 (train/val/test) with a fixed seed; calibration draws from train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from torchslim.data import DataBundle, register_data_prefix, split_indices
from torchslim.errors import InputError, describe

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageFiles(Sequence):
    """Images decoded on access as uint8 HxWxC arrays."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # what PIL raises
            raise InputError(f"data: {path}: cannot decode the image ({describe(error, 120)}); "
                             f"remove or replace the file") from None


@register_data_prefix("imagefolder")
def load_imagefolder(path: str, seed: int = 0) -> DataBundle:
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"data: imagefolder:{path}: folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() in EXTENSIONS:
                files.append(file)
                labels.append(label)
    if len(classes) < 2 or len(files) < 10:
        raise InputError(f"data: imagefolder:{path}: needs >= 2 class folders and >= 10 images, "
                         f"found {len(classes)} classes and {len(files)} images")
    labels_array = np.asarray(labels, dtype=np.int64)
    train, val, test = split_indices(len(files), (0.7, 0.1, 0.2), 11)
    calib = train[np.random.default_rng(seed).permutation(len(train))[:256]]
    parts = {"train": train, "val": val, "test": test, "calib": calib}
    return DataBundle(
        spec=f"imagefolder:{path}", modality="image",
        splits={name: ImageFiles([files[i] for i in index]) for name, index in parts.items()},
        labels={name: labels_array[index] for name, index in parts.items()},
        num_classes=len(classes),
        notes=[f"imagefolder: {len(files)} images in {len(classes)} classes"],
    )
