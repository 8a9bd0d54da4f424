"""Structured channel pruning: remove whole channels and neurons so the model is physically smaller and faster.

The run: analyse -> score -> select -> remove -> check (-> refit), in steps, toward a ratio, a MACs or a latency
target (`prune`, on a plain ``nn.Module``), and the recipe step around it (``prune: {method: channel}``)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from torchslim.core.modules import call_model, forward_shapes
from torchslim.errors import InputError
from torchslim.graph import analyse_channels, capture
from torchslim.measure.latency import measure_latency
from torchslim.measure.layer_latency import LatencyTable
from torchslim.measure.macs import count_macs
from torchslim.measure.params import count_params
from torchslim.measure.stage import first_samples
from torchslim.pruning.channel import hf_config, importance
from torchslim.pruning.channel.config import ChannelPruningConfig, PruneResult
from torchslim.pruning.channel.refit import kept_linear_positions, refit_sequential
from torchslim.pruning.channel.select import bisect_ratio, fill_to_target, select_channels
from torchslim.pruning.channel.surgery import _related, _restore, remove_channels
from torchslim.pruning.channel.widths import LatencyWidths, layer_inputs, predicted_latency
from torchslim.recover.finetune import finetune
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable


def prune(model: nn.Module, config: ChannelPruningConfig, example_inputs: Any,
          recover: Callable[[nn.Module, int], None] | None = None,
          calibration: Sequence[Any] | None = None, latency_table: LatencyTable | None = None) -> PruneResult:
    """Remove channels from ``model`` in place (see the module docstring); returns what changed.

    Args:
        example_inputs: one input batch (a tensor or a tuple of tensors) to capture and check the model with.
        recover: called as ``recover(model, step)`` after each of ``config.steps`` steps but the last (e.g. a
            short fine-tune); Taylor importance reads the gradients present on the parameters.
        calibration: input batches (like ``example_inputs``) for ``importance: activation`` and
            ``reconstruct``; read again at every step.
        latency_table: the layer latencies ``round_to: auto`` looks up (default: this machine's cached
            `LatencyTable`, timing layers at the batch size of ``example_inputs`` and torch's threads).

    Raises:
        InputError: the model cannot be captured, Taylor importance finds no gradients, or activation
            importance / reconstruction has no calibration inputs.
    """
    if config.importance == "taylor" and not any(p.grad is not None for p in model.parameters()):
        raise InputError("importance taylor needs gradients: run a backward pass on a few batches first "
                         "(the recipe step computes them from the training data)")
    if config.calibrated and not calibration:
        raise InputError("importance activation and reconstruct need calibration inputs (the recipe step reads "
                         "calibration.samples samples of calibration.split)")
    single = first_samples(example_inputs, 1)
    macs_before, params_before = count_macs(model, single), count_params(model)
    linear_widths = hf_config.widths_before(model)
    latency_before = _latency(model, example_inputs) if config.target_latency else 0.0
    table = None
    if config.rounding == "auto":
        table = latency_table if latency_table is not None else LatencyTable()
        inputs = layer_inputs(model, example_inputs)
        latency = {"predicted_ms_before": predicted_latency(model, inputs, table),
                   "measured_ms_before": latency_before or _latency(model, example_inputs)}
    widths: dict[str, dict] = {}
    removed: dict[str, int] = {}
    skipped: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    refit_errors: dict[str, float] = {}
    refit_residual: list[str] = []
    for step in range(1, config.steps + 1):
        share = step / config.steps  # cumulative targets follow a geometric path to the final one
        macs_goal = config.target_macs ** share * macs_before if config.target_macs else 0.0
        latency_goal = config.target_latency ** share * latency_before if config.target_latency else 0.0
        kept_before = 1 - config.ratio * (step - 1) / config.steps
        ratio = 1 - (1 - config.ratio * share) / kept_before
        step_removed, step_skipped, step_shapes, (step_errors, step_residual), step_widths = _prune_once(
            model, config, example_inputs, ratio, macs_goal, latency_goal, calibration, table)
        widths = step_widths or widths
        for module, count in step_removed.items():
            removed[module] = removed.get(module, 0) + count
        skipped.update(step_skipped)
        shapes.update(step_shapes)
        refit_errors.update(step_errors)
        refit_residual = step_residual
        if recover is not None and step < config.steps:
            recover(model, step)
    skipped.update(hf_config.update_configs(model, linear_widths))
    if table is not None:
        latency.update(predicted_ms_after=predicted_latency(model, inputs, table),
                       measured_ms_after=_latency(model, example_inputs))
        latency = {key: round(value, 3) for key, value in latency.items()}
        latency.update(batch_size=_batch_size(example_inputs), threads=torch.get_num_threads(),
                       layers_timed=table.measured, layers_provisional=table.provisional,
                       layers_retimed=table.retimed, load_max=max(table.loads, default=None))
    return PruneResult(macs_before=macs_before, macs_after=count_macs(model, single), params_before=params_before,
                       params_after=count_params(model), removed_channels=removed, skipped=skipped, shapes=shapes,
                       refit_errors=refit_errors, refit_residual=refit_residual, widths=widths,
                       latency=latency if table is not None else {})


def _batch_size(inputs: Any) -> int:
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _latency(model: nn.Module, inputs: Any) -> float:
    with torch.inference_mode():
        return measure_latency(lambda x: call_model(model, x), inputs, warmup=2, repeats=7).median_ms


def _prune_once(model: nn.Module, config: ChannelPruningConfig, example_inputs: Any, ratio: float, macs_goal: float,
                latency_goal: float, calibration: Sequence[Any] | None = None,
                table: LatencyTable | None = None) -> tuple[dict, dict, dict, tuple, dict]:
    """One analyse -> select -> remove round; returns (removed channels per layer, skipped layers, new shapes,
    (relative output errors of refitted layers, the layers refitted to the residual stream), each group's
    width choice with ``round_to: auto``)."""
    reference_shape, error, _ = forward_shapes(model, example_inputs)
    if error is not None:
        raise InputError(f"the model does not run on the example inputs: {error}")
    single = first_samples(example_inputs, 1)
    graph = analyse_channels(capture(model, example_inputs, config.capture), config.recurrent, model)
    want = importance.STATISTICS[config.importance]
    stats = importance.collect(model, graph.modules, calibration, want) if want else None
    scores = importance.score(model, graph, config, stats)
    unpruned = copy.deepcopy(model) if config.reconstruct else None  # the refit's targets
    widths = None
    if table is not None:
        widths = LatencyWidths(model, graph, scores, layer_inputs(model, example_inputs), table)
    if macs_goal:
        def reached(trial: nn.Module) -> bool:
            return count_macs(trial, single) <= macs_goal

        around = None
        if widths is not None:  # exact widths cost nothing to try: they narrow the search the table times
            around = bisect_ratio(model, graph, dataclasses.replace(config, round_to=1, reallocate=0.0), scores,
                                  reached)
        ratio = bisect_ratio(model, graph, config, scores, reached, widths, around)
        if widths is not None:
            fill_to_target(model, graph, config, min(ratio + config.reallocate, config.max_ratio), scores, widths,
                           reached)
    elif latency_goal:
        ratio = bisect_ratio(model, graph, config, scores,
                             lambda trial: _latency(trial, example_inputs) <= latency_goal, widths)
    before = {name: list(t.shape) for name, t in model.state_dict().items()}
    original = copy.deepcopy(model) if graph.literal_reshapes else None
    chosen = select_channels(model, graph, config, ratio, scores, widths)
    shapes = remove_channels(model, graph, chosen)
    shape, error, where = forward_shapes(model, example_inputs)
    suspects = list(graph.literal_reshapes)
    while error is not None and original is not None and suspects:
        # A reshape or split wrote its channel count into the model's code. Keep the channels of the ones in
        # the layer that failed (all of them when the failure names no layer) and prune again.
        local = [(ids, layer) for ids, layer in suspects if where and _related(layer, where)]
        for ids, layer in local or suspects:
            graph.block(ids, "a size written in the model's code (a reshape, split or new tensor)", layer)
        suspects = [s for s in suspects if local and not any(s is t for t in local)]
        _restore(model, original)
        chosen = select_channels(model, graph, config, ratio, scores, widths)
        shapes = remove_channels(model, graph, chosen)
        shape, error, where = forward_shapes(model, example_inputs)
    if error is not None:
        raise RuntimeError(f"the pruned model fails to run ({error}); please report this model") from None
    if shape != reference_shape:
        raise RuntimeError(f"structured pruning changed the output shapes {reference_shape} -> {shape}")
    skipped = dict(graph.skipped)
    errors: tuple[dict, list] = ({}, [])
    if config.reconstruct:
        errors = refit_sequential(model, unpruned, kept_linear_positions(model, graph, chosen, skipped),
                                            list(calibration), config.damping)
    removed = {}
    for module, ids in graph.producers:
        count = int(sum(root in chosen for root in set(graph.uf.roots(ids).tolist())))
        if count:
            removed[module] = count
    choices = {name: choice.as_dict() for name, choice in widths.choices.items()} if widths is not None else {}
    return removed, skipped, {k: v for k, v in shapes.items() if v != before.get(k)}, errors, choices


def _taylor_gradients(context, batches: int = 4, batch_size: int = 32) -> None:
    """Gradients for Taylor importance from a few training batches of the task's own loss: cross-entropy on
    labels, BCE for click-through models, the next-token loss for causal LMs.

    Raises:
        InputError: the data has no such loss (unlabelled sentences for an encoder): the distance to the
            unpruned model would be the only loss, and its gradient is zero at the unpruned model.
    """
    from torchslim.recover.losses import get_loss

    task, model = context.bundle.task, context.model
    labelled = context.data.has_labels and task in ("classification", "ctr")
    if not labelled and task != "lm":
        raise InputError(f"{context.where}.importance: taylor needs a task loss (labels, or a language model's "
                         f"next-token loss) and this {task} model's data has none; use importance: activation")
    model.zero_grad(set_to_none=True)
    for inputs, labels in context.data.batches("train", context.bundle.preprocess, batch_size, shuffle=True,
                                               seed=context.seed, limit=batches * batch_size):
        outputs = call_model(model, inputs)
        if task == "lm":  # per sequence: [summed next-token NLL, tokens]
            loss = outputs[:, 0].sum() / outputs[:, 1].sum().clamp_min(1)
        else:
            loss = get_loss("bce" if task == "ctr" else "cross_entropy")(outputs, labels)
        loss.backward()


@register_method("prune", "channel", ChannelPruningConfig)
def prune_channels(context, config: ChannelPruningConfig) -> TorchDeployable:
    """The recipe step: prune ``context.model`` in place; the report gets removed channels and MACs."""
    if config.importance == "taylor":
        _taylor_gradients(context)
    # Latency (a target, or the table of round_to: auto) is measured at the recipe's batch size; otherwise a
    # small batch suffices to capture.
    timed = config.target_latency or config.rounding == "auto"
    example = context.example_inputs(context.batch_size if timed else 2)
    losses: list[list[float]] = []

    def finetune_between(model: nn.Module, step: int) -> None:
        _follow_masks(context)
        where = context.where
        context.where = f"{where}.finetune (after pruning step {step})"
        try:
            losses.append(finetune(context, config.finetune, name=f"finetune{step}").details["train_loss"])
        finally:
            context.where = where

    calibration = None
    if config.calibrated:
        # Text goes one sequence at a time: padding positions would otherwise weigh in the statistics.
        size = 1 if context.bundle.modality == "text" else config.calibration.batch_size
        calibration = [inputs for inputs, _ in context.data.batches(
            config.calibration.split, context.bundle.preprocess, size, shuffle=True, seed=context.seed,
            limit=config.calibration.samples)]
    try:
        result = prune(context.model, config, example, finetune_between if config.finetune is not None else None,
                       calibration)
    finally:
        context.model.zero_grad(set_to_none=True)
    _follow_masks(context)
    for layer, reason in result.skipped.items():
        context.skip_layer(layer, reason)
    details = {"macs_before": result.macs_before, "macs_after": result.macs_after,
               "removed_channels": result.removed_channels}
    if losses:
        details["finetune_train_loss"] = losses
    if result.widths:
        details["widths"] = result.widths
    # flat facts: a mapping of six or more numbers would read as a per-layer chart in report.html
    details.update({f"latency_{key}": value for key, value in result.latency.items()})
    if result.refit_errors:
        details["refit_relative_error"] = {"layers": len(result.refit_errors),
                                           "mean": round(float(np.mean(list(result.refit_errors.values()))), 4),
                                           "max": round(max(result.refit_errors.values()), 4),
                                           "to_residual_stream": len(result.refit_residual)}
    return TorchDeployable(context.model, details=details)


def _follow_masks(context) -> None:
    """Earlier unstructured masks follow their weights: what was zero stays zero in the smaller tensors."""
    if context.masks:
        parameters = dict(context.model.named_parameters())
        context.masks = {name: parameters[name].detach() != 0 for name in context.masks if name in parameters}
