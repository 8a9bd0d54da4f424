"""``builtin:dlrm``: a DLRM-style click-through model (Naumov et al., 2019) for ``builtin:clicks``.

A bottom MLP embeds the 13 dense features into the embedding space; each of the 26 categorical features is
pooled by its own ``nn.EmbeddingBag`` (dimension 16, ``mode="sum"``, sparse gradients); the pairwise dot
products of those 27 vectors, with the bottom vector, feed a top MLP that gives one logit per sample. The
tables hold 4.1 M rows (265 MB of fp32): almost all of the model's bytes, which is what
``compress_embeddings`` compresses. Trained once (seeded, Adagrad, one epoch: about a minute on two cores,
test ROC-AUC 0.83) and cached as safetensors.

Example:
    >>> bundle = resolve_model("builtin:dlrm")
    >>> bundle.model(*bundle.example_inputs(4)).shape
    torch.Size([4])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchslim._cache import cache_dir

VERSION = 1
EMBEDDING_DIM = 16


def mlp(widths: Sequence[int], final_relu: bool) -> nn.Sequential:
    """Linear layers between consecutive ``widths``, ReLU after each (after the last one too if asked)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if final_relu or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Bottom MLP, one EmbeddingBag per categorical feature, dot-product interaction, top MLP -> a logit.

    Args:
        table_rows: rows of each categorical feature's table.
        dense_features: width of the dense input.
        dim: embedding dimension (also the bottom MLP's output width).
        bottom: hidden widths of the bottom MLP.
        top: hidden widths of the top MLP.
    """

    def __init__(self, table_rows: Sequence[int], dense_features: int = 13, dim: int = EMBEDDING_DIM,
                 bottom: Sequence[int] = (64, 32), top: Sequence[int] = (128, 64)):
        super().__init__()
        self.bottom = mlp([dense_features, *bottom, dim], final_relu=True)
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum", sparse=True) for rows in table_rows)
        vectors = len(table_rows) + 1
        self.top = mlp([dim + vectors * (vectors - 1) // 2, *top, 1], final_relu=False)
        first, second = torch.tril_indices(vectors, vectors, -1)
        self.register_buffer("pair_first", first, persistent=False)
        self.register_buffer("pair_second", second, persistent=False)
        self.reset_embeddings()

    def reset_embeddings(self) -> None:
        # DLRM's initialisation: uniform in +-1/sqrt(rows), so that never-seen rows stay near zero.
        with torch.no_grad():
            for bag in self.embeddings:
                bound = bag.num_embeddings ** -0.5
                bag.weight.uniform_(-bound, bound)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        pooled = [bag(ids[:, t:t + 1]) for t, bag in enumerate(self.embeddings)]
        vectors = torch.stack([x, *pooled], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))[:, self.pair_first, self.pair_second]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(-1)


@dataclass
class ClickPreprocess:
    """Rows ``(dense float32[F], ids int64[T])`` -> ``(dense [N, F] float32, ids [N, T] int64)``.

    Ids are folded into each table (``id % rows``: the hashing trick DLRMs apply to raw categorical values), so a
    click log whose ids were hashed from strings, or exceed a table, still indexes it. ``table_rows`` also
    bounds the ids of `example` (random, seeded, valid for every table).
    """

    table_rows: tuple[int, ...]
    dense_features: int = 13

    def __call__(self, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        dense = torch.from_numpy(np.stack([row[0] for row in rows]).astype(np.float32, copy=False))
        ids = torch.from_numpy(np.stack([row[1] for row in rows]).astype(np.int64, copy=False))
        if dense.shape[1] != self.dense_features or ids.shape[1] != len(self.table_rows):
            from torchslim.errors import InputError

            raise InputError(f"data: click rows have {dense.shape[1]} dense and {ids.shape[1]} categorical features; "
                             f"the model takes {self.dense_features} and {len(self.table_rows)}")
        return dense, torch.remainder(ids, torch.tensor(self.table_rows, dtype=torch.int64))

    def describe(self) -> dict:
        return {"kind": "clicks", "dense_features": self.dense_features, "table_rows": list(self.table_rows),
                "ids": "id % table_rows per categorical feature", "inputs": ["dense", "ids"]}

    def example(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        dense = torch.rand(batch_size, self.dense_features, generator=generator) * 3
        rows = torch.tensor(self.table_rows, dtype=torch.float64)
        ids = (torch.rand(batch_size, len(self.table_rows), generator=generator, dtype=torch.float64) * rows).long()
        return dense, ids


def click_preprocess() -> ClickPreprocess:
    """builtin:dlrm's preprocess, its example ids sized for builtin:clicks' tables."""
    from torchslim.data.clicks import DENSE_FEATURES, TABLE_ROWS

    return ClickPreprocess(table_rows=TABLE_ROWS, dense_features=DENSE_FEATURES)


def validation_auc(model: nn.Module, data, preprocess: ClickPreprocess, split: str = "val") -> float:
    """ROC-AUC of ``model`` on a split of ``data``."""
    from torchslim.measure.metrics import roc_auc

    scores, labels = [], []
    with torch.inference_mode():
        for inputs, target in data.batches(split, preprocess, 4096):
            scores.append(model(*inputs))
            labels.append(target)
    return roc_auc(torch.cat(scores), torch.cat(labels))


def train_dlrm(seed: int = 0, epochs: int = 1, progress: bool = True) -> tuple[DLRM, dict]:
    """Train a DLRM on builtin:clicks (train split) with BCE; deterministic for a seed.

    One epoch: like production CTR models, a DLRM overfits from the second pass over the same clicks on
    (validation AUC 0.81 after one epoch, 0.77 after two).
    """
    from torchslim.data import resolve_data
    from torchslim.recover.trainer import (OptimizerConfig, ScheduleConfig, SplitDataset, TrainConfig, Trainer,
                                           batch_collate)

    import torchslim.data.clicks  # noqa: F401  (registers builtin:clicks)

    torch.manual_seed(seed)
    preprocess = click_preprocess()
    data = resolve_data("builtin:clicks", seed)
    model = DLRM(preprocess.table_rows)

    def loss_fn(outputs, inputs, labels):
        return {"bce": F.binary_cross_entropy_with_logits(outputs, labels.float())}

    # Adagrad updates only the looked-up rows of the sparse gradients and keeps per-row step sizes, which
    # rare ids need; weight decay would densify the gradients.
    config = TrainConfig(epochs=epochs, batch_size=256, optimizer=OptimizerConfig(name="adagrad", lr=0.02,
                                                                                   weight_decay=0.0),
                         schedule=ScheduleConfig(name="constant"), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches of small ops: per-op overhead, which more threads only add to
    try:
        Trainer(model, loss_fn, SplitDataset(data.splits["train"], data.labels["train"]),
                batch_collate(preprocess, labelled=True), config, seed=seed,
                description="training builtin:dlrm (once, then cached)", progress=progress).fit()
    finally:
        torch.set_num_threads(threads)
    return model, {"val_auc": round(validation_auc(model, data, preprocess), 5), "epochs": epochs, "seed": seed,
                   "version": VERSION}


def load_dlrm(progress: bool = True) -> DLRM:
    """The cached trained model (trained and cached on first use)."""
    from safetensors.torch import load_file, save_file

    from torchslim.data.clicks import TABLE_ROWS

    path = cache_dir("models") / f"dlrm-v{VERSION}.safetensors"
    model = DLRM(TABLE_ROWS)
    if path.exists():
        model.load_state_dict(load_file(path))
    else:
        model, info = train_dlrm(progress=progress)
        tmp = path.with_suffix(".tmp")
        save_file(model.state_dict(), tmp, metadata={"torchslim": json.dumps(info)})
        tmp.replace(path)
    return model.eval()
