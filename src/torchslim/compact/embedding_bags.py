"""Compressed embedding tables, each a drop-in for ``nn.EmbeddingBag`` (same ``forward(input, offsets,
per_sample_weights)``): row-wise quantized, hashed, quotient-remainder and mixed-dimension tables.

Every compressed form keeps what it learned in parameters or buffers, so it saves to and loads from a plain
state dict (safetensors) into a fresh copy of the module: packed rows stay packed, nothing is re-expanded.

Example:
    >>> bag = nn.EmbeddingBag(100_000, 16, mode="sum")
    >>> small = QuantizedEmbeddingBag.from_float(bag, bits=4)
    >>> small(torch.tensor([[3], [7]])).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

import math

import torch
from torch import nn

_MODES = {"sum": 0, "mean": 1, "max": 2}


def flatten_bags(input: torch.Tensor, offsets: torch.Tensor | None,
                 include_last_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.EmbeddingBag``'s two input forms as (1-D indices, offsets of the bag starts, one per bag).

    A 2-D input ``[B, L]`` is B bags of L ids; a 1-D input needs ``offsets`` (``include_last_offset``: the
    last entry of ``offsets`` is the end of the last bag and is dropped).
    """
    if input.dim() == 2:
        batch, length = input.shape
        return input.reshape(-1), torch.arange(0, batch * length, length, device=input.device)
    if offsets is None:
        raise ValueError("a 1-D input needs offsets")
    return input, (offsets[:-1] if include_last_offset else offsets)


