"""``builtin:clicks``: synthetic click-through data shaped like Criteo's (13 dense + 26 categorical features).

Generated once from a fixed seed and cached (`torchslim._cache.cache_dir`). Categorical ids follow a bounded
Zipf law over tables whose sizes are log-spaced from 10^3 to 10^6 rows; ids are a seeded permutation of the
popularity rank, as hashed production ids are. Labels are drawn from a hidden ground-truth model: a logistic of
dense weights, a per-id bias for every table, and dot products of per-id latent vectors for fixed pairs of
tables (the interactions a DLRM's dot-product layer can represent), so a good model reaches a clearly better
ROC-AUC than chance, while the rare ids of the long tail stay hard to learn, as in real click logs.

A sample is a row ``(dense float32[13], ids int64[26])``; labels are 0/1.

Example:
    >>> data = resolve_data("builtin:clicks")
    >>> dense, ids = data.splits["test"][0]
    >>> dense.shape, ids.shape, data.labels["test"][:3]
    ((13,), (26,), array([0, 1, 1]))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from torchslim.data import DataBundle, register_builtin_data

VERSION = 1
DATA_SEED = 20240917  # the data is fixed, whatever the recipe's seed, so scores stay comparable
DENSE_FEATURES = 13
TABLE_ROWS = tuple(int(n) for n in np.round(np.logspace(3, 6, 26)))
SPLIT_SIZES = {"train": 360_000, "val": 40_000, "test": 100_000}
CALIB_SIZE = 4096
LATENT_DIM = 4
INTERACTION_PAIRS = 24
CLICK_RATE = 0.25


class ClickRows(Sequence):
    """Rows of one split as ``(dense, ids)`` pairs of numpy views, without one Python object per row."""

    def __init__(self, dense: np.ndarray, ids: np.ndarray):
        self.dense, self.ids = dense, ids

    def __len__(self) -> int:
        return len(self.dense)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ClickRows(self.dense[index], self.ids[index])
        return self.dense[index], self.ids[index]

    def take(self, index: np.ndarray) -> ClickRows:
        return ClickRows(self.dense[index], self.ids[index])


def _zipf_ranks(rng: np.random.Generator, rows: int, exponent: float, count: int) -> np.ndarray:
    """``count`` popularity ranks in ``[0, rows)`` drawn from a Zipf law truncated at ``rows`` (inverse CDF)."""
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(count)), rows - 1)


def _dense_features(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(log1p of log-normal counts, their standardised latent): Criteo's dense features are logged counts."""
    latent = rng.standard_normal((count, DENSE_FEATURES))
    mixing = np.eye(DENSE_FEATURES) + 0.3 * rng.standard_normal((DENSE_FEATURES, DENSE_FEATURES))
    latent = latent @ mixing / np.sqrt(1 + 0.09 * DENSE_FEATURES)
    scale = rng.uniform(0.5, 2.0, DENSE_FEATURES)
    counts = np.floor(np.exp(rng.uniform(0.5, 3.0, DENSE_FEATURES) + scale * latent))
    return np.log1p(counts).astype(np.float32), latent


