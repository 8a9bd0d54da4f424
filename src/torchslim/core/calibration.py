"""Calibration, in one place: the calibration samples a method reads (`calibration_batches`, from a
`CalibrationConfig`: its split, preprocessed for the model, checked to fit it), and the statistics of the inputs
of a model's layers on them (`collect_stats`: a Hessian, per-channel norms and means, sample rows), for a whole
model at once or one repeated block at a time (`run_sequential`).

Memory-bounded calibration of large models: GPTQ, SparseGPT, Wanda and AWQ all need statistics of the inputs
of every linear layer. Collecting them for the whole model at once does not fit in memory for a large model,
and it would also ignore the changes already made to earlier layers. `run_sequential` therefore captures the
inputs of the first block once, then, block after block: hooks the block's linear layers, runs the block on the
captured inputs to accumulate their statistics, hands them to a ``process`` callback (which prunes or quantizes
the block in place), and re-runs the changed block to produce the inputs of the next one. Only one block's
statistics are alive at any time. Linear layers outside the blocks (an ``lm_head``; every layer of a model
without blocks) get a last ``process`` call with statistics from full forwards of the changed model.

Example:
    >>> def show(block_name, block, stats):
    ...     print(block_name, {name: s.hessian.shape for name, s in stats.items()})
    >>> run_sequential(model, [(input_ids, attention_mask)], show)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from torchslim.core.modules import call_model, find_blocks, is_linear_like, linear_layers, matches
from torchslim.errors import InputError

STATS = ("hessian", "sq_norm", "abs_mean", "samples")
Process = Callable[[str, nn.Module, "dict[str, LayerStats]"], Any]


# ------------------------------------------------------------------------------------------------ samples --

def _shapes(inputs: Any) -> list[tuple[int, ...]]:
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return [tuple(t.shape[1:]) if torch.is_tensor(t) else () for t in items]


def calibration_batches(context, config) -> Iterator[Any]:
    """Yield the first ``samples`` samples of the calibration split, as input batches of ``batch_size``.

    Args:
        config: a `CalibrationConfig`, or a method config holding one as ``calibration``.

    Raises:
        InputError: the split is empty, or a batch's sample shape is not the model's (a grayscale folder for an
            RGB model, say), named before any quantization work is done.
    """
    calibration = getattr(config, "calibration", config)
    split = calibration.split
    if len(context.data.splits.get(split, [])) == 0:
        raise InputError(f"{context.where}: the data has no calibration samples (its {split!r} split is empty)")
    expected = _shapes(context.example_inputs(1))
    for inputs, _ in context.data.batches(split, context.bundle.preprocess, calibration.batch_size,
                                          limit=calibration.samples):
        found = _shapes(inputs)
        # Sequence models take any length: only the number of inputs and their ranks must match.
        comparable = [len(e) for e in expected] == [len(f) for f in found]
        if not comparable or (context.bundle.modality == "image" and found != expected):
            raise InputError(f"{context.where}: calibration samples have shape {found}, the model takes "
                             f"{expected} (per sample): the data does not fit the model")
        yield inputs


def check_calibration(context, config) -> None:
    """Fail early (before any export or training) if the calibration data is empty or does not fit the model."""
    calibration = getattr(config, "calibration", config)
    next(calibration_batches(context, dataclasses.replace(calibration, samples=1, batch_size=1)))


MIN_CALIBRATION_TOKENS = 64


def calibration_tokens(batches: list) -> int:
    """Samples the calibration batches hold: real tokens (attention-mask ones) for ``(input_ids,
    attention_mask)`` batches, else rows of the first input."""
    count = 0
    for batch in batches:
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        mask = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        text = torch.is_tensor(mask) and mask.shape == first.shape and not mask.is_floating_point()
        count += int(mask.sum()) if text else int(first.shape[0])
    return count


def require_calibration_tokens(batches: list, where: str, method: str) -> int:
    """The calibration token count; InputError when it is below `MIN_CALIBRATION_TOKENS` (statistics from fewer
    samples than that describe the calibration text, not the layer's inputs)."""
    count = calibration_tokens(batches)
    if count < MIN_CALIBRATION_TOKENS:
        raise InputError(f"{where}.calibration.samples: {method} got {count} calibration samples/tokens, fewer "
                         f"than the {MIN_CALIBRATION_TOKENS} it needs; use more calibration.samples or a larger "
                         f"calibration split")
    return count


# ----------------------------------------------------------------------------------------------------- stats --

@dataclass
class LayerStats:
    """Statistics of the rows ``x`` (one per token, ``in_features`` wide) a linear layer received.

    Attributes:
        tokens: number of rows seen.
        hessian: ``(in, in)`` float32, ``H = 2/n Σ x xᵀ`` (the layer-wise reconstruction Hessian of GPTQ/SparseGPT).
        sq_norm: ``(in,)`` float32, ``Σ x_j²`` per input channel (Wanda's ‖X_j‖₂ squared).
        abs_mean: ``(in,)`` float32, mean ``|x_j|`` per input channel (AWQ's activation scale).
        samples: ``(≤ max_samples, in)`` float32, a uniform random subset of the rows (AWQ's scale search).
        mean: ``(in,)`` float32, mean ``x_j`` per input channel.

    Fields that were not asked for are None. Layers that read the very same input tensor (q/k/v projections)
    share one LayerStats object: treat it as read-only.
    """

    tokens: int
    hessian: Tensor | None = None
    sq_norm: Tensor | None = None
    abs_mean: Tensor | None = None
    samples: Tensor | None = None
    mean: Tensor | None = None


class _Accumulator:
    """Running sums for one layer's LayerStats; `finish` turns them into the documented quantities."""

    def __init__(self, want: Sequence[str], max_samples: int, seed: int):
        self.want = set(want)
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens = 0
        self.xtx: Tensor | None = None
        self.sq_sum: Tensor | None = None
        self.abs_sum: Tensor | None = None
        self.sum: Tensor | None = None
        self.samples: Tensor | None = None
        self.keys: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if "hessian" in self.want:
            self.xtx = _add(self.xtx, x.t() @ x)
        if "sq_norm" in self.want:
            self.sq_sum = _add(self.sq_sum, (x * x).sum(0))
        if "abs_mean" in self.want:
            self.abs_sum = _add(self.abs_sum, x.abs().sum(0))
        if "mean" in self.want:
            self.sum = _add(self.sum, x.sum(0))
        if "samples" in self.want:
            # Reservoir sampling by random keys: the rows with the smallest keys are a uniform random subset.
            keys = torch.rand(x.shape[0], generator=self.generator).to(x.device)
            rows = x if self.samples is None else torch.cat([self.samples, x])
            keys = keys if self.keys is None else torch.cat([self.keys, keys])
            if rows.shape[0] > self.max_samples:
                keep = keys.topk(self.max_samples, largest=False).indices.sort().values
                rows, keys = rows[keep], keys[keep]
            self.samples, self.keys = rows, keys
        self.tokens += x.shape[0]

    def finish(self) -> LayerStats:
        n = max(self.tokens, 1)
        return LayerStats(tokens=self.tokens,
                          hessian=None if self.xtx is None else self.xtx * (2.0 / n),
                          sq_norm=self.sq_sum,
                          abs_mean=None if self.abs_sum is None else self.abs_sum / n,
                          samples=self.samples,
                          mean=None if self.sum is None else self.sum / n)


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total.add_(value)


class _StatsHooks:
    """Forward pre-hooks accumulating LayerStats for some layers over many calls of the module around them.

    Layers fed the very same tensor object within one call (q/k/v projections of one hidden state) share the
    accumulator of the first of them, which saves their identical Hessians.
    """

    def __init__(self, layers: dict[str, nn.Module], want: Sequence[str], max_samples: int):
        self.names, self.want, self.max_samples = list(layers), want, max_samples
        self.accumulators: dict[str, _Accumulator] = {}
        self.shares: dict[str, str] = {}  # layer -> the layer whose accumulator it shares
        self.seen: list[tuple[Tensor, int, str]] = []  # (input, its version, reader) within the current call
        self.handles = [module.register_forward_pre_hook(self._hook_for(name), with_kwargs=True)
                        for name, module in layers.items()]

    def _hook_for(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if isinstance(module, nn.modules.conv._ConvNd):
                x = x.movedim(1, -1)  # convolutions read channels along dim 1: one row per position
            self._record(name, x)
        return hook

    def _record(self, name: str, x: Tensor) -> None:
        owner = next((reader for tensor, version, reader in self.seen
                      if tensor is x and version == x._version), None)
        if name in self.shares:
            if owner != self.shares[name]:
                raise RuntimeError(f"{name} no longer reads the same input as {self.shares[name]}")
            return
        if owner is not None and name not in self.accumulators:
            self.shares[name] = owner
            return
        if name not in self.accumulators:
            self.accumulators[name] = _Accumulator(self.want, self.max_samples, seed=len(self.accumulators))
        self.accumulators[name].add(x)
        self.seen.append((x, x._version, name))

    def new_call(self) -> None:
        self.seen.clear()

    def remove(self) -> dict[str, LayerStats]:
        for handle in self.handles:
            handle.remove()
        self.seen.clear()
        finished = {name: acc.finish() for name, acc in self.accumulators.items()}
        finished.update({name: finished[owner] for name, owner in self.shares.items()})
        return {name: finished[name] for name in self.names if name in finished}  # layers never run: absent


def collect_stats(layers: dict[str, nn.Module], runs: Sequence[Callable[[], Any]], want: Sequence[str],
                  max_samples: int = 0, desc: str | None = None) -> dict[str, LayerStats]:
    """LayerStats (``want``: "hessian", "sq_norm", "abs_mean", "samples", "mean") of ``layers``' inputs over the calls
    ``runs`` make; a convolution's rows are its input positions, ``in_channels`` wide. Layers never run are absent.
    With ``desc``, a progress bar of that title counts the calls."""
    from torchslim._progress import bar

    hooks = _StatsHooks(layers, want, max_samples)
    try:
        for run in bar(runs, desc=desc or "", show=None if desc else False):
            hooks.new_call()
            run()
    finally:
        stats = hooks.remove()
    return stats


# -------------------------------------------------------------------------------------------- block inputs --

class StopForward(Exception):
    """Raised by a hook to end a forward pass once the inputs it needs are captured."""


@dataclass
class _BlockInput:
    """What one batch feeds a block: positional and keyword arguments; ``key`` says where the hidden state is."""

    args: tuple
    kwargs: dict
    key: int | str

    def hidden(self) -> Tensor:
        return self.args[0] if self.key == 0 else self.kwargs[self.key]

    def run(self, block: nn.Module) -> Any:
        return block(*self.args, **self.kwargs)

    def advance(self, block: nn.Module) -> "_BlockInput":
        """The next block's input: this block's output with the other arguments unchanged."""
        hidden = _first_tensor(self.run(block))
        if self.key == 0:
            return _BlockInput((hidden,) + self.args[1:], self.kwargs, 0)
        return _BlockInput(self.args, {**self.kwargs, self.key: hidden}, self.key)


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "to_tuple"):  # transformers' ModelOutput
        output = output.to_tuple()
    return output[0]


def _is_cache(value: Any) -> bool:
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__)