def reduce_bags(vectors: torch.Tensor, offsets: torch.Tensor, mode: str,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pool per-id ``vectors`` [L, D] into bags starting at ``offsets`` [B] ("sum", "mean" or "max");
    empty bags give zeros, as in ``nn.EmbeddingBag``."""
    batch, total = offsets.numel(), vectors.shape[0]
    ends = torch.cat([offsets[1:], offsets.new_tensor([total])])
    lengths = ends - offsets
    bag_of = torch.repeat_interleave(torch.arange(batch, device=vectors.device), lengths)
    if per_sample_weights is not None:
        vectors = vectors * per_sample_weights.unsqueeze(-1)
    out = vectors.new_zeros(batch, vectors.shape[1])
    if mode == "max":
        index = bag_of.unsqueeze(-1).expand_as(vectors)
        return out.scatter_reduce(0, index, vectors, "amax", include_self=False)
    out = out.index_add(0, bag_of, vectors)
    if mode == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(-1).to(out.dtype)
    return out


def packed_row_bytes(dim: int, bits: int) -> int:
    """Bytes of one FBGEMM row-wise packed row: the codes, then fp32 scale and bias (8-bit) or fp16 (4-bit)."""
    return dim + 8 if bits == 8 else math.ceil(dim * bits / 8) + 4


def _unpack_rows(rows: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Dequantize packed uint8 rows [L, bytes] to float [L, dim] (the layout the FBGEMM kernels read)."""
    if bits == 8:
        codes = rows[:, :dim].float()
        qparams = rows[:, dim:dim + 8].contiguous().view(torch.float32)
    else:
        width = math.ceil(dim / 2)
        packed = rows[:, :width]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(rows.shape[0], -1)[:, :dim].float()
        qparams = rows[:, width:width + 4].contiguous().view(torch.float16).float()
    return codes * qparams[:, :1] + qparams[:, 1:2]


class QuantizedEmbeddingBag(nn.Module):
    """An embedding table stored as FBGEMM row-wise quantized rows: 8-bit codes with an fp32 scale and bias per
    row, or 4-bit codes (two per byte) with fp16 ones. On the CPU the lookups run torch's FBGEMM kernels
    (``quantized::embedding_bag_{byte,4bit}_rowwise_offsets``), which dequantize only the rows they read;
    elsewhere a gather of the looked-up packed rows followed by dequantization does the same.

    Args:
        num_embeddings: rows of the table.
        embedding_dim: width of a row.
        bits: 8 or 4.
        mode: "sum" or "mean" pooling.
        include_last_offset: as ``nn.EmbeddingBag``'s.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, mode: str = "sum",
                 include_last_offset: bool = False):
        super().__init__()
        if bits not in (4, 8) or mode not in ("sum", "mean") or (bits == 4 and embedding_dim % 2):
            raise ValueError(f"unsupported row-wise quantization: bits={bits}, mode={mode}, dim={embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.mode, self.include_last_offset = bits, mode, include_last_offset
        self.register_buffer("packed", torch.zeros(num_embeddings, packed_row_bytes(embedding_dim, bits),
                                                   dtype=torch.uint8))
        self.use_kernel = True  # False: the portable gather-dequantize path (also used off the CPU)

    @classmethod
    def from_float(cls, bag: nn.EmbeddingBag, bits: int, optimized_ranges: bool = False) -> QuantizedEmbeddingBag:
        """Quantize ``bag``'s table row by row. ``optimized_ranges`` (4-bit only): FBGEMM's search for the row
        range that minimises the quantization error, instead of the row's min and max."""
        module = cls(bag.num_embeddings, bag.embedding_dim, bits, bag.mode, bag.include_last_offset)
        weight = bag.weight.detach().float().cpu().contiguous()
        if bag.padding_idx is not None:  # nn.EmbeddingBag skips padding ids; a zero row adds nothing to a sum
            weight = weight.clone()
            weight[bag.padding_idx] = 0
        with torch.no_grad():
            if bits == 8:
                module.packed.copy_(torch.ops.quantized.embedding_bag_byte_prepack(weight))
            else:
                module.packed.copy_(torch.ops.quantized.embedding_bag_4bit_prepack(weight, optimized_ranges))
        return module.to(bag.weight.device)

    def dequantize(self) -> torch.Tensor:
        """The whole table as float [rows, dim] (for tests and inspection; lookups never build it)."""
        return _unpack_rows(self.packed, self.bits, self.embedding_dim)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        indices, starts = flatten_bags(input, offsets, self.include_last_offset)
        if self.use_kernel and self.packed.device.type == "cpu":
            kernel = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if self.bits == 8
                      else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
            indices, starts = indices.contiguous(), starts.to(indices.dtype).contiguous()
            weights = None if per_sample_weights is None else per_sample_weights.float()
            pooled = kernel(self.packed, indices, starts, False, 0, False, weights, None, False)
            if self.mode == "mean":
                ends = torch.cat([starts[1:], starts.new_tensor([indices.numel()])])
                pooled = pooled / (ends - starts).clamp(min=1).unsqueeze(-1).to(pooled.dtype)
            return pooled
        rows = _unpack_rows(self.packed.index_select(0, indices), self.bits, self.embedding_dim)
        return reduce_bags(rows, starts, self.mode, per_sample_weights)

    def storage(self) -> dict:
        return {"rows": self.num_embeddings, "dim": self.embedding_dim, "form": f"int{self.bits} row-wise"}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, mode={self.mode!r}"


def new_like(bag: nn.EmbeddingBag, rows: int, dim: int | None = None, mode: str | None = None) -> nn.EmbeddingBag:
    """A fresh EmbeddingBag of another shape with ``bag``'s options (pooling, sparse gradients, device); a
    table given its own ``mode`` is looked up one id per bag (offsets given, never a last offset)."""
    return nn.EmbeddingBag(rows, bag.embedding_dim if dim is None else dim, mode=mode or bag.mode,
                           sparse=bag.sparse, include_last_offset=bag.include_last_offset if mode is None else False,
                           device=bag.weight.device)


class HashedEmbeddingBag(nn.Module):
    """The hashing trick: ids of a ``num_embeddings``-row table share the rows of a smaller one, id modulo
    its size (as DLRM does). ``bag`` is an ordinary EmbeddingBag, so later steps can quantize it."""

    def __init__(self, num_embeddings: int, bag: nn.EmbeddingBag):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, bag.embedding_dim
        self.bag = bag

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.bag(torch.remainder(input, self.bag.num_embeddings), offsets, per_sample_weights)

    def storage(self) -> dict:
        inner = storage(self.bag)
        return {"rows": inner["rows"], "dim": inner["dim"], "form": f"hashed, {inner['form']}"}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} ids -> {self.bag.num_embeddings} rows"


