"""Execution modules for weight-only quantized layers: packed int4 / int8 weights, float activations.

`WeightOnlyLinear` keeps nothing but its packed state, as buffers, so ``model.state_dict()`` and safetensors
save exactly what is stored. The stored convention, for both widths: ``w = (code - zeros) * scales`` group by
group, where ``code`` is the unpacked nibble (0..15, two a byte, even column in the low nibble, see
`pack_int4`) for int4 and the signed byte for int8 (the unsigned `QuantizedWeight` code minus 128, with
``zeros`` shifted alike, so symmetric int8 has ``zeros == 0``). ``input_scale`` (AWQ) multiplies the input.

Forward on CPU uses PyTorch's packed kernels where they exist and pay off, else dequantizes and calls
``F.linear`` (other devices, grouped int8, out_features not a multiple of 16, gradients, many rows):

* int4: ``aten._weight_int4pack_mm_for_cpu`` on a kernel-specific layout built from our codes at the first call
  (``_convert_weight_to_int4pack_for_cpu`` takes int32 (out, in) codes 0..15; the layout is ISA-specific, so it
  is a cache, never saved, and doubles the resident size of the codes). The kernel's convention is
  ``w = (q - 8) * scale + zero`` with a float ``zero``; ours converts exactly: ``zero = (8 - z) * s``. It takes
  groups of 32/64/128/256 (per-channel and longer groups are fed as repeated 256..32 ones) and needs
  ``out_features % 16 == 0``.
* int8, per-channel only: ``aten._weight_int8pack_mm(x, int8 (out, in), scales (out,))`` (symmetric);
  an asymmetric zero point is a rank-one correction ``- sum(x) * zeros * scales``.

Both kernels accept float32, float16 and bfloat16 inputs (scales in the input's dtype), but on the CPUs measured
(AVX-512 with BF16/AMX) only bfloat16 is fast: float32 and float16 run 10-100x slower than float32
``F.linear``. So the kernels compute in ``kernel_dtype`` (bfloat16 by default; inputs, scales and outputs are
rounded to it, an error of about 2^-9 relative, well below int4's own) and only for up to ``kernel_max_rows``
input rows (decoding); longer inputs dequantize in the input's dtype, which is exact. ``kernel_dtype =
torch.float32`` runs the kernels exactly (for checking), ``use_kernel = False`` always dequantizes.

`WeightOnlyEmbedding` looks up rows of a row-wise quantized table and may share the buffers of a
`WeightOnlyLinear` of shape (vocab, dim), for models whose output head is tied to the input embedding.
`weight_only_layers` / `restore_weight_only_` record and rebuild the module swaps so that a saved state dict
loads back into a freshly built float model.

Example:
    >>> layer = WeightOnlyLinear.from_quantized(quantize_rtn(linear.weight, 4, 64), linear.bias)
    >>> layers = weight_only_layers(model)                     # JSON next to model.safetensors
    >>> restore_weight_only_(fresh_float_model, layers); fresh_float_model.load_state_dict(state, strict=False)
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.cpu import cpu_flags
from torchslim.core.modules import is_linear_like  # noqa: F401  (re-exported for weight-only callers)
from torchslim.core.modules import weight_matrix as linear_weight  # (out, in); a transposed view for Conv1D
from torchslim.quant.groupwise import (
    QuantizedWeight, check_group_size, pack_int4, quantize_rtn, unpack_int4, unpack_int4_as,
)

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu takes, longest first
INT8_OFFSET = 128  # unsigned QuantizedWeight code - 128 = stored int8 code


@lru_cache(maxsize=1)
def fast_bfloat16_cpu() -> bool:
    """Whether this CPU has native bfloat16 dot products, which the packed kernels need to be fast."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    """The (out,) bias of a linear-like module, or None."""
    return getattr(module, "bias", None)


def _int4_kernel_group(group_length: int) -> int | None:
    """The kernel group size that tiles our groups (each of ours = whole kernel groups with repeated params)."""
    return next((size for size in INT4_KERNEL_GROUPS if group_length % size == 0), None)


class WeightOnlyLinear(nn.Module):
    """A linear layer with int4 (packed two a byte) or int8 weights and float activations.

    Buffers (all saved): ``qweight`` (uint8 (out, in/2) for int4, int8 (out, in) for int8), ``scales`` and
    ``zeros`` (float16 (out, n_groups)), ``bias`` (out,) and ``input_scale`` (in,) or None. See the module
    docstring for the convention and the kernels.

    Args:
        in_features: inputs.
        out_features: outputs.
        bits: 4 or 8.
        group_size: input columns per group; 0 = per-channel.
        has_bias: allocate a bias.
        has_input_scale: allocate an input scale (AWQ: inputs are multiplied by it).
    """

    kernel_max_rows: int = 48  # more input rows (prefill): dequantize + F.linear beats the kernels (measured)

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 has_bias: bool = False, has_input_scale: bool = False):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 packing needs an even in_features, got {in_features}")
        length = check_group_size(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = in_features // length
        if bits == 4:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        # float16 storage: zero points are small integers (exact), scales keep 11 significant bits; float32 would
        # add 12% to an int4 g128 file (8 bytes per 64 bytes of codes) for no measurable accuracy
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)
        self.register_buffer("input_scale", torch.ones(in_features) if has_input_scale else None)
        self.use_kernel = True
        self.kernel_dtype = torch.bfloat16
        self._kernel_cache: dict = {}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bits: int, group_size: int, has_bias: bool = False,
              has_input_scale: bool = False) -> WeightOnlyLinear:
        """A module with the buffer shapes of a saved one, for ``load_state_dict`` to fill."""
        return cls(in_features, out_features, bits, group_size, has_bias, has_input_scale)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       input_scale: torch.Tensor | None = None) -> WeightOnlyLinear:
        """Pack a `QuantizedWeight` (bits 4 or 8).

        Args:
            qw: the quantized (out, in) weight.
            bias: (out,) or None.
            input_scale: (in,) factor the input is multiplied by (`awq_quantize`'s), or None.

        Returns:
            The module (float16 scales and zero points, on ``qw``'s device).
        """
        out_features, in_features = qw.shape
        module = cls(in_features, out_features, qw.bits, qw.group_size, bias is not None, input_scale is not None)
        module.to(qw.codes.device)
        with torch.no_grad():
            if qw.bits == 4:
                module.qweight.copy_(pack_int4(qw.codes))
                module.zeros.copy_(qw.zeros)
            else:
                module.qweight.copy_((qw.codes.to(torch.int16) - INT8_OFFSET).to(torch.int8))
                module.zeros.copy_(qw.zeros - INT8_OFFSET)
            module.scales.copy_(qw.scales)
            if bias is not None:
                module.bias.copy_(bias.detach())
            if input_scale is not None:
                module.input_scale.copy_(input_scale.detach())
        return module

    @classmethod
    def from_float(cls, module: nn.Module, bits: int = 4, group_size: int = 128,
                   symmetric: bool = False) -> WeightOnlyLinear:
        """Round-to-nearest quantization of an ``nn.Linear`` or ``Conv1D`` (see `quantize_rtn` for errors)."""
        qw = quantize_rtn(linear_weight(module).detach().float(), bits, group_size, symmetric)
        return cls.from_quantized(qw, linear_bias(module))

    def codes(self) -> torch.Tensor:
        """The stored codes unpacked to (out, in): uint8 nibbles (int4) or int8 (int8)."""
        return unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the packed state stands for (without ``input_scale``)."""
        codes = unpack_int4_as(self.qweight, dtype) if self.bits == 4 else self.qweight.to(dtype)
        groups = codes.reshape(self.out_features, self.zeros.shape[1], -1)
        # in place on the fresh codes buffer: one pass fewer, this runs at every long (prefill) forward
        groups.sub_(self.zeros.to(dtype).unsqueeze(-1)).mul_(self.scales.to(dtype).unsqueeze(-1))
        return groups.reshape(self.out_features, self.in_features)

    def logical_numel(self) -> int:
        """The number of parameters this layer stands for, weights and bias (see `torchslim.measure.params`)."""
        bias = getattr(self, "bias", None)
        return self.out_features * self.in_features + (0 if bias is None else bias.numel())

    def logical_nonzero(self) -> int:
        bias = getattr(self, "bias", None)
        with torch.no_grad():
            nonzero = int(self.dequantized_weight().count_nonzero())
            return nonzero + (0 if bias is None else int(bias.count_nonzero()))

    def kernel_applies(self) -> bool:
        """Whether a packed CPU kernel runs this layer's configuration (shape, group size, width); otherwise,
        and for inputs the kernels skip (see the module docstring), forward dequantizes."""
        if self.bits == 8:
            return self.zeros.shape[1] == 1
        length = self.in_features // self.zeros.shape[1]
        return _int4_kernel_group(length) is not None and self.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        rows = x.reshape(-1, self.in_features)
        kernel = self._kernel(rows)
        if kernel is None:
            y = F.linear(rows, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        else:
            y = kernel(rows).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _kernel(self, rows: torch.Tensor):
        """A callable running the packed kernel on ``rows``, or None where it does not apply or pay off."""
        if not self.use_kernel or rows.device.type != "cpu" or rows.shape[0] > self.kernel_max_rows:
            return None
        if rows.requires_grad and torch.is_grad_enabled():  # the kernels have no backward
            return None
        if self.kernel_dtype == torch.bfloat16 and not fast_bfloat16_cpu():
            return None
        key = (self.kernel_dtype, rows.device)
        if key not in self._kernel_cache:
            self._kernel_cache[key] = self._build_kernel(self.kernel_dtype)
        return self._kernel_cache[key]

    def _build_kernel(self, dtype: torch.dtype):
        if not self.kernel_applies():
            return None
        return self._build_int4_kernel(dtype) if self.bits == 4 else self._build_int8_kernel(dtype)

    def _build_int4_kernel(self, dtype: torch.dtype):
        length = self.in_features // self.zeros.shape[1]
        kernel_group = _int4_kernel_group(length)
        repeat = length // kernel_group
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32).contiguous(), 1)
        scales, zeros = self.scales.float(), self.zeros.float()
        # ours: (q - z) s; the kernel's: (q - 8) s + zero  =>  zero = (8 - z) s, computed in float32 then rounded.
        params = torch.stack([scales, (8.0 - zeros) * scales], dim=-1).repeat_interleave(repeat, dim=1)
        params = params.transpose(0, 1).contiguous().to(dtype)  # (in / kernel_group, out, 2)

        def run(rows: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(dtype).contiguous(), packed, kernel_group,
                                                              params)
        return run

    def _build_int8_kernel(self, dtype: torch.dtype):
        qweight = self.qweight.contiguous()
        scales = self.scales[:, 0].to(dtype).contiguous()
        offset = self.zeros[:, 0].float() * self.scales[:, 0].float()  # w = q s - z s
        symmetric = bool((self.zeros == 0).all())

        def run(rows: torch.Tensor) -> torch.Tensor:
            y = torch.ops.aten._weight_int8pack_mm(rows.to(dtype).contiguous(), qweight, scales)
            if symmetric:
                return y
            return y.float() - rows.float().sum(-1, keepdim=True) * offset
        return run

    def __getstate__(self):
        # the cache holds closures (not picklable) over packed copies a copy should not share: rebuild lazily
        return {**super().__getstate__(), "_kernel_cache": {}}

    def _apply(self, fn, recurse=True):
        self._kernel_cache = {}  # device or dtype moves invalidate the packed copies
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size else "per_channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {group}, "
                f"bias={self.bias is not None}, input_scale={self.input_scale is not None}")