def _block_input(args: tuple, kwargs: dict) -> _BlockInput:
    # Caches would grow with every re-run of a block (and hold every block's keys and values): drop them.
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if args and isinstance(args[0], Tensor):
        return _BlockInput(args, kwargs, 0)
    key = "hidden_states" if isinstance(kwargs.get("hidden_states"), Tensor) else next(
        (k for k, v in kwargs.items() if isinstance(v, Tensor)), None)
    if key is None:
        raise StopForward  # nothing to carry from block to block: treated as a model without blocks
    return _BlockInput(args, kwargs, key)


def _capture_inputs(model: nn.Module, blocks: nn.Module, batches: Sequence[Any],
                    call: Callable) -> list[_BlockInput] | None:
    """The first block's input for every batch, or None when the blocks do not form a chain.

    On the first batch the forward continues into the second block, to check that it receives exactly the
    first block's output (the assumption behind re-running blocks one after another).
    """
    captured: list[_BlockInput] = []
    first_output: list[Tensor] = []
    chained = [len(blocks) < 2]

    def before_first(module, args, kwargs):
        captured.append(_block_input(args, kwargs))
        if len(captured) > 1 or chained[0]:
            raise StopForward

    def after_first(module, args, kwargs, output):
        first_output.append(_first_tensor(output))

    def before_second(module, args, kwargs):
        following = _block_input(args, kwargs).hidden()
        chained[0] = bool(first_output) and following.shape == first_output[0].shape and torch.equal(
            following, first_output[0])
        raise StopForward

    handles = [blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    if len(blocks) > 1:
        handles.append(blocks[0].register_forward_hook(after_first, with_kwargs=True))
        handles.append(blocks[1].register_forward_pre_hook(before_second, with_kwargs=True))
    try:
        for index, batch in enumerate(batches):
            try:
                call(model, batch)
            except StopForward:
                pass
            if len(captured) != index + 1 or not chained[0]:
                return None
            if index == 0:
                for handle in handles[1:]:
                    handle.remove()
    finally:
        for handle in handles:
            handle.remove()
    return captured


# ------------------------------------------------------------------------------------------------- driver --

@dataclass
class SequentialRun:
    """What `run_sequential` did.

    Attributes:
        blocks: dotted name of the block container used, or None when the whole model was one unit.
        num_blocks: how many blocks were processed one after another (0 without blocks).
        tokens: calibration rows (tokens) fed to the model's first linear layers.
        layers: full names of the layers whose statistics were handed to ``process``, in order.
    """

    blocks: str | None
    num_blocks: int
    tokens: int
    layers: list[str]


@contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no KV caches (``config.use_cache = False``) for the duration; both restored afterwards."""
    training = {module: module.training for module in model.modules()}
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and isinstance(getattr(c, "use_cache", None), bool)}
    cached = {key: config.use_cache for key, config in configs.items()}
    model.eval()
    for config in configs.values():
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in training.items():
            module.training = mode
        for key, config in configs.items():
            config.use_cache = cached[key]


def run_sequential(model: nn.Module, batches: Sequence[Any], process: Process, *,
                   want: Sequence[str] = ("hessian",), skip: Sequence[str] = (), max_samples: int = 512,
                   call: Callable[[nn.Module, Any], Any] | None = None,
                   log: Callable[[str], None] | None = None) -> SequentialRun:
    """Calibrate ``model`` block by block, calling ``process`` on each block with its layers' input statistics.

    Args:
        model: the model (eval mode and ``use_cache=False`` are set for the run, then restored).
        batches: model inputs, each a tuple of tensors (called positionally) or a tensor; all on the model's device.
        process: ``process(block_name, block, stats)`` where ``stats`` maps full module names of the block's
            linear-like layers to `LayerStats`; it may change weights or replace modules inside ``block``.
            Blocks come in order; the last call is ``("", model, stats)`` for linear layers outside the blocks
            (all of them for a model without blocks), with statistics from full forwards of the changed model.
        want: which `LayerStats` fields to collect: any of "hessian", "sq_norm", "abs_mean", "samples".
        skip: fnmatch patterns of full module names whose statistics are not collected (and not passed on).
        max_samples: at most this many rows kept per layer for "samples".
        call: ``call(model, batch)`` runs one batch (default: positional call for tuples, single argument else).
        log: receives one progress line per block.

    Returns:
        A `SequentialRun` (block container, number of blocks, calibration tokens, layers processed).

    Raises:
        InputError: ``model`` has no linear layers, or ``batches`` is empty.
    """
    unknown = set(want) - set(STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {', '.join(STATS)}")
    batches = list(batches)
    if not batches:
        raise InputError("calibration: no batches to calibrate on")
    layers = linear_layers(model)
    if not layers:
        raise InputError(f"calibration: {type(model).__name__} has no Linear layers to calibrate")
    from torchslim._progress import bar

    call = call or call_model
    log = log or (lambda message: None)
    run = SequentialRun(blocks=None, num_blocks=0, tokens=0, layers=[])
    inside: set[str] = set()
    with _calibration_mode(model):
        found = find_blocks(model)
        inputs = _capture_inputs(model, found[1], batches, call) if found else None
        if found and inputs is None:
            log(f"{found[0]} is not a chain of blocks: calibrating the whole model at once")
        if inputs is not None:
            path, blocks = found
            run.blocks, run.num_blocks = path, len(blocks)
            run.tokens = sum(i.hidden().numel() // i.hidden().shape[-1] for i in inputs)
            for index, block in enumerate(bar(blocks, desc=f"calibrating {path or 'model'} block by block",
                                              unit="block")):
                block_name = f"{path}.{index}" if path else str(index)
                names = {f"{block_name}.{n}" if n else block_name: m for n, m in block.named_modules()
                         if is_linear_like(m)}
                inside.update(names)
                selected = {n: m for n, m in names.items() if not matches(n, skip)}
                if selected:
                    log(f"calibrating {block_name} ({index + 1}/{len(blocks)}): {len(selected)} layers")
                    stats = collect_stats(selected, [lambda i=i: i.run(block) for i in inputs], want, max_samples)
                    process(block_name, block, stats)
                    run.layers.extend(stats)
                    del stats
                if index + 1 < len(blocks):
                    inputs = [i.advance(block) for i in inputs]
            del inputs
        outside = {n: m for n, m in layers.items() if n not in inside and not matches(n, skip)}
        if outside:
            log(f"calibrating {len(outside)} layers outside the blocks")
            stats = collect_stats(outside, [lambda b=b: call(model, b) for b in batches], want, max_samples,
                                  desc="calibrating the layers outside the blocks")
            process("", model, stats)
            run.layers.extend(stats)
            run.tokens = run.tokens or max((s.tokens for s in stats.values()), default=0)
    return run


__all__ = [
    "LayerStats", "MIN_CALIBRATION_TOKENS", "SequentialRun", "StopForward", "calibration_batches",
    "calibration_tokens", "check_calibration", "collect_stats", "require_calibration_tokens", "run_sequential",
]