class QREmbeddingBag(nn.Module):
    """Quotient-remainder compositional embedding (Shi et al., 2020): id ``i`` is the combination of row
    ``i // collisions`` of a quotient table (``ceil(rows / collisions)`` rows) and row ``i % collisions`` of a
    remainder table (``collisions`` rows), by elementwise product ("mult") or sum ("add"); every id keeps a
    distinct vector. Pooled per bag like the table it replaces."""

    def __init__(self, num_embeddings: int, collisions: int, quotient: nn.EmbeddingBag,
                 remainder: nn.EmbeddingBag, operation: str = "mult", mode: str = "sum",
                 include_last_offset: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, quotient.embedding_dim
        self.collisions, self.operation = collisions, operation
        self.mode, self.include_last_offset = mode, include_last_offset
        self.quotient, self.remainder = quotient, remainder

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        indices, starts = flatten_bags(input, offsets, self.include_last_offset)
        single = torch.arange(indices.numel(), device=indices.device)  # one id per bag: per-id vectors
        q = self.quotient(torch.div(indices, self.collisions, rounding_mode="floor"), single)
        r = self.remainder(torch.remainder(indices, self.collisions), single)
        vectors = q * r if self.operation == "mult" else q + r
        if input.dim() == 2 and input.shape[1] == 1:  # one id per bag (a DLRM's one-hot feature): no pooling
            return vectors if per_sample_weights is None else vectors * per_sample_weights.reshape(-1, 1)
        return reduce_bags(vectors, starts, self.mode, per_sample_weights)

    def storage(self) -> dict:
        q, r = storage(self.quotient), storage(self.remainder)
        return {"rows": [q["rows"], r["rows"]], "dim": q["dim"], "form": f"qr-{self.operation}, {q['form']}"}

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} ids -> {self.quotient.num_embeddings} + {self.remainder.num_embeddings} "
                f"rows, operation={self.operation!r}")


class ProjectedEmbeddingBag(nn.Module):
    """A mixed-dimension table (Ginart et al., 2021): rows of a smaller width, pooled, then projected to the
    model's width by a learned linear map (pooling is linear, so projecting after pooling is exact)."""

    def __init__(self, bag: nn.EmbeddingBag, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = bag.num_embeddings, embedding_dim
        self.bag = bag
        self.projection = nn.Linear(bag.embedding_dim, embedding_dim, bias=False, device=bag.weight.device)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.projection(self.bag(input, offsets, per_sample_weights))

    def storage(self) -> dict:
        inner = storage(self.bag)
        return {"rows": inner["rows"], "dim": inner["dim"], "form": f"mixed-dim -> {self.embedding_dim}, "
                                                                    f"{inner['form']}"}


def storage(table: nn.Module) -> dict:
    """How a table is stored: rows (a list for composed tables), row width, and the form ("fp32", ...)."""
    if hasattr(table, "storage"):
        return table.storage()
    weight = table.weight
    return {"rows": weight.shape[0], "dim": weight.shape[1], "form": str(weight.dtype).replace("torch.float", "fp")}


COMPRESSED_TABLES = (QuantizedEmbeddingBag, HashedEmbeddingBag, QREmbeddingBag, ProjectedEmbeddingBag)
EMBEDDING_TABLES = (nn.EmbeddingBag, nn.Embedding) + COMPRESSED_TABLES
