"""``compress_embeddings``: make a recommender's embedding tables (``nn.EmbeddingBag``) smaller.

Methods (one config dataclass each; the config's type picks the method in `compress_embeddings_`):

* ``rowwise-int8`` / ``rowwise-int4``: FBGEMM row-wise quantization, looked up by torch's FBGEMM kernels that
  read the packed rows directly (`QuantizedEmbeddingBag`). No training; the float table is gone.
* ``hashing``: the hashing trick, ids modulo a smaller row count.
* ``qr``: quotient-remainder compositional embeddings (Shi et al., 2020).
* ``mixed-dim``: narrower rows for larger tables, projected to the model's width (Ginart et al., 2021).

The last three change what the table can represent, so a recipe follows them with ``finetune``. They start
from the original table: rows that now share storage are averaged, weighted by how often the training split
looks each id up (counted by running the model over it), so that popular ids keep their vectors. Tables a
method cannot handle or where it does not pay (small tables, a width that would not shrink) stay as they were
and are reported. Quantization also applies to the tables inside hashed, QR and mixed-dim tables, so
``hashing -> finetune -> rowwise-int4`` composes.

Example:
    >>> details, skipped = compress_embeddings_(model, RowwiseInt4Config())
    >>> details["embedding_bytes_before"] / details["embedding_bytes_after"]
    5.33...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from torchslim._config import check
from torchslim._deprecated import renamed
from torchslim.compact.embedding_bags import (
    COMPRESSED_TABLES, EMBEDDING_TABLES, HashedEmbeddingBag, ProjectedEmbeddingBag, QREmbeddingBag,
    QuantizedEmbeddingBag, new_like, storage,
)
from torchslim.core.modules import call_model, matches
from torchslim.data.config import CalibrationConfig
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable


def _check_common(config) -> None:
    check(config.min_rows >= 0, "min_rows", f"must be >= 0, got {config.min_rows}")


def _counting() -> CalibrationConfig:
    # Counting lookups is cheap per sample: the whole training split by default, in large batches.
    return CalibrationConfig(samples=0, batch_size=4096, split="train")


@dataclass(frozen=True)
class RowwiseInt8Config:
    """Config of ``compress_embeddings: {method: rowwise-int8}``: 8-bit codes, fp32 scale and bias per row.

    Args:
        min_rows: tables with fewer rows stay in float (their bytes do not matter; their ids are looked up
            most often).
        skip: table-name patterns (fnmatch) kept in float, e.g. ["embeddings.0"].
    """

    min_rows: int = 256
    skip: list[str] = field(default_factory=list)
    version: int = 1

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass(frozen=True)
class RowwiseInt4Config:
    """Config of ``compress_embeddings: {method: rowwise-int4}``: 4-bit codes, fp16 scale and bias per row.

    Args:
        min_rows: tables with fewer rows stay in float.
        optimized_ranges: FBGEMM's search for each row's range minimising the quantization error (instead of
            the row's min and max); about 10 s per million rows.
        skip: table-name patterns (fnmatch) kept in float.
    """

    min_rows: int = 256
    optimized_ranges: bool = False
    skip: list[str] = field(default_factory=list)
    version: int = 1

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass(frozen=True)
class HashingConfig:
    """Config of ``compress_embeddings: {method: hashing}``: a table of ``rows`` ids gets
    ``min(ceil(rows_ratio * rows), max_rows)`` rows, id modulo that.

    Args:
        rows_ratio: fraction of the rows kept.
        max_rows: at most this many rows per table (0: no cap).
        min_rows: tables with fewer rows stay as they are.
        calibration: the samples whose lookups weight the averaged rows (`CalibrationConfig`; default the whole
            ``train`` split in batches of 4096).
        skip: table-name patterns (fnmatch) left as they are.
    """

    rows_ratio: float = 0.25
    max_rows: int = 0
    min_rows: int = 10_000
    calibration: CalibrationConfig = field(default_factory=_counting)
    skip: list[str] = field(default_factory=list)
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {"frequency_samples": "calibration.samples"}

    def __post_init__(self) -> None:
        _check_common(self)
        check(0 < self.rows_ratio <= 1, "rows_ratio", f"must be in (0, 1], got {self.rows_ratio}")
        check(self.max_rows >= 0, "max_rows", f"must be >= 0, got {self.max_rows}")


@dataclass(frozen=True)
class QuotientRemainderConfig:
    """Config of ``compress_embeddings: {method: qr}``: id ``i`` -> quotient row ``i // collisions`` combined
    with remainder row ``i % collisions``; a table keeps ``ceil(rows / collisions) + collisions`` rows.

    Args:
        collisions: ids sharing a quotient row (the remainder table's rows).
        operation: "mult" (elementwise product, the paper's best) or "add".
        min_rows: tables with fewer rows stay as they are.
        calibration: the samples whose lookups weight the initial fit (`CalibrationConfig`; default the whole
            ``train`` split in batches of 4096).
        skip: table-name patterns (fnmatch) left as they are.
    """

    collisions: int = 4
    operation: Literal["mult", "add"] = "mult"
    min_rows: int = 10_000
    calibration: CalibrationConfig = field(default_factory=_counting)
    skip: list[str] = field(default_factory=list)
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {"frequency_samples": "calibration.samples"}

    def __post_init__(self) -> None:
        _check_common(self)
        check(self.collisions >= 2, "collisions", f"must be >= 2, got {self.collisions}")


@dataclass(frozen=True)
class MixedDimensionConfig:
    """Config of ``compress_embeddings: {method: mixed-dim}``: the power rule of Ginart et al. gives a table of
    ``rows`` rows the width ``dim * (smallest_rows / rows) ** alpha`` (the smallest table keeps ``dim``).

    Args:
        alpha: how fast the width falls with the table size (0: no change; the paper uses 0.1-0.4).
        min_dim: the narrowest width.
        power_of_two: round widths to powers of two.
        min_rows: tables with fewer rows stay as they are.
        calibration: the samples whose lookups weight the initial projection (`CalibrationConfig`; default the whole
            ``train`` split in batches of 4096).
        skip: table-name patterns (fnmatch) left as they are.
    """

    alpha: float = 0.2
    min_dim: int = 2
    power_of_two: bool = True
    min_rows: int = 10_000
    calibration: CalibrationConfig = field(default_factory=_counting)
    skip: list[str] = field(default_factory=list)
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {"frequency_samples": "calibration.samples"}

    def __post_init__(self) -> None:
        _check_common(self)
        check(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.min_dim >= 1, "min_dim", f"must be >= 1, got {self.min_dim}")


# -- measuring ----------------------------------------------------------------------------------------------------
def table_bytes(module: nn.Module) -> int:
    """Bytes of a table's stored tensors (parameters and buffers of its state dict)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def embedding_tables(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost embedding tables of ``model`` (plain or compressed), by module name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, EMBEDDING_TABLES) and not any(name.startswith(f"{t}.") for t in found):
            found[name] = module
    return found


def embedding_bytes(model: nn.Module) -> int:
    """Bytes of all embedding tables of ``model``, as they are stored (packed rows count as packed)."""
    return sum(table_bytes(m) for m in embedding_tables(model).values())


def lookup_counts(model: nn.Module, tables: dict[str, nn.EmbeddingBag], batches) -> dict[str, torch.Tensor]:
    """How often each row of each table is looked up while ``model`` runs over ``batches`` of inputs."""
    counts = {name: torch.zeros(bag.num_embeddings, dtype=torch.float64) for name, bag in tables.items()}

    def counter(name: str):
        def hook(module, args):
            ids = args[0].reshape(-1).cpu()
            counts[name] += torch.bincount(ids, minlength=module.num_embeddings)[:module.num_embeddings]
        return hook

    hooks = [bag.register_forward_pre_hook(counter(name)) for name, bag in tables.items()]
    try:
        with torch.inference_mode():
            for inputs in batches:
                call_model(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return counts


# -- the methods: (tables, config, counts) -> {table name: replacement module, or the reason to keep it} ---------
def _too_small(bag: nn.EmbeddingBag, config) -> str | None:
    if bag.num_embeddings < config.min_rows:
        return f"{bag.num_embeddings} rows < min_rows {config.min_rows}"
    return None


def _quantize(bits: int) -> Callable:
    def method(tables: dict[str, nn.EmbeddingBag], config, counts) -> dict[str, nn.Module | str]:
        plan: dict[str, nn.Module | str] = {}
        for name, bag in tables.items():
            if _too_small(bag, config):
                plan[name] = _too_small(bag, config)
            elif bag.mode == "max":
                plan[name] = "max pooling has no row-wise quantized kernel"
            elif bits == 4 and bag.embedding_dim % 2:
                plan[name] = f"odd width {bag.embedding_dim} (4-bit rows pack two codes per byte)"
            elif bag.padding_idx is not None and bag.mode == "mean":
                plan[name] = "padding_idx with mean pooling (the kernel would count padding ids)"
            else:
                plan[name] = QuantizedEmbeddingBag.from_float(bag, bits, getattr(config, "optimized_ranges", False))
        return plan
    return method


def _weights(counts: torch.Tensor | None, rows: int) -> torch.Tensor:
    """Per-row weights of the initial averages: lookup counts, plus a little so unseen rows still count."""
    base = torch.ones(rows, dtype=torch.float64) * 1e-3
    return base if counts is None else counts + base


def _segment_mean(values: torch.Tensor, groups: torch.Tensor, size: int, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``values`` [n, d] per group id in ``[0, size)``."""
    total = torch.zeros(size, values.shape[1], dtype=torch.float64).index_add_(0, groups, values * weights[:, None])
    mass = torch.zeros(size, dtype=torch.float64).index_add_(0, groups, weights)
    return total / mass.clamp(min=1e-12)[:, None]


def _hashing(tables: dict[str, nn.EmbeddingBag], config: HashingConfig, counts) -> dict[str, nn.Module | str]:
    plan: dict[str, nn.Module | str] = {}
    for name, bag in tables.items():
        rows = math.ceil(config.rows_ratio * bag.num_embeddings)
        rows = min(rows, config.max_rows) if config.max_rows else rows
        if _too_small(bag, config):
            plan[name] = _too_small(bag, config)
        elif bag.padding_idx is not None:
            plan[name] = "has a padding_idx (hashing would share its row)"
        elif rows >= bag.num_embeddings:
            plan[name] = f"{bag.num_embeddings} rows: already within the target of {rows}"
        else:
            weight = bag.weight.detach().double().cpu()
            ids = torch.arange(bag.num_embeddings)
            smaller = new_like(bag, rows)
            with torch.no_grad():
                smaller.weight.copy_(_segment_mean(weight, ids % rows, rows,
                                                   _weights(counts.get(name), bag.num_embeddings)))
            plan[name] = HashedEmbeddingBag(bag.num_embeddings, smaller)
    return plan


def _fit_quotient_remainder(weight: torch.Tensor, collisions: int, operation: str, weights: torch.Tensor,
                            iterations: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted alternating least squares: quotient Q and remainder R with ``Q[i // c] (*|+) R[i % c] ~ W[i]``."""
    rows, dim = weight.shape
    ids = torch.arange(rows)
    q_of, r_of = ids // collisions, ids % collisions
    q_rows = math.ceil(rows / collisions)
    mult = operation == "mult"
    remainder = torch.ones(collisions, dim, dtype=torch.float64) if mult else \
        torch.zeros(collisions, dim, dtype=torch.float64)
    for _ in range(iterations):
        quotient = _solve(weight, remainder[r_of], q_of, q_rows, weights, mult)
        remainder = _solve(weight, quotient[q_of], r_of, collisions, weights, mult)
    return quotient, remainder


def _solve(target: torch.Tensor, other: torch.Tensor, groups: torch.Tensor, size: int, weights: torch.Tensor,
           mult: bool) -> torch.Tensor:
    """One least-squares half-step: per group, the vector x minimising sum w (x (*|+) other - target)^2."""
    if not mult:
        return _segment_mean(target - other, groups, size, weights)
    numerator = torch.zeros(size, target.shape[1], dtype=torch.float64).index_add_(
        0, groups, weights[:, None] * target * other)
    denominator = torch.zeros(size, target.shape[1], dtype=torch.float64).index_add_(
        0, groups, weights[:, None] * other * other)
    return numerator / denominator.clamp(min=1e-12)


def _quotient_remainder(tables: dict[str, nn.EmbeddingBag], config: QuotientRemainderConfig,
                        counts) -> dict[str, nn.Module | str]:
    plan: dict[str, nn.Module | str] = {}
    for name, bag in tables.items():
        q_rows = math.ceil(bag.num_embeddings / config.collisions)
        if _too_small(bag, config):
            plan[name] = _too_small(bag, config)
        elif bag.padding_idx is not None:
            plan[name] = "has a padding_idx (its quotient row would be shared)"
        elif q_rows + config.collisions >= bag.num_embeddings:
            plan[name] = f"{bag.num_embeddings} rows: {config.collisions} collisions would not shrink it"
        else:
            quotient, remainder = _fit_quotient_remainder(bag.weight.detach().double().cpu(), config.collisions,
                                                          config.operation,
                                                          _weights(counts.get(name), bag.num_embeddings))
            q_bag, r_bag = new_like(bag, q_rows, mode="sum"), new_like(bag, config.collisions, mode="sum")
            with torch.no_grad():
                q_bag.weight.copy_(quotient)
                r_bag.weight.copy_(remainder)
            plan[name] = QREmbeddingBag(bag.num_embeddings, config.collisions, q_bag, r_bag, config.operation,
                                        bag.mode, bag.include_last_offset)
    return plan


def mixed_dimensions(rows: dict[str, int], dim: int, config: MixedDimensionConfig) -> dict[str, int]:
    """Ginart et al.'s power rule: width ``dim * (smallest / rows) ** alpha``, rounded, within [min_dim, dim]."""
    smallest = min(rows.values())
    widths = {}
    for name, count in rows.items():
        width = dim * (smallest / count) ** config.alpha
        width = 2 ** round(math.log2(width)) if config.power_of_two else round(width)
        widths[name] = int(min(dim, max(config.min_dim, width)))
    return widths


def _projected(bag: nn.EmbeddingBag, width: int, weights: torch.Tensor) -> ProjectedEmbeddingBag:
    """The narrower table and projection spanning the table's ``width`` main directions, the rows weighted by
    their lookups: exact for rows within that subspace."""
    weight = bag.weight.detach().double().cpu()
    moment = (weight * weights[:, None]).T @ weight / weights.sum()
    _, vectors = torch.linalg.eigh(moment)
    basis = vectors[:, -width:]  # [dim, width], the largest eigenvalues last
    narrow = nn.EmbeddingBag(bag.num_embeddings, width, mode=bag.mode, sparse=bag.sparse,
                             include_last_offset=bag.include_last_offset, padding_idx=bag.padding_idx,
                             device=bag.weight.device)
    module = ProjectedEmbeddingBag(narrow, bag.embedding_dim)
    with torch.no_grad():
        narrow.weight.copy_(weight @ basis)
        module.projection.weight.copy_(basis)
    return module


def _mixed_dim(tables: dict[str, nn.EmbeddingBag], config: MixedDimensionConfig, counts) -> dict[str, nn.Module | str]:
    plan: dict[str, nn.Module | str] = {}
    by_dim: dict[int, dict[str, int]] = {}
    for name, bag in tables.items():
        by_dim.setdefault(bag.embedding_dim, {})[name] = bag.num_embeddings
    for dim, rows in by_dim.items():
        for name, width in mixed_dimensions(rows, dim, config).items():
            bag = tables[name]
            if _too_small(bag, config):
                plan[name] = _too_small(bag, config)
            elif bag.mode == "max":
                plan[name] = "max pooling does not commute with the projection"
            elif width >= dim or (bag.num_embeddings + dim) * width >= bag.num_embeddings * dim:
                plan[name] = f"keeps its width {dim} (the power rule gives {width})"
            else:
                plan[name] = _projected(bag, width, _weights(counts.get(name), bag.num_embeddings))
    return plan


@dataclass(frozen=True)
class _Method:
    name: str
    plan: Callable[[dict, Any, dict], dict]
    nested: bool  # also the tables inside compressed tables (quantization composes with the others)
    needs_counts: bool


_METHODS = {
    RowwiseInt8Config: _Method("rowwise-int8", _quantize(8), nested=True, needs_counts=False),
    RowwiseInt4Config: _Method("rowwise-int4", _quantize(4), nested=True, needs_counts=False),
    HashingConfig: _Method("hashing", _hashing, nested=False, needs_counts=True),
    QuotientRemainderConfig: _Method("qr", _quotient_remainder, nested=False, needs_counts=True),
    MixedDimensionConfig: _Method("mixed-dim", _mixed_dim, nested=False, needs_counts=True),
}


# -- applying -----------------------------------------------------------------------------------------------------
def candidate_tables(model: nn.Module, nested: bool) -> tuple[dict[str, nn.EmbeddingBag], dict[str, str]]:
    """(EmbeddingBag tables a method may replace, {name: reason} for embedding tables it cannot touch).

    ``nested``: include the EmbeddingBags inside compressed tables (else those tables are final for it).
    """
    tables, kept = {}, {}
    outer = embedding_tables(model)
    for name, module in model.named_modules():
        inside = next((t for t in outer if name.startswith(f"{t}.")), None)
        if type(module) is nn.EmbeddingBag and (inside is None or nested):
            tables[name] = module
        elif isinstance(module, nn.EmbeddingBag) and name in outer:
            kept[name] = f"{type(module).__name__}: a subclass of nn.EmbeddingBag may look rows up differently"
        elif isinstance(module, nn.Embedding) and name in outer:
            kept[name] = "nn.Embedding: only nn.EmbeddingBag tables are compressed"
        elif isinstance(module, COMPRESSED_TABLES) and name in outer and not nested:
            kept[name] = f"already compressed ({type(module).__name__})"
        elif isinstance(module, QuantizedEmbeddingBag):
            kept[name] = f"already row-wise int{module.bits}"
    return tables, kept


def _record(name: str, before: nn.EmbeddingBag, after: nn.Module) -> dict:
    stored = storage(after)
    return {"table": name, "rows": before.num_embeddings, "dim": before.embedding_dim,
            "bytes_before": table_bytes(before), "rows_after": stored["rows"], "dim_after": stored["dim"],
            "form": stored["form"], "bytes_after": table_bytes(after)}


def compress_embeddings_(model: nn.Module, config, *, counts: dict[str, torch.Tensor] | None = None
                         ) -> tuple[dict, dict[str, str]]:
    """Compress ``model``'s EmbeddingBag tables in place with the method ``config``'s type names.

    Args:
        model: any module holding ``nn.EmbeddingBag`` tables.
        config: `RowwiseInt8Config`, `RowwiseInt4Config`, `HashingConfig`, `QuotientRemainderConfig` or
            `MixedDimensionConfig`.
        counts: per-table lookup counts (`lookup_counts`) weighting the initial averages (None: uniform).

    Returns:
        (details: method, embedding bytes before/after, per-table records; {table: reason} for tables kept).
    """
    method = _METHODS[type(config)]
    before = embedding_bytes(model)
    tables, kept = candidate_tables(model, method.nested)
    for name in list(tables):
        if matches(name, config.skip):
            kept[name] = f"matched {method.name} skip"
            del tables[name]
    records = []
    for name, replacement in method.plan(tables, config, counts or {}).items():
        if isinstance(replacement, str):
            kept[name] = replacement
            continue
        model.set_submodule(name, replacement)
        records.append(_record(name, tables[name], replacement))
    after = embedding_bytes(model)
    details = {"method": method.name, "embedding_bytes_before": before, "embedding_bytes_after": after,
               "embedding_ratio": round(before / after, 4) if after else None,
               "tables_compressed": len(records), "tables_kept": len(kept), "tables": records}
    return details, kept


def _count_lookups(context, config, nested: bool) -> dict[str, torch.Tensor]:
    tables, _ = candidate_tables(context.model, nested)
    data, calibration = context.data, config.calibration
    if not tables or len(data.splits.get(calibration.split) or []) == 0:
        return {}
    batches = (inputs for inputs, _ in data.batches(calibration.split, context.bundle.preprocess,
                                                     calibration.batch_size, limit=calibration.samples))
    return lookup_counts(context.model, tables, batches)


def _handler(config_cls: type) -> Callable:
    method = _METHODS[config_cls]

    def handler(context, config) -> TorchDeployable:
        counts = _count_lookups(context, config, method.nested) if method.needs_counts else {}
        details, kept = compress_embeddings_(context.model, config, counts=counts)
        for name, reason in kept.items():
            context.skip_layer(name, reason)
        if method.needs_counts:
            details["lookups_counted"] = int(sum(float(c.sum()) for c in counts.values()))
        original = embedding_bytes(context.teacher)  # the model before any step: what the recipe achieves
        details["embedding_ratio_to_original"] = round(original / details["embedding_bytes_after"], 4) \
            if details["embedding_bytes_after"] else None
        return TorchDeployable(context.model, details=details)

    handler.__name__ = f"compress_embeddings_{method.name.replace('-', '_')}"
    handler.__doc__ = f"``compress_embeddings: {{method: {method.name}}}`` on ``context.model``, in place."
    return register_method("compress_embeddings", method.name, config_cls)(handler)


compress_rowwise_int8 = _handler(RowwiseInt8Config)
compress_rowwise_int4 = _handler(RowwiseInt4Config)
compress_hashing = _handler(HashingConfig)
compress_qr = _handler(QuotientRemainderConfig)
compress_mixed_dim = _handler(MixedDimensionConfig)

__all__ = [
    "HashingConfig", "MixedDimensionConfig", "QuotientRemainderConfig", "RowwiseInt4Config", "RowwiseInt8Config",
    "compress_embeddings_", "embedding_bytes", "embedding_tables", "lookup_counts", "mixed_dimensions",
]


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "Hashing": "HashingConfig",
    "MixedDimension": "MixedDimensionConfig",
    "QuotientRemainder": "QuotientRemainderConfig",
    "RowwiseInt4": "RowwiseInt4Config",
    "RowwiseInt8": "RowwiseInt8Config",
})
