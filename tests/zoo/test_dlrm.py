"""builtin:clicks (synthetic click log), builtin:dlrm, and the "ctr" task in evaluation and fine-tuning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchslim._context import _StepContext as StepContext
import torchslim.data.clicks  # noqa: F401  (registers builtin:clicks until the data loader lists it)
from torchslim.data import DataBundle, resolve_data
from torchslim.data.clicks import CALIB_SIZE, SPLIT_SIZES, TABLE_ROWS, ClickRows, generate_clicks
from torchslim.measure.stage import evaluate
from torchslim.pipeline import _check_compatible
from torchslim.recover.losses import get_loss
from torchslim.zoo import ModelBundle, resolve_model
from torchslim.zoo.dlrm import DLRM, ClickPreprocess


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny recommender ops: a second intra-op thread only adds waits when the shared machine's other core is busy
    # (conftest restores the thread count).
    torch.set_num_threads(1)


def test_clicks_generation_is_deterministic_for_a_seed_and_shaped_like_criteo():
    dense, ids, labels, logits = generate_clicks(3000, seed=7)
    again = generate_clicks(3000, seed=7)
    other = generate_clicks(3000, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip((dense, ids, labels, logits), again))
    assert not np.array_equal(ids, other[1])
    assert dense.shape == (3000, 13) and dense.dtype == np.float32 and (dense >= 0).all()
    assert ids.shape == (3000, 26) and ids.dtype == np.int64
    assert (ids >= 0).all() and (ids < np.array(TABLE_ROWS)).all()
    assert TABLE_ROWS[0] == 1000 and TABLE_ROWS[-1] == 1_000_000
    assert labels.mean() == pytest.approx(0.25, abs=0.03)


def test_clicks_ids_follow_a_heavy_tail():
    _, ids, _, _ = generate_clicks(20_000, seed=3)
    column = ids[:, -1]  # the 10^6-row table
    _, counts = np.unique(column, return_counts=True)
    top = np.sort(counts)[::-1]
    assert top[:10].sum() > 0.3 * len(column)  # ten ids take a third of the lookups ...
    assert len(counts) > 3_000 and (counts == 1).mean() > 0.5  # ... while most of thousands of ids appear once


def test_builtin_clicks_has_fixed_splits_rows_and_signal():
    from torchslim.measure.metrics import roc_auc

    data = resolve_data("builtin:clicks")
    assert data.modality == "clicks" and data.num_classes is None and data.has_labels
    assert {k: len(v) for k, v in data.splits.items()} == {**SPLIT_SIZES, "calib": CALIB_SIZE}
    dense, ids = data.splits["test"][0]
    assert dense.shape == (13,) and dense.dtype == np.float32 and ids.shape == (26,) and ids.dtype == np.int64
    assert set(np.unique(data.labels["train"])) == {0, 1}
    # The hidden model's own logits rank clicks far better than chance: the labels carry signal.
    stored = np.load(torchslim.data.clicks._cache_path())["logits"][-SPLIT_SIZES["test"]:]
    assert roc_auc(stored, data.labels["test"]) > 0.9


def test_trained_dlrm_reaches_a_good_test_auc_and_evaluates_as_ctr():
    bundle = resolve_model("builtin:dlrm")
    data = resolve_data("builtin:clicks")
    _check_compatible(bundle, data)  # modality "clicks" on both sides
    assert bundle.task == "ctr" and bundle.modality == "clicks"
    outputs, labels = [], []
    with torch.inference_mode():
        for inputs, target in data.batches("test", bundle.preprocess, 4096, limit=20_000):
            outputs.append(bundle.model(*inputs))
            labels.append(target)
    outputs, labels = torch.cat(outputs), torch.cat(labels)
    assert outputs.shape == (20_000,)
    evaluation = evaluate(outputs, labels, None, "ctr")
    assert evaluation.metric == "roc_auc"
    assert evaluation.score > 0.8
    assert evaluation.metrics["logloss"] < 0.5 and evaluation.metrics["prob_mae"] == 0.0
    assert sum(bag.num_embeddings for bag in bundle.model.embeddings) == sum(TABLE_ROWS)


def test_ctr_evaluation_without_labels_scores_fidelity_to_the_reference():
    reference = torch.randn(1000)
    shifted = reference + 0.5
    evaluation = evaluate(shifted, None, reference, "ctr")
    expected = float((torch.sigmoid(shifted) - torch.sigmoid(reference)).abs().mean())
    assert evaluation.metric == "prob_fidelity"
    assert evaluation.metrics["prob_mae"] == pytest.approx(expected, rel=1e-6)
    assert evaluation.score == pytest.approx(1 - expected, rel=1e-6)


def test_binary_losses_match_their_definitions():
    logits, teacher = torch.randn(64), torch.randn(64)
    labels = torch.randint(0, 2, (64,))
    assert float(get_loss("bce")(logits, labels)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, labels.float())), rel=1e-6)
    assert float(get_loss("binary_kd")(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    p, q = torch.sigmoid(teacher / 2), torch.sigmoid(logits / 2)
    kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean() * 4
    assert float(get_loss("binary_kd")(logits, teacher, 2.0)) == pytest.approx(float(kl), rel=1e-4)


def small_ctr_context(tmp_path, rows: int = 4000) -> StepContext:
    """A small DLRM (26 tables of 1,000 rows) on the first rows of generated clicks, ids folded to fit."""
    dense, ids, labels, _ = generate_clicks(rows, seed=11)
    ids = ids % 1000
    cut = {"train": slice(0, rows * 3 // 4), "val": slice(rows * 3 // 4, rows), "test": slice(rows * 3 // 4, rows)}
    data = DataBundle(spec="test:clicks", modality="clicks",
                      splits={k: ClickRows(dense[s], ids[s]) for k, s in cut.items()},
                      labels={k: labels[s] for k, s in cut.items()})
    torch.manual_seed(0)
    preprocess = ClickPreprocess(table_rows=(1000,) * 26)
    model = DLRM((1000,) * 26, dim=8, bottom=(16,), top=(32,)).eval()
    bundle = ModelBundle(model=model, spec="test:dlrm", task="ctr", modality="clicks", preprocess=preprocess,
                         example_inputs=preprocess.example)
    return StepContext(model=model, teacher=copy.deepcopy(model).requires_grad_(False), bundle=bundle, data=data,
                       seed=0, threads=1, workdir=tmp_path, progress=False, where="test")


@pytest.mark.parametrize("distill", [None, {"alpha": 0.5, "temperature": 2.0}])
def test_finetune_trains_a_ctr_model_with_binary_losses(tmp_path, distill):
    from torchslim.recover.finetune import DistillConfig, FinetuneConfig, finetune
    from torchslim.recover.optim import OptimizerConfig, ScheduleConfig

    context = small_ctr_context(tmp_path, rows=2400)
    if distill is not None:  # a trained-looking teacher: the student should move towards it
        with torch.no_grad():
            for p in context.teacher.parameters():
                p.mul_(1.5)
    config = FinetuneConfig(epochs=2, batch_size=128, device="cpu", schedule=ScheduleConfig(name="constant"),
                            optimizer=OptimizerConfig(name="adagrad", lr=0.05, weight_decay=0.0),
                            distill=None if distill is None else DistillConfig(**distill))
    details = finetune(context, config).details
    losses = details["train_loss"]
    assert losses[-1] < losses[0] - 0.01
    assert all(v <= 0 for v in details["val_metric"])  # minus the validation log-loss
    if distill is None:
        assert "loss_terms" not in details  # one term: bce
    else:
        assert set(details["loss_terms"]) == {"bce", "kd"}


@pytest.mark.parametrize("optimizer, field", [({"name": "adamw", "lr": 1e-3}, "optimizer.name"),
                                              ({"name": "sgd"}, "optimizer.weight_decay")])
def test_finetune_names_the_field_when_the_optimizer_cannot_apply_sparse_gradients(tmp_path, optimizer, field):
    from torchslim.errors import InputError
    from torchslim.recover.finetune import FinetuneConfig, finetune
    from torchslim.recover.optim import OptimizerConfig

    context = small_ctr_context(tmp_path, rows=400)  # DLRM tables have sparse gradients
    with pytest.raises(InputError, match=f"^test.{field}: "):
        finetune(context, FinetuneConfig(epochs=1, device="cpu", optimizer=OptimizerConfig(**optimizer)))
