"""``imagefolder:PATH``: one sub-folder of images per class (the torchvision ImageFolder layout).

Where PATH holds ``train/`` and ``val/`` (or ``validation/``) and/or ``test/`` sub-folders, each in that layout,
those splits are used as they are (see `torchslim.data.assign_splits`: without ``test/``, ``val/`` is the held-out
set scored, and the validation split is carved from train); otherwise the files are split by the recipe's
``split.fractions`` (default 80/10/10) with ``split.seed``. Calibration draws from train. Every file's header is
read up front, so an unreadable image is reported before any work, naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from torchslim.data import DataBundle, assign_splits, register_data_prefix
from torchslim.data.config import DataConfig
from torchslim.errors import InputError, describe

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def check_image(path: Path, where: str) -> None:
    """Raise InputError unless ``path`` is an image file PIL can identify (reads the header only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (the header is parsed on open)
    except FileNotFoundError:
        raise InputError(f"{where}: image {path} not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"{where}: {path}: unreadable image ({type(error).__name__}); "
                         f"remove or replace the file") from None


class ImageFiles(Sequence):
    """Images decoded on access as uint8 HxWxC RGB arrays, from paths (or encoded bytes).

    ``pil(index)`` gives the decoded PIL image, for preprocessing that works on PIL images (torchvision's and
    timm's transforms).
    """

    def __init__(self, paths: list):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def pil(self, index: int):
        from PIL import Image

        item = self.paths[index]
        try:
            with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # what PIL raises
            name = item if not isinstance(item, bytes) else "an image"
            raise InputError(f"data: {name}: cannot decode the image ({describe(error, 120)}); "
                             f"remove or replace the file") from None

    def __getitem__(self, index):  # type: ignore[override]
        return np.asarray(self.pil(index))


def _class_files(root: Path, classes: list[str], where: str) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() in EXTENSIONS:
                check_image(file, where)
                files.append(file)
                labels.append(label)
    return files, labels


def _layout(root: Path) -> dict[str, Path]:
    """Split name -> folder: the train/val/test sub-folders, or ``{"all": root}``."""
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = SPLIT_FOLDERS.get(folder.name.lower())
        if name and name not in found:
            found[name] = folder
    return found if "train" in found else {"all": root}


@register_data_prefix("imagefolder")
def load_imagefolder(path: str, seed: int = 0, config: DataConfig | None = None) -> DataBundle:
    """``imagefolder:PATH``: one sub-folder of images per class (the torchvision ImageFolder layout)."""
    config = config or DataConfig(spec=f"imagefolder:{path}")
    where = f"data: imagefolder:{path}"
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{where}: folder not found")
    layout = _layout(root)
    classes = sorted({p.name for folder in layout.values() for p in folder.iterdir() if p.is_dir()})
    files: list[Path] = []
    labels: list[int] = []
    given = {}
    for name, folder in layout.items():
        found, found_labels = _class_files(folder, classes, where)
        if not found:
            raise InputError(f"{where}: {folder} holds no images in class sub-folders")
        given[name] = np.arange(len(files), len(files) + len(found))
        files += found
        labels += found_labels
    if len(classes) < 2 or len(files) < 10:
        raise InputError(f"{where}: needs >= 2 class folders and >= 10 images, "
                         f"found {len(classes)} classes and {len(files)} images")
    labels_array = np.asarray(labels, dtype=np.int64)
    parts, split_info = assign_splits(given, config.split, seed, where)
    sizes = " / ".join(f"{len(parts[n])} {n}" for n in ("train", "val", "test"))
    return DataBundle(
        spec=f"imagefolder:{path}", modality="image",
        splits={name: ImageFiles([files[i] for i in index]) for name, index in parts.items()},
        labels={name: labels_array[index] for name, index in parts.items()},
        num_classes=len(classes), class_names=classes,
        notes=[f"imagefolder: {len(files)} images in {len(classes)} classes ({sizes}; {split_info['split']})"],
        split_info={**split_info, "layout": sorted(layout)},
    )
