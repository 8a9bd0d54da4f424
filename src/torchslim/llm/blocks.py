"""Memory-bounded calibration of large models, one repeated block (decoder/encoder layer) at a time.

GPTQ, SparseGPT, Wanda and AWQ all need statistics of the inputs of every linear layer (a Hessian, per-channel
norms, a few sample rows). Collecting them for the whole model at once does not fit in memory for a large model,
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

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from torchslim.errors import InputError

STATS = ("hessian", "sq_norm", "abs_mean", "samples")
Process = Callable[[str, nn.Module, "dict[str, LayerStats]"], Any]


# ---------------------------------------------------------------------------------------------------- layers --

def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (y = x @ W + b, W stored (in, out)); matched by name so transformers stays unloaded
    return type(module).__name__ == "Conv1D" and getattr(getattr(module, "weight", None), "ndim", 0) == 2


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (a linear layer with its weight stored transposed)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight of a linear-like layer as an ``(out, in)`` matrix (a view: transposed for ``Conv1D``).

    Args:
        module: an ``nn.Linear`` or a transformers ``Conv1D``.

    Returns:
        The weight tensor, ``(out_features, in_features)``, sharing storage with the parameter.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer")


def set_weight_matrix_(module: nn.Module, w: Tensor) -> None:
    """Copy an ``(out, in)`` matrix into a linear-like layer's weight, in place (transposing for ``Conv1D``).

    Args:
        module: an ``nn.Linear`` or a transformers ``Conv1D``.
        w: the new weight, ``(out_features, in_features)``; cast to the parameter's dtype and device.
    """
    target = weight_matrix(module)
    if tuple(w.shape) != tuple(target.shape):
        raise ValueError(f"weight of shape {tuple(w.shape)} does not fit {type(module).__name__} "
                         f"{tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(w)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``full module name -> module`` of every linear-like layer of ``model``, in registration order."""
    return {name: module for name, module in model.named_modules() if is_linear_like(module)}


def tied_modules(model: nn.Module) -> dict[str, str]:
    """``module name -> name of another module holding the same parameter`` (e.g. GPT-2's lm_head and wte).

    Pruning or quantizing such a layer would change the other module too (an embedding, usually).
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    return {name: next(n for n in names if n != name) for names in owners.values() if len(names) > 1
            for name in names}


def output_head(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of the output head and of the input embedding tied to it (None where there is none)."""
    owners = [m for m in model.modules() if callable(getattr(m, "get_output_embeddings", None))]
    if not owners:
        return None, None
    head, embedding = owners[0].get_output_embeddings(), owners[0].get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    tied = (head is not None and embedding is not None and getattr(head, "weight", None) is not None
            and head.weight is getattr(embedding, "weight", None))
    return names.get(id(head)), (names.get(id(embedding)) if tied else None)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The repeated blocks of a transformer: GPT-2 ``transformer.h``, Llama ``model.layers``, BERT ``encoder.layer``.

    The candidate containers are ``nn.ModuleList`` (and ``nn.Sequential``, e.g. timm's ViT ``blocks``) whose
    children all share one class and are not themselves linear layers; the one holding the most linear-like
    layers wins (so a Mixtral block's list of experts loses to the list of decoder layers around it).

    Args:
        model: any module; the whole tree is searched (a wrapper around a Hugging Face model is fine).

    Returns:
        ``(dotted name, container)`` or None when the model has no such container (e.g. a plain MLP).
    """
    best: tuple[int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1 or is_linear_like(children[0]):
            continue
        count = sum(is_linear_like(m) for child in children for m in child.modules())
        if count and (best is None or count > best[0]):
            best = (count, name, module)
    return None if best is None else (best[1], best[2])


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


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


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


def _call_model(model: nn.Module, batch: Any) -> Any:
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


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

    call = call or _call_model
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
                selected = {n: m for n, m in names.items() if not _matches(n, skip)}
                if selected:
                    log(f"calibrating {block_name} ({index + 1}/{len(blocks)}): {len(selected)} layers")
                    stats = collect_stats(selected, [lambda i=i: i.run(block) for i in inputs], want, max_samples)
                    process(block_name, block, stats)
                    run.layers.extend(stats)
                    del stats
                if index + 1 < len(blocks):
                    inputs = [i.advance(block) for i in inputs]
            del inputs
        outside = {n: m for n, m in layers.items() if n not in inside and not _matches(n, skip)}
        if outside:
            log(f"calibrating {len(outside)} layers outside the blocks")
            stats = collect_stats(outside, [lambda b=b: call(model, b) for b in batches], want, max_samples,
                                  desc="calibrating the layers outside the blocks")
            process("", model, stats)
            run.layers.extend(stats)
            run.tokens = run.tokens or max((s.tokens for s in stats.values()), default=0)
    return run