class WeightOnlyEmbedding(nn.Module):
    """An embedding table quantized row-wise (int8 or int4); only the looked-up rows are dequantized.

    Same buffers and convention as `WeightOnlyLinear` (rows = tokens, columns = embedding dimensions), so one
    packed table can serve both: with ``shared`` the buffers *are* the linear's (a tied output head), and
    safetensors' ``save_model`` stores them once.

    Args:
        num_embeddings: rows.
        embedding_dim: columns.
        bits: 4 or 8.
        group_size: columns per group; 0 = one scale per row.
        shared: a `WeightOnlyLinear` of shape (num_embeddings, embedding_dim) whose buffers to use.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: int = 0,
                 shared: WeightOnlyLinear | None = None):
        super().__init__()
        self.is_shared = shared is not None
        if shared is None:
            shared = WeightOnlyLinear(embedding_dim, num_embeddings, bits, group_size)
        elif (shared.out_features, shared.in_features) != (num_embeddings, embedding_dim):
            raise ValueError(f"shared layer is ({shared.out_features}, {shared.in_features}), "
                             f"the embedding ({num_embeddings}, {embedding_dim})")
        if shared.input_scale is not None:
            raise ValueError("a layer with an input_scale (AWQ) cannot share its table with an embedding")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size = shared.bits, shared.group_size
        for name in ("qweight", "scales", "zeros"):
            self.register_buffer(name, getattr(shared, name))

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: int = 0) -> WeightOnlyEmbedding:
        """A module with the buffer shapes of a saved one, for ``load_state_dict`` to fill."""
        return cls(num_embeddings, embedding_dim, bits, group_size)

    @classmethod
    def tied_to(cls, linear: WeightOnlyLinear) -> WeightOnlyEmbedding:
        """An embedding reading the packed table of ``linear`` (vocab, dim)."""
        return cls(linear.out_features, linear.in_features, linear.bits, linear.group_size, shared=linear)

    shared = tied_to  # the name torchslim.quant.weight_only_step calls

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> WeightOnlyEmbedding:
        """Pack a (num_embeddings, embedding_dim) `QuantizedWeight`."""
        embedding = cls.tied_to(WeightOnlyLinear.from_quantized(qw))
        embedding.is_shared = False  # that linear layer only packed the table; no model holds it
        return embedding

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int = 8, group_size: int = 0,
                   symmetric: bool = True) -> WeightOnlyEmbedding:
        """Round-to-nearest quantization of an ``nn.Embedding`` (one scale per row by default)."""
        return cls.from_quantized(quantize_rtn(embedding.weight.detach().float(), bits, group_size, symmetric))

    def logical_numel(self) -> int:
        """Weights this table stands for; 0 when shared, as the owning linear layer counts them (tied
        parameters are counted once, see `torchslim.measure.params`)."""
        return 0 if self.is_shared else self.num_embeddings * self.embedding_dim

    def logical_nonzero(self) -> int:
        if self.is_shared:
            return 0
        with torch.no_grad():
            return int(self(torch.arange(self.num_embeddings, device=self.qweight.device)).count_nonzero())

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        flat = indices.reshape(-1)
        codes = self.qweight[flat]
        codes = unpack_int4(codes) if self.bits == 4 else codes
        groups = codes.float().reshape(flat.shape[0], self.scales.shape[1], -1)
        rows = (groups - self.zeros[flat].float().unsqueeze(-1)) * self.scales[flat].float().unsqueeze(-1)
        return rows.reshape(*indices.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size else "per_row"
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, {group}"


def weight_only_layers(model: nn.Module) -> dict[str, dict]:
    """What `restore_weight_only_` needs to rebuild ``model``'s weight-only modules, as plain JSON.

    Returns:
        ``{module name: {kind: "linear" | "embedding", bits, group_size, in_features, out_features, has_bias,
        has_input_scale, shares}}``; for embeddings ``out_features`` is the number of rows, ``in_features`` the
        dimension, and ``shares`` names the linear layer whose table they read (else None).
    """
    layers: dict[str, dict] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, WeightOnlyLinear):
            owners[id(module.qweight)] = name
            layers[name] = {"kind": "linear", "bits": module.bits, "group_size": module.group_size,
                            "in_features": module.in_features, "out_features": module.out_features,
                            "has_bias": module.bias is not None, "has_input_scale": module.input_scale is not None,
                            "shares": None}
    for name, module in model.named_modules():
        if isinstance(module, WeightOnlyEmbedding):
            layers[name] = {"kind": "embedding", "bits": module.bits, "group_size": module.group_size,
                            "in_features": module.embedding_dim, "out_features": module.num_embeddings,
                            "has_bias": False, "has_input_scale": False, "shares": owners.get(id(module.qweight))}
    return layers


def restore_weight_only_(model: nn.Module, layers: dict[str, dict]) -> nn.Module:
    """Swap the named modules of a freshly built float model for empty weight-only ones (in place).

    Loading the saved state dict afterwards (``load_state_dict(state, strict=False)``: tied tables are saved
    once, under one of their names) reproduces the quantized model exactly.

    Args:
        model: the float model, built the same way as the one that was quantized.
        layers: `weight_only_layers` of the quantized model.

    Returns:
        ``model``.

    Raises:
        ValueError: a recorded module is missing, an entry's kind is unknown, or a shared table's owner is not a
            recorded linear layer.
    """
    names = {name for name, _ in model.named_modules()}
    for name, spec in sorted(layers.items(), key=lambda item: item[1].get("kind") != "linear"):
        if name not in names:
            raise ValueError(f"restore_weight_only_: the model has no module {name!r}")
        if spec.get("kind") == "linear":
            module = WeightOnlyLinear.empty(spec["in_features"], spec["out_features"], spec["bits"],
                                            spec["group_size"], spec["has_bias"], spec["has_input_scale"])
        elif spec.get("kind") == "embedding":
            module = _restored_embedding(model, layers, name, spec)
        else:
            raise ValueError(f"restore_weight_only_: {name!r} has unknown kind {spec.get('kind')!r}")
        model.set_submodule(name, module)
    return model


def _restored_embedding(model: nn.Module, layers: dict[str, dict], name: str, spec: dict) -> WeightOnlyEmbedding:
    owner = spec.get("shares")
    if owner is None:
        return WeightOnlyEmbedding.empty(spec["out_features"], spec["in_features"], spec["bits"], spec["group_size"])
    if layers.get(owner, {}).get("kind") != "linear":
        raise ValueError(f"restore_weight_only_: {name!r} shares {owner!r}, which is not a recorded linear layer")
    return WeightOnlyEmbedding.tied_to(model.get_submodule(owner))