def _categorical(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(ids [count, 26], per-sample sum of id biases [count], per-sample latent vector of each table)."""
    ids = np.empty((count, len(TABLE_ROWS)), dtype=np.int64)
    bias = np.zeros(count)
    latent = []
    for t, rows in enumerate(TABLE_ROWS):
        exponent = 1.05 + 0.25 * rng.random()
        ranks = _zipf_ranks(rng, rows, exponent, count)
        ids[:, t] = rng.permutation(rows)[ranks]
        # Popular ids matter more than rare ones (their effects shrink along the tail), as in real logs.
        shrink = ((1 + np.arange(rows) / 50.0) ** -0.25).astype(np.float32)
        bias += (0.45 * rng.standard_normal(rows, dtype=np.float32) * shrink)[ranks]
        table = 0.55 * rng.standard_normal((rows, LATENT_DIM), dtype=np.float32) * shrink[:, None]
        latent.append(table[ranks])
    return ids, bias, latent


def _hidden_logits(rng: np.random.Generator, dense_latent: np.ndarray, bias: np.ndarray,
                   latent: list[np.ndarray]) -> np.ndarray:
    tables = len(latent)
    weights = rng.normal(0, 0.35, DENSE_FEATURES)
    logits = dense_latent @ weights + 0.25 * dense_latent[:, 0] * dense_latent[:, 1] + bias
    pairs = rng.choice(tables * (tables - 1) // 2, INTERACTION_PAIRS, replace=False)
    first, second = np.tril_indices(tables, -1)
    for pair in pairs:
        logits += (latent[first[pair]] * latent[second[pair]]).sum(-1)
    # Dense features steer latent effects too (what the bottom MLP's vector is dotted with in a DLRM).
    projection = rng.normal(0, 0.25, (DENSE_FEATURES, LATENT_DIM))
    steer = dense_latent @ projection
    for t in range(4):
        logits += (steer * latent[t]).sum(-1)
    return logits


def _intercept(logits: np.ndarray) -> float:
    """The offset that makes the mean click probability `CLICK_RATE` (bisection)."""
    low, high = -20.0, 20.0
    for _ in range(60):
        middle = (low + high) / 2
        if (1 / (1 + np.exp(-(logits + middle)))).mean() < CLICK_RATE:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def generate_clicks(count: int, seed: int = DATA_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``count`` rows: (dense float32 [count, 13], ids int64 [count, 26], labels int64 [count], true logits).

    Deterministic for a seed; the hidden model (weights, pairs, per-id effects) depends on the seed only.
    """
    rng = np.random.default_rng(seed)
    dense, dense_latent = _dense_features(rng, count)
    ids, bias, latent = _categorical(rng, count)
    logits = _hidden_logits(rng, dense_latent, bias, latent)
    logits += _intercept(logits)
    labels = (rng.random(count) < 1 / (1 + np.exp(-logits))).astype(np.int64)
    return dense, ids, labels, logits.astype(np.float32)


def _cache_path():
    from torchslim._cache import cache_dir

    return cache_dir("data") / f"clicks-v{VERSION}.npz"


def _load_arrays() -> dict[str, np.ndarray]:
    """The generated arrays, from the cache (generated, about 10 s, and cached on first use)."""
    import io

    from torchslim._cache import atomic_write_bytes

    path = _cache_path()
    if path.exists():
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    dense, ids, labels, logits = generate_clicks(sum(SPLIT_SIZES.values()))
    arrays = {"dense": dense, "ids": ids.astype(np.int32), "labels": labels.astype(np.int8), "logits": logits}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return arrays


@register_builtin_data("clicks")
def load_clicks(seed: int = 0) -> DataBundle:
    """Synthetic click-through data shaped like Criteo's (13 dense + 26 categorical features)."""
    arrays = _load_arrays()
    rows = ClickRows(arrays["dense"], arrays["ids"].astype(np.int64))
    labels = arrays["labels"].astype(np.int64)
    bounds = np.cumsum([0] + list(SPLIT_SIZES.values()))
    parts = {name: slice(a, b) for name, a, b in zip(SPLIT_SIZES, bounds[:-1], bounds[1:])}  # views, no copies
    parts["calib"] = np.sort(np.random.default_rng(seed).permutation(SPLIT_SIZES["train"])[:CALIB_SIZE])
    sizes = " / ".join(f"{size} {name}" for name, size in SPLIT_SIZES.items())
    return DataBundle(
        spec="builtin:clicks",
        modality="clicks",
        splits={name: rows.take(index) if name == "calib" else rows[index] for name, index in parts.items()},
        labels={name: labels[index] for name, index in parts.items()},
        num_classes=None,
        notes=[f"clicks: synthetic click log, {sizes} rows; 13 dense + 26 categorical features "
               f"(tables of {TABLE_ROWS[0]:,} to {TABLE_ROWS[-1]:,} rows, Zipf ids); "
               f"click rate {labels.mean():.3f}"],
    )
