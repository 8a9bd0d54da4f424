"""Learned rounding of Conv/Linear weights (AdaRound, after Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization").

Rounding every weight to its nearest grid point minimises each weight's own error, not the layer's output
error: the errors of a row's weights add up on correlated inputs. AdaRound chooses, for each weight, floor or
ceil: a continuous variable ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (zeta 1.1, gamma -0.1) sits
in place of the rounding, the weight ``s (floor(w / s) + h(V))`` is fitted to the layer's float output on
calibration inputs by Adam, and the regulariser ``lambda * sum(1 - |2 h - 1|^beta)``, with ``beta`` annealed
from 20 to 2 after a warm-up, pushes every ``h`` to 0 or 1; then the rounding is made hard (``h >= 0.5``).

Reconstruction, layer by layer in the order the forward pass calls them: the target is the float model's
output ``W x``, the input the model's own input to that layer with every earlier layer already rounded
(``x_q``), so each layer also compensates what the layers before it lost (the paper's asymmetric
reconstruction; float inputs would leave that error to accumulate). Both passes see the same calibration
batch, and each layer reads its input rows (convolution patches) at the same sampled positions. The loss
``mean ||W x - W~ x_q||^2`` is a quadratic form of ``D = W~ - W``: ``c - 2 <D, W E'X_q> + tr(D X_q'X_q D')``
(``E = X - X_q``), so each Adam step costs one product with a ``d x d`` matrix per group, whatever the rows.
With ``correct_bias``, the statistics are centred and the bias then takes the output's mean error: rounding
fits the variance, the bias the mean (the optimum of both together).

The grid is the deployment runtime's own (`WeightGrid`): the runtime recomputes the scale from the weight it is
given, so each rounded weight is written back as ``scale * integer`` with the largest |w| of each channel left
exactly where it was — the runtime then derives the same scale and rounds every weight to the learned integer
(checked per layer before the weight is kept; a layer that would not reproduce is restored and reported).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from torchslim._config import check
from torchslim.core.modules import matches
from torchslim.quant.observers import make_observer
from torchslim.quant.qmath import QScheme, fake_quantize

ZETA, GAMMA = 1.1, -0.1  # the stretch of h(V) beyond [0, 1], so that h reaches 0 and 1 with a finite V
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # the first fifth of a layer's iterations fit without the regulariser
LEARNING_RATE = 5e-2  # converges in ~100 iterations (measured on small nets); a time budget rarely allows thousands
PROBE_ITERATIONS = 5  # timed before a layer's iteration count is fixed from its share of the time budget
MAX_ROWS = 4096  # input rows (positions) sampled per layer
MAX_ROW_ELEMENTS = 1 << 22  # ... and at most this many stored floats per layer (16 MB)
_CONV, _LINEAR = torch.conv2d, F.linear


@dataclass(frozen=True)
class AdaRoundConfig:
    """``adaround:`` of an ``int8-static`` step: learn each Conv/Linear weight's rounding on the runtime's grid
    (`adaround_`) before the runtime quantizes the model.

    Args:
        enabled: learn the rounding (off by default).
        iterations: the most Adam iterations per layer.
        time_budget: seconds for the whole model, its two passes over the calibration batch included; the time
            left is shared among the layers left, and a layer reached with none keeps nearest rounding.
        regularization: ``lambda``, the weight of the regulariser that drives each rounding variable to 0 or 1.
        samples: calibration samples read (the first of the step's calibration split), run through the model as
            one batch.

    Example:
        >>> Int8StaticConfig(runtime="onnxruntime", adaround=AdaRoundConfig(enabled=True, time_budget=180))
    """

    enabled: bool = False
    iterations: int = 300
    time_budget: float = 120.0
    regularization: float = 0.01
    samples: int = 64

    def __post_init__(self) -> None:
        check(self.iterations >= 0, "iterations", f"must be >= 0, got {self.iterations}")
        check(self.time_budget >= 0, "time_budget", f"must be >= 0 seconds, got {self.time_budget}")
        check(self.regularization >= 0, "regularization", f"must be >= 0, got {self.regularization}")
        check(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}")


@dataclass(frozen=True)
class WeightGrid:
    """The symmetric integer grid a runtime rounds a weight to, with the runtime's own arithmetic.

    The runtime derives the scale from the weight it is given: ``max|w| / ((qmax - qmin) / 2)`` per output
    channel (or per tensor), then rounds half to even and clamps to [qmin, qmax].

    Args:
        qmin, qmax: the integer codes (ONNX Runtime: [-127, 127], [-64, 64] without VNNI; torchao's x86 quantizer:
            [-128, 127], so its scale is ``max|w| / 127.5``).
        per_channel: one scale per output channel (dimension 0), else one for the tensor.
        arithmetic: "onnxruntime" (scale in float64 then float32, ``w / scale``, a scale below float32's smallest
            normal becomes 1) or "torchao" (scale in float32, at least ``min_scale``, ``w * (1 / scale)``).
        min_scale: the smallest scale of "torchao" arithmetic (its observers' ``eps``): a channel whose
            ``max|w| / 127.5`` is below it gets this coarser scale and fewer codes.
        exact_types: only layers whose module is exactly one of these types (the runtime quantizes no others);
            empty: every Conv2d/Linear call.
    """

    qmin: int = -127
    qmax: int = 127
    per_channel: bool = True
    arithmetic: Literal["onnxruntime", "torchao"] = "onnxruntime"
    min_scale: float = float(torch.finfo(torch.float32).eps)
    exact_types: tuple = ()

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """One float32 scale per output channel (a per-tensor scale repeated), as the runtime computes it."""
        flat = weight.detach().reshape(weight.shape[0], -1)
        bound = flat.abs().amax(dim=1) if self.per_channel else flat.abs().max().expand(weight.shape[0])
        if self.arithmetic == "torchao":
            scale = bound.float() / (float(self.qmax - self.qmin) / 2)
            return torch.clamp(scale, min=self.min_scale)
        scale = (bound.double() * 2 / (self.qmax - self.qmin)).float()
        return torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)

    def codes(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The integers the runtime stores for ``weight`` on ``scale`` (float tensor of integer values)."""
        s = scale.reshape(-1, *[1] * (weight.dim() - 1))
        scaled = weight.float() * (1.0 / s) if self.arithmetic == "torchao" else weight.float() / s
        return torch.clamp(torch.round(scaled), self.qmin, self.qmax)


@dataclass
class LayerRounding:
    """One layer's learned rounding: Adam iterations run, input rows used, the reconstruction MSE per output
    element on those rows with nearest rounding and with the learned one (after the bias update when
    ``correct_bias``), the fraction of integers that differ from nearest rounding, and the integers deployed."""

    iterations: int
    rows: int
    mse_nearest: float
    mse_learned: float
    changed: float
    integers: torch.Tensor = field(repr=False)

    def summary(self) -> dict:
        ratio = self.mse_learned / self.mse_nearest if self.mse_nearest > 0 else 1.0
        return {"iterations": self.iterations, "rows": self.rows, "mse_nearest": float(f"{self.mse_nearest:.4g}"),
                "mse_learned": float(f"{self.mse_learned:.4g}"), "ratio": round(ratio, 4),
                "changed": round(self.changed, 4)}


@dataclass
class AdaRoundResult:
    """What `adaround_` did: ``layers`` rounded (in call order), ``refused`` ``{layer: why}``, seconds taken,
    and whether the time budget ran out (the layers after that kept nearest rounding, on the grid)."""

    layers: dict[str, LayerRounding] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    budget_spent: bool = False

    def summary(self) -> dict:
        nearest = sum(r.mse_nearest for r in self.layers.values())
        learned = sum(r.mse_learned for r in self.layers.values())
        return {"layers": {name: r.summary() for name, r in self.layers.items()}, "refused": dict(self.refused),
                "seconds": round(self.seconds, 2), "budget_spent": self.budget_spent,
                "iterations": sum(r.iterations for r in self.layers.values()),
                "mse_ratio_sum": round(learned / nearest, 4) if nearest > 0 else 1.0}


# ---------------------------------------------------------------------------------------------- layer inputs
@dataclass
class _Call:
    """A Conv2d/Linear call's geometry, normalised from its arguments."""

    kind: str  # "conv2d" or "linear"
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)  # left, right, top, bottom
    dilation: tuple = (1, 1)
    groups: int = 1


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value) * (2 // len(tuple(value)))


def _parse(func, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, Any, _Call | str]:
    """(input, weight, bias, geometry or why not) of a conv2d/linear call."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args)) | kwargs
    x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
    if func is _LINEAR:
        return x, weight, bias, _Call("linear")
    stride, dilation = _pair(bound.get("stride", 1)), _pair(bound.get("dilation", 1))
    padding = bound.get("padding", 0)
    kernel = weight.shape[2:]
    if padding == "valid":
        padding = (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        pads = (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2)
    elif isinstance(padding, str):
        return x, weight, bias, f"padding {padding!r}"
    else:
        ph, pw = _pair(padding)
        pads = (pw, pw, ph, ph)
    return x, weight, bias, _Call("conv2d", stride, pads, dilation, int(bound.get("groups", 1)))


def _output_size(x: torch.Tensor, weight: torch.Tensor, call: _Call) -> tuple[int, int]:
    height = x.shape[2] + call.padding[2] + call.padding[3]
    width = x.shape[3] + call.padding[0] + call.padding[1]
    return ((height - call.dilation[0] * (weight.shape[2] - 1) - 1) // call.stride[0] + 1,
            (width - call.dilation[1] * (weight.shape[3] - 1) - 1) // call.stride[1] + 1)


def _positions(x: torch.Tensor, weight: torch.Tensor, call: _Call, seed: int) -> tuple:
    """Sampled output positions of a call: (batch index, row, column) for convolutions, flat rows for linear;
    at most `MAX_ROWS`, and at most `MAX_ROW_ELEMENTS` stored floats."""
    generator = torch.Generator().manual_seed(seed)
    if call.kind == "linear":
        available, width = x.numel() // x.shape[-1], x.shape[-1]
    else:
        out_h, out_w = _output_size(x, weight, call)
        available, width = x.shape[0] * out_h * out_w, x.shape[1] * weight.shape[2] * weight.shape[3]
    rows = max(1, min(MAX_ROWS, MAX_ROW_ELEMENTS // max(width, 1)))
    flat = torch.randperm(available, generator=generator)[:rows]
    if call.kind == "linear":
        return (flat,)
    return flat // (out_h * out_w), (flat // out_w) % out_h, flat % out_w


def _rows(x: torch.Tensor, weight: torch.Tensor, call: _Call, positions: tuple) -> torch.Tensor:
    """The layer's input at ``positions`` as ``[rows, in_channels, kernel positions]`` (float32): each row is
    what one output position's dot products read (a zero-padded patch for convolutions)."""
    x = x.detach().float()
    if call.kind == "linear":
        return x.reshape(-1, x.shape[-1])[positions[0]].unsqueeze(-1)
    batch, row, column = positions
    height, width = x.shape[2], x.shape[3]
    taps = []
    for i in range(weight.shape[2]):
        h = row * call.stride[0] + i * call.dilation[0] - call.padding[2]
        for j in range(weight.shape[3]):
            w = column * call.stride[1] + j * call.dilation[1] - call.padding[0]
            inside = (h >= 0) & (h < height) & (w >= 0) & (w < width)  # outside: the zero padding
            taps.append(x[batch, :, h.clamp(0, height - 1), w.clamp(0, width - 1)] * inside.unsqueeze(1))
    return torch.stack(taps, dim=-1)


class _Intercept(TorchFunctionMode):
    """Calls ``on_call(name, func, args, kwargs) -> (args, kwargs)`` on every conv2d/linear call whose weight is
    one of ``weights`` (``{id(parameter): layer name}``), before the call runs."""

    def __init__(self, weights: dict[int, str], on_call: Callable):
        super().__init__()
        self.weights, self.on_call = weights, on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _CONV or func is _LINEAR:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.weights.get(id(weight))
            if name is not None:
                args, kwargs = self.on_call(name, func, args, kwargs)
        return func(*args, **kwargs)


def _run(model: nn.Module, inputs: Any) -> None:
    model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


# ---------------------------------------------------------------------------------------------- one layer
@dataclass
class _Statistics:
    """A layer's reconstruction loss as a quadratic form of ``D = W~ - W`` (grouped ``[groups, out, in]``):
    ``constant - 2 <D, linear> + sum_g tr(D_g hessian_g D_g')``, the mean over rows of ``||W x - W~ x_q||^2``."""

    hessian: torch.Tensor
    linear: torch.Tensor
    constant: float
    mean_float: torch.Tensor  # row means of x and x_q, [groups, in] (uncentred), for the bias
    mean_quantized: torch.Tensor

    def loss(self, delta: torch.Tensor) -> torch.Tensor:
        return self.constant - 2 * (delta * self.linear).sum() + (torch.bmm(delta, self.hessian) * delta).sum()


def _grouped_rows(rows: torch.Tensor, groups: int) -> torch.Tensor:
    count, channels, taps = rows.shape
    return rows.reshape(count, groups, channels // groups * taps).transpose(0, 1)


def _statistics(weight: torch.Tensor, float_rows: torch.Tensor, quantized_rows: torch.Tensor, groups: int,
                center: bool) -> _Statistics:
    x, x_q = _grouped_rows(float_rows, groups), _grouped_rows(quantized_rows, groups)
    mean_float, mean_quantized = x.mean(dim=1, dtype=torch.float64), x_q.mean(dim=1, dtype=torch.float64)
    if center:  # the bias takes the mean error afterwards: fit the rest
        x, x_q = x - mean_float.float().unsqueeze(1), x_q - mean_quantized.float().unsqueeze(1)
    rows = x.shape[1]
    w = weight.detach().float().reshape(groups, weight.shape[0] // groups, -1)
    error = x - x_q
    hessian = torch.bmm(x_q.transpose(1, 2), x_q) / rows
    linear = torch.bmm(w, torch.bmm(error.transpose(1, 2), x_q)) / rows
    constant = float(torch.bmm(error, w.transpose(1, 2)).pow(2).sum() / rows)
    return _Statistics(hessian, linear, constant, mean_float, mean_quantized)


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


@dataclass
class _Layer:
    """A weight on its grid, grouped ``[groups, out, in]``: floor(w / s), the remainder, the per-row integer bounds
    that keep |s q| within the row's largest |w| (so the runtime's scale cannot move), and the weights held fixed
    (each row's largest |w|, which sets that scale)."""

    scale: torch.Tensor
    floor: torch.Tensor
    remainder: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    learnable: torch.Tensor
    nearest: torch.Tensor  # the runtime's own rounding of every weight

    @classmethod
    def of(cls, weight: torch.Tensor, grid: WeightGrid, scale: torch.Tensor, groups: int) -> _Layer:
        shape = (groups, weight.shape[0] // groups, -1)
        w = weight.detach().double().reshape(weight.shape[0], -1)
        s = scale.double().reshape(-1, 1)
        bound = w.abs().amax(dim=1, keepdim=True) if grid.per_channel else w.abs().max().expand(w.shape[0], 1)
        ratio = w / s
        floor = torch.floor(ratio)
        high = torch.clamp(torch.floor(bound / s + 1e-4), max=grid.qmax)
        low = torch.clamp(-high, min=grid.qmin)
        learnable = (w.abs() < bound) & (bound > 0)
        nearest = grid.codes(weight.detach(), scale).double().reshape(w.shape)
        return cls(s.float().reshape(shape[0], shape[1], 1), floor.float().reshape(shape),
                   (ratio - floor).float().reshape(shape), low.float().reshape(shape[0], shape[1], 1),
                   high.float().reshape(shape[0], shape[1], 1), learnable.reshape(shape), nearest.float().reshape(shape))

    def delta(self, integers: torch.Tensor) -> torch.Tensor:
        """``W~ - W`` for integer (or soft) codes; fixed weights do not move."""
        return torch.where(self.learnable, self.scale * ((integers - self.floor) - self.remainder), 0.0)


def _plan(cap: int, seconds: float, elapsed: float, done: int) -> int:
    """How many iterations a layer runs, from the time its first ``done`` iterations took."""
    per_iteration = elapsed / max(done, 1)
    left = seconds - elapsed
    return min(cap, done + max(0, int(left / per_iteration) if per_iteration > 0 else cap))


def _learn(layer: _Layer, stats: _Statistics, *, cap: int, seconds: float, regularization: float,
           clock: Callable[[], float]) -> tuple[torch.Tensor, int]:
    """Learned integers ``[groups, out, in]`` (nearest rounding where learning made the loss worse) and the
    number of Adam iterations run: at most ``cap``, and as many as ``seconds`` allow."""
    nearest = layer.delta(layer.nearest)
    nearest_loss = float(stats.loss(nearest))
    # The unit of the reconstruction term: the error nearest rounding's weights alone add (the part of the loss
    # that the rounding moves; the rest, from the inputs' own error, is a constant the regulariser must not
    # drown in).
    unit = float((torch.bmm(nearest, stats.hessian) * nearest).sum())
    planned = 0 if seconds <= 0 or unit <= 0 else min(cap, PROBE_ITERATIONS)
    if planned == 0:
        return layer.nearest, 0
    fraction = ((layer.remainder - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(fraction / (1 - fraction)).requires_grad_(True)  # h(v) = remainder: nearest rounding
    optimizer = torch.optim.Adam([v], lr=LEARNING_RATE)
    learnable = layer.learnable.float()
    count = max(float(learnable.sum()), 1.0)
    started, iteration = clock(), 0
    with torch.enable_grad():
        while iteration < planned:
            warm = max(min(PROBE_ITERATIONS, planned), math.ceil(WARMUP * planned))
            h = _rectified_sigmoid(v)
            soft = torch.clamp(layer.floor + h, layer.low, layer.high)
            loss = stats.loss(layer.delta(soft)) / unit
            if iteration >= warm:
                progress = (iteration - warm) / max(planned - warm, 1)
                beta = BETA_END + (BETA_START - BETA_END) * (1 - progress)
                loss = loss + regularization * ((1 - (2 * h - 1).abs().pow(beta)) * learnable).sum() / count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            if iteration == PROBE_ITERATIONS:
                planned = _plan(cap, seconds, clock() - started, iteration)
    with torch.no_grad():
        hard = torch.clamp(layer.floor + (v >= 0).float(), layer.low, layer.high)
        hard = torch.where(layer.learnable, hard, layer.nearest)
        if float(stats.loss(layer.delta(hard))) > nearest_loss:
            return layer.nearest, iteration
    return hard, iteration


# ---------------------------------------------------------------------------------------------- the model
def _weight_names(model: nn.Module) -> dict[int, str]:
    """``{id(weight parameter): owning module's name}``."""
    names = {}
    for name, parameter in model.named_parameters():
        if name == "weight" or name.endswith(".weight"):
            names.setdefault(id(parameter), name.rpartition(".")[0])
    return names


def _left_float(name: str, module: nn.Module | None, grid: WeightGrid, skip: tuple) -> str | None:
    """Why the runtime keeps this layer float (its weights and input are not quantized), or None."""
    if matches(name, skip):
        return "kept in float (matched skip)"
    if grid.exact_types and type(module) not in grid.exact_types:
        return f"{type(module).__name__}: the runtime quantizes only exact " + \
            ", ".join(t.__name__ for t in grid.exact_types) + " (left float there)"
    return None


def _refusal(weight: torch.Tensor, call: _Call | str) -> str | None:
    if isinstance(call, str):
        return f"a convolution with {call}"
    if weight.dtype != torch.float32:
        return f"its weight is {weight.dtype}, not float32"
    return None


def _with_argument(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1:], kwargs
    return args, {**kwargs, name: value}


def _on_grid(weight: torch.Tensor, layer: _Layer, integers: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """``scale * integers``, the fixed weights (each channel's largest |w|) as they were, and nothing beyond
    that largest |w| (``127 * scale`` may round one ulp above it), so the runtime's scale cannot move."""
    rounded = torch.where(layer.learnable, layer.scale * integers, weight.reshape(layer.floor.shape))
    flat = weight.abs().reshape(weight.shape[0], -1)
    bound = (flat.amax(1) if grid.per_channel else flat.max().expand(weight.shape[0]))
    bound = bound.reshape(-1, *[1] * (weight.dim() - 1))
    return torch.maximum(torch.minimum(rounded.reshape(weight.shape), bound), -bound)


def _mean_error(weight: torch.Tensor, rounded: torch.Tensor, stats: _Statistics, groups: int) -> torch.Tensor:
    """Per output channel, the mean of ``W x - W~ x_q`` over the calibration rows: what the bias must add."""
    shape = (groups, weight.shape[0] // groups, -1)
    return (torch.bmm(weight.double().reshape(shape), stats.mean_float.unsqueeze(-1))
            - torch.bmm(rounded.double().reshape(shape), stats.mean_quantized.unsqueeze(-1))).reshape(-1)


class _Budget:
    """Shares the time left among the layers left: each layer gets ``(time left - the other layers' expected
    overhead) / layers left`` for its iterations, the overhead (forward pass, input rows, statistics) being
    measured on the layers done so far (on the float pass before the first)."""

    def __init__(self, deadline: float, clock: Callable[[], float], first_pass: float, layers: int):
        self.deadline, self.clock = deadline, clock
        self.started, self.overhead = clock(), first_pass / max(layers, 1)
        self.iterating, self.layers, self.spent = 0.0, 0, False

    def share(self, left: int) -> float:
        now = self.clock()
        if self.layers:
            self.overhead = (now - self.started - self.iterating) / self.layers
        self.layers += 1
        seconds = (self.deadline - now - self.overhead * (left - 1)) / left
        self.spent = self.spent or seconds <= 0
        return seconds

    def learn(self, layer: _Layer, stats: _Statistics, left: int, **options) -> tuple[torch.Tensor, int]:
        """`_learn` on this layer's share of the time (its time counted as iterating, not overhead)."""
        seconds = self.share(left)
        started = self.clock()
        try:
            return _learn(layer, stats, seconds=seconds, clock=self.clock, **options)
        finally:
            self.iterating += self.clock() - started


@torch.no_grad()
def adaround_(model: nn.Module, inputs: Any, grid: WeightGrid, *, iterations: int = 300, time_budget: float = 120.0,
              regularization: float = 0.01, correct_bias: bool = True, skip: tuple | list = (),
              activations: QScheme | None = None, observer: str = "minmax", seed: int = 0,
              clock: Callable[[], float] = time.perf_counter) -> AdaRoundResult:
    """Learn the rounding of every Conv2d/Linear weight of ``model`` (eval mode, BatchNorms folded) on ``grid``,
    in place: each weight becomes ``scale * integer`` with the runtime's scale unchanged.

    Args:
        model: the float model; each layer called once per forward pass is rounded (others are refused).
        inputs: one calibration batch (a tensor or a tuple of tensors); the model runs on it twice (float, then
            rounded layer by layer).
        grid: the runtime's weight grid (`WeightGrid`; the backends' ``weight_grid``).
        iterations: the most Adam iterations per layer.
        time_budget: seconds for the whole call, both passes included; each layer gets the time left divided by
            the layers left. Layers reached with no time left keep nearest rounding (on the grid).
        regularization: the weight ``lambda`` of the rounding regulariser (its mean over a layer's weights is
            added to the reconstruction error relative to nearest rounding's).
        correct_bias: fit the rounding to the centred output error and let the bias take its mean.
        skip: layer-name patterns (fnmatch) left alone.
        activations: the scheme the runtime quantizes each quantized layer's input on (per tensor), or None for
            float inputs. The ranges come from ``observer`` (`torchslim.quant.observers`) on the float pass, and
            the rounding pass fake-quantizes every such input: each layer then also fits the activation error
            of its own input and of the layers before it, as the deployed model makes it.
        clock: the time source (tests pass a fake one).

    Returns:
        `AdaRoundResult`: per layer the iterations, reconstruction MSE before and after, and the integers.

    Example:
        >>> result = adaround_(model.eval(), calibration_batch, WeightGrid(), iterations=200, time_budget=30)
        >>> result.summary()["layers"]["features.0"]["ratio"]
    """
    started = clock()
    deadline = started + time_budget
    result = AdaRoundResult()
    modules = dict(model.named_modules())
    weights = _weight_names(model)
    calls: dict[str, int] = {}
    captured: dict[str, tuple] = {}
    observers: dict[str, Any] = {}  # the inputs the runtime quantizes: their ranges

    def capture(name, func, args, kwargs):
        calls[name] = calls.get(name, 0) + 1
        x, weight, _, call = _parse(func, args, kwargs)
        why = _left_float(name, modules.get(name), grid, tuple(skip))
        if activations is not None and why is None:
            observers.setdefault(name, make_observer(observer, activations)).observe(x)
        if calls[name] == 1:
            why = why or _refusal(weight, call)
            if why:
                result.refused[name] = why
            else:
                positions = _positions(x, weight, call, seed + len(captured))
                captured[name] = (call, positions, _rows(x, weight, call, positions))
        return args, kwargs

    with _Intercept(weights, capture):
        _run(model, inputs)
    for name, count in calls.items():
        if count > 1:
            captured.pop(name, None)
            result.refused[name] = f"called {count} times in one forward pass"
    budget = _Budget(deadline, clock, first_pass=clock() - started, layers=len(captured))
    ranges = {name: o.qparams() for name, o in observers.items()}

    def round_layer(name, func, args, kwargs):
        x, weight, bias, _ = _parse(func, args, kwargs)
        if name in ranges:  # the input as the runtime quantizes it
            x = fake_quantize(x, *ranges[name], activations)
            args, kwargs = _with_argument(args, kwargs, 0, "input", x)
        if name not in captured:
            return args, kwargs
        call, positions, float_rows = captured.pop(name)
        stats = _statistics(weight, float_rows, _rows(x, weight, call, positions), call.groups, correct_bias)
        del float_rows
        scale = grid.scale(weight)
        layer = _Layer.of(weight, grid, scale, call.groups)
        integers, done = budget.learn(layer, stats, len(captured) + 1, cap=iterations, regularization=regularization)
        new_weight = _on_grid(weight.detach(), layer, integers, grid)
        deployed = grid.codes(new_weight, grid.scale(new_weight))
        if not (torch.equal(grid.scale(new_weight), scale) and torch.equal(deployed, integers.reshape(weight.shape))):
            result.refused[name] = "the runtime's rounding of the learned weight would not give the learned integers"
            return args, kwargs
        mse = [float(stats.loss(layer.delta(q))) / weight.shape[0] for q in (layer.nearest, integers)]
        changed = float((integers != layer.nearest).float().mean())
        shift = _mean_error(weight.detach(), new_weight, stats, call.groups)
        weight.copy_(new_weight)
        module = modules.get(name)
        if correct_bias and module is not None and bias is not None and bias is getattr(module, "bias", None):
            bias.add_(shift.to(bias.dtype))
        elif correct_bias and module is not None and bias is None and getattr(module, "bias", False) is None:
            module.bias = nn.Parameter(shift.float())
            args, kwargs = _with_argument(args, kwargs, 2, "bias", module.bias)
        result.layers[name] = LayerRounding(done, int(positions[0].numel()), mse[0], mse[1], changed,
                                            deployed.to(torch.int8 if -128 <= grid.qmin else torch.int16))
        return args, kwargs

    with _Intercept(weights, round_layer):
        _run(model, inputs)
    for name in captured:
        result.refused[name] = "not called again in the rounding pass"
    result.budget_spent = budget.spent
    result.seconds = clock() - started
    return result

