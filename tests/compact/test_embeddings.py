"""compress_embeddings: row-wise int8/int4 tables, hashing, QR and mixed-dim tables, bytes, reports, artifacts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim._context import _StepContext as StepContext
from torchslim.compact.embedding_bags import (HashedEmbeddingBag, ProjectedEmbeddingBag, QREmbeddingBag,
                                              QuantizedEmbeddingBag, packed_row_bytes)
from torchslim.compact.embeddings import (HashingConfig, MixedDimensionConfig, QuotientRemainderConfig, RowwiseInt4Config, RowwiseInt8Config,
                                          _fit_quotient_remainder, compress_embeddings_, embedding_bytes,
                                          lookup_counts, mixed_dimensions)
from torchslim.data import DataBundle
from torchslim.registry import get_method
from torchslim.zoo import ModelBundle
from torchslim.zoo.dlrm import DLRM, ClickPreprocess

ROWS = (100, 3000, 20_000)
METHODS = {"rowwise-int8": RowwiseInt8Config(), "rowwise-int4": RowwiseInt4Config(), "hashing": HashingConfig(min_rows=1000),
           "qr": QuotientRemainderConfig(min_rows=1000), "mixed-dim": MixedDimensionConfig(alpha=0.4, min_rows=1000)}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny recommender ops: a second intra-op thread only adds waits when the shared machine's other core is busy
    # (conftest restores the thread count).
    torch.set_num_threads(1)


def table(rows: int = 5000, dim: int = 16, mode: str = "sum", seed: int = 0) -> nn.EmbeddingBag:
    torch.manual_seed(seed)
    return nn.EmbeddingBag(rows, dim, mode=mode)


def recommender_context(tmp_path, samples: int = 3000) -> StepContext:
    """A small DLRM (tables of 100, 3,000 and 20,000 rows, dim 8) on Zipf-distributed ids."""
    rng = np.random.default_rng(0)
    ids = np.stack([np.minimum(rng.zipf(1.3, samples) - 1, n - 1) for n in ROWS], 1).astype(np.int64)
    dense = rng.random((samples, 13)).astype(np.float32)
    labels = rng.integers(0, 2, samples)
    rows = [(dense[i], ids[i]) for i in range(samples)]
    data = DataBundle(spec="test:zipf", modality="clicks", splits={"train": rows, "val": rows[:500],
                                                                   "test": rows[:500], "calib": rows[:100]},
                      labels={"train": labels, "val": labels[:500], "test": labels[:500], "calib": labels[:100]})
    torch.manual_seed(0)
    model = DLRM(ROWS, dim=8, bottom=(16,), top=(16,)).eval()
    with torch.no_grad():
        for bag in model.embeddings:
            bag.weight.normal_()
    preprocess = ClickPreprocess(table_rows=ROWS)
    bundle = ModelBundle(model=model, spec="test:dlrm", task="ctr", modality="clicks", preprocess=preprocess,
                         example_inputs=preprocess.example)
    return StepContext(model=model, teacher=copy.deepcopy(model).requires_grad_(False), bundle=bundle, data=data,
                       seed=0, threads=1, workdir=tmp_path, progress=False, where="test")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kernel", [True, False], ids=["fbgemm-kernel", "gather-dequantize"])
def test_quantized_lookups_equal_an_embedding_bag_over_the_dequantized_table(bits, kernel):
    quantized = QuantizedEmbeddingBag.from_float(table(), bits)
    quantized.use_kernel = kernel
    dequantized = quantized.dequantize()
    ids = torch.randint(0, 5000, (64, 3))
    assert torch.allclose(quantized(ids), F.embedding_bag(ids, dequantized, mode="sum"), atol=1e-5)
    flat, offsets = torch.randint(0, 5000, (50,)), torch.tensor([0, 3, 3, 10, 40])  # an empty bag too
    weights = torch.rand(50)
    assert torch.allclose(quantized(flat, offsets, weights),
                          F.embedding_bag(flat, dequantized, offsets, mode="sum", per_sample_weights=weights),
                          atol=1e-5)
    mean = QuantizedEmbeddingBag.from_float(table(mode="mean"), bits)
    mean.use_kernel = kernel
    assert torch.allclose(mean(flat, offsets), F.embedding_bag(flat, mean.dequantize(), offsets, mode="mean"),
                          atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_layout_is_fbgemms_and_the_error_is_within_half_a_step(bits):
    bag = table()
    quantized = QuantizedEmbeddingBag.from_float(bag, bits)
    unpack = (torch.ops.quantized.embedding_bag_byte_unpack if bits == 8
              else torch.ops.quantized.embedding_bag_4bit_unpack)
    assert torch.allclose(quantized.dequantize(), unpack(quantized.packed), atol=1e-6)
    weight = bag.weight.detach()
    half_step = (weight.amax(1) - weight.amin(1)) / (2 ** bits - 1) / 2
    tolerance = 1e-5 if bits == 8 else 5e-3  # 4-bit rows keep fp16 scales and biases
    assert bool(((quantized.dequantize() - weight).abs().amax(1) <= half_step + tolerance).all())


@pytest.mark.parametrize("config, fraction", [(RowwiseInt8Config(min_rows=0), 1 / 4 + 8 / 64),
                                              (RowwiseInt4Config(min_rows=0), 1 / 8 + 4 / 64)])
def test_row_wise_bytes_are_a_quarter_or_an_eighth_plus_the_per_row_scale_and_bias(config, fraction):
    model = nn.ModuleList([table(rows) for rows in ROWS])  # dim 16: 64 fp32 bytes per row
    before = embedding_bytes(model)
    details, kept = compress_embeddings_(model, config)
    assert not kept and before == sum(ROWS) * 64
    assert details["embedding_bytes_after"] == embedding_bytes(model) == round(before * fraction)
    assert details["embedding_bytes_after"] == sum(ROWS) * packed_row_bytes(16, 8 if "8" in details["method"] else 4)
    assert [r["rows_after"] for r in details["tables"]] == list(ROWS)


def test_hashing_shrinks_tables_keeps_shapes_and_averages_rows_by_lookups():
    bag = table(rows=20_000)
    model = nn.ModuleList([bag, table(rows=500)])
    counts = torch.zeros(20_000, dtype=torch.float64)
    counts[7] = 1000.0  # id 7 is popular: its shared row should be (almost) its own
    details, kept = compress_embeddings_(model, HashingConfig(rows_ratio=0.1), counts={"0": counts})
    hashed = model[0]
    assert isinstance(hashed, HashedEmbeddingBag) and hashed.bag.num_embeddings == 2000
    assert kept == {"1": "500 rows < min_rows 10000"}
    ids = torch.tensor([[7], [2007], [19_999]])
    assert hashed(ids).shape == (3, 16)
    assert torch.equal(hashed(ids)[0], hashed(ids)[1])  # 7 and 2007 share a row
    assert torch.allclose(hashed.bag.weight[7], bag.weight[7], atol=1e-3)
    assert details["tables"][0]["rows_after"] == 2000
    assert details["embedding_ratio"] == pytest.approx((20_500 * 64) / (2500 * 64), rel=1e-3)


def test_hashing_max_rows_caps_only_the_large_tables():
    model = nn.ModuleList([table(rows) for rows in (20_000, 60_000)])
    details, kept = compress_embeddings_(model, HashingConfig(rows_ratio=1.0, max_rows=30_000))
    assert "0" in kept and "already within" in kept["0"]
    assert model[1].bag.num_embeddings == 30_000 and details["tables_compressed"] == 1


@pytest.mark.parametrize("operation", ["mult", "add"])
def test_quotient_remainder_fit_recovers_a_table_that_is_exactly_compositional(operation):
    torch.manual_seed(0)
    quotient, remainder = torch.randn(250, 8).double(), torch.rand(4, 8).double() + 0.5
    ids = torch.arange(1000)
    weight = quotient[ids // 4] * remainder[ids % 4] if operation == "mult" else \
        quotient[ids // 4] + remainder[ids % 4]
    q, r = _fit_quotient_remainder(weight, 4, operation, torch.ones(1000, dtype=torch.float64), iterations=20)
    rebuilt = q[ids // 4] * r[ids % 4] if operation == "mult" else q[ids // 4] + r[ids % 4]
    assert float((rebuilt - weight).abs().max()) < 1e-6


def test_qr_tables_shrink_keep_shapes_and_give_colliding_ids_distinct_vectors():
    model = nn.ModuleList([table(rows=20_000)])
    details, _ = compress_embeddings_(model, QuotientRemainderConfig(collisions=8))
    qr = model[0]
    assert isinstance(qr, QREmbeddingBag)
    assert (qr.quotient.num_embeddings, qr.remainder.num_embeddings) == (2500, 8)
    assert details["tables"][0]["rows_after"] == [2500, 8]
    out = qr(torch.tensor([[8], [9]]))  # same quotient row, different remainder rows
    assert out.shape == (2, 16) and not torch.allclose(out[0], out[1])
    flat, offsets = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2])
    pooled = qr(flat, offsets)
    assert torch.allclose(pooled[0], qr(torch.tensor([[1, 2]]))[0], atol=1e-6)


def test_mixed_dimensions_follow_the_power_rule_and_the_projection_is_exact_for_low_rank_tables():
    widths = mixed_dimensions({"a": 1000, "b": 16_000, "c": 1_000_000}, 16, MixedDimensionConfig(alpha=0.25))
    assert widths == {"a": 16, "b": 8, "c": 4}  # 16 * (1000 / rows) ** 0.25 = 16, 8, 2.8 -> powers of two
    torch.manual_seed(0)
    bag = table(rows=20_000)
    with torch.no_grad():  # rank 4: a width-4 table and its projection reproduce it
        bag.weight.copy_(torch.randn(20_000, 4) @ torch.randn(4, 16))
    reference = copy.deepcopy(bag)
    model = nn.ModuleList([table(rows=1000), bag])
    details, _ = compress_embeddings_(model, MixedDimensionConfig(alpha=0.5, min_rows=0))  # 16 * 0.05 ** 0.5 -> 4
    assert isinstance(model[1], ProjectedEmbeddingBag) and model[1].bag.embedding_dim == 4
    ids = torch.randint(0, 20_000, (32, 2))
    assert torch.allclose(model[1](ids), reference(ids), atol=1e-4)
    assert details["tables"][0]["dim_after"] == 4


def test_tables_a_method_cannot_handle_or_where_it_does_not_pay_are_kept_and_reported(tmp_path):
    model = nn.ModuleDict({"odd": table(rows=5000, dim=7), "pooled_max": table(mode="max"), "tiny": table(rows=10),
                           "ok": table(), "words": nn.Embedding(5000, 16)})
    details, kept = compress_embeddings_(model, RowwiseInt4Config(skip=["ok"]))
    assert set(kept) == {"odd", "pooled_max", "tiny", "ok", "words"}
    assert "odd width 7" in kept["odd"] and "max pooling" in kept["pooled_max"]
    assert "min_rows" in kept["tiny"] and "skip" in kept["ok"] and "nn.Embedding" in kept["words"]
    assert details["tables_compressed"] == 0 and details["embedding_ratio"] == 1.0
    assert all(type(m) in (nn.EmbeddingBag, nn.Embedding) for m in model.values())


def test_lookup_counts_count_every_id_the_model_reads(tmp_path):
    context = recommender_context(tmp_path, samples=300)
    tables = {f"embeddings.{i}": bag for i, bag in enumerate(context.model.embeddings)}
    batches = (inputs for inputs, _ in context.data.batches("train", context.bundle.preprocess, 128))
    counts = lookup_counts(context.model, tables, batches)
    ids = np.stack([row[1] for row in context.data.splits["train"]])
    assert float(counts["embeddings.2"].sum()) == 300
    assert torch.equal(counts["embeddings.1"], torch.bincount(torch.from_numpy(ids[:, 1]), minlength=3000).double())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_keeps_outputs_shaped_reports_bytes_and_reloads_from_safetensors(tmp_path, name):
    from safetensors import safe_open

    context = recommender_context(tmp_path)
    inputs = context.example_inputs(16)
    deployable = get_method("compress_embeddings", name).handler(context, METHODS[name])
    details = deployable.details
    assert deployable(inputs).shape == (16,)
    assert details["method"] == name and details["embedding_bytes_after"] < details["embedding_bytes_before"]
    assert details["embedding_bytes_after"] == embedding_bytes(context.model)
    assert "embeddings.0" in context.skipped  # the 100-row table is left alone and listed
    path = deployable.save(tmp_path / "artifact")
    with safe_open(str(path), "pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    if name.startswith("rowwise"):
        assert stored["embeddings.2.packed"].dtype == torch.uint8 and "embeddings.2.weight" not in stored
    stored_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if k.startswith("embeddings."))
    assert stored_bytes == details["embedding_bytes_after"]
    reloaded = deployable.load_and_run(path, inputs)
    assert torch.equal(reloaded, deployable(inputs))


def test_hashing_then_finetune_then_int4_composes_and_the_finetune_lowers_the_loss(tmp_path):
    from torchslim.recover.finetune import DistillConfig, FinetuneConfig, finetune
    from torchslim.recover.optim import OptimizerConfig, ScheduleConfig

    context = recommender_context(tmp_path)
    get_method("compress_embeddings", "hashing").handler(context, HashingConfig(rows_ratio=0.1, min_rows=1000))
    config = FinetuneConfig(epochs=2, batch_size=256, device="cpu", schedule=ScheduleConfig(name="constant"),
                            optimizer=OptimizerConfig(name="adagrad", lr=0.05, weight_decay=0.0),
                            distill=DistillConfig(alpha=1.0, temperature=1.0))
    losses = finetune(context, config).details["train_loss"]
    assert losses[-1] < losses[0]
    details = get_method("compress_embeddings", "rowwise-int4").handler(context, RowwiseInt4Config(min_rows=0)).details
    assert isinstance(context.model.embeddings[2].bag, QuantizedEmbeddingBag)
    assert [r["form"] for r in details["tables"]] == ["int4 row-wise"] * 3  # the hashed tables' inner rows too
    assert details["embedding_bytes_after"] == (100 + 300 + 2000) * packed_row_bytes(8, 4)


def test_a_model_without_embedding_tables_is_returned_unchanged(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    details, kept = compress_embeddings_(model, HashingConfig())
    assert details["tables_compressed"] == 0 and details["embedding_bytes_before"] == 0 and not kept
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
