"""``builtin:digits``: scikit-learn's bundled 8x8 handwritten digits with a fixed seeded split.

1,797 images: 60% train, 10% validation, 30% test; calibration draws from the training split.
"""

from __future__ import annotations

import numpy as np

from torchslim.data import DataBundle, register_builtin_data, split_indices

SPLIT_SEED = 20240601  # the split is fixed, whatever the recipe's seed, so scores stay comparable


@register_builtin_data("digits")
def load_digits(seed: int = 0) -> DataBundle:
    """scikit-learn's 8x8 handwritten digits (10 classes) with a fixed seeded split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # 8x8x1 in [0, 1]
    labels = digits.target.astype(np.int64)
    train, val, test = split_indices(len(images), (0.6, 0.1, 0.3), SPLIT_SEED)
    calib = train[np.random.default_rng(seed).permutation(len(train))[:256]]
    parts = {"train": train, "val": val, "test": test, "calib": calib}
    return DataBundle(
        spec="builtin:digits",
        modality="image",
        splits={name: [images[i] for i in index] for name, index in parts.items()},
        labels={name: labels[index] for name, index in parts.items()},
        num_classes=10,
        notes=[f"digits: {len(train)} train / {len(val)} val / {len(test)} test images (8x8, grey)"],
        split_info={"split": "fixed split [0.6, 0.1, 0.3]", "split_seed": SPLIT_SEED, "calibration_seed": seed},
    )
