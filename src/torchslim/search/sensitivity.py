"""The proxy pass: what each option of each decision costs in accuracy and time, measured without training.

Every option is applied alone to a copy of the untouched model (the same pruning, factorization and
quantization code the trials run) and scored on calibration samples against the untouched model's outputs:

- ``loss``: the output's change as the task's distillation loss sees it — KL divergence of the class
  distributions, 1 - cosine for embeddings, the relative next-token NLL change for causal LMs, the click
  probability's mean change for click-through models (ModelOpt-style: no labels, no training);
- ``sqnr``: the output's signal-to-quantization-noise ratio in dB (noise powers of independent options add).

Cost: every leaf layer's time is measured once on the baseline in eager PyTorch (forward hooks, medians, under
the latency lock); an option scales each leaf by the ratio of its work (MACs for convolutions and linears,
output elements for the rest) measured on the pruned copy. A precision's speed-up is measured on its own
runtime as one factor of the whole model, and each float-layer option's cost likewise. `torchslim.search.
allocation` combines these into plans.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from torchslim.core.modules import call_model, matches
from torchslim.data.config import CalibrationConfig
from torchslim.errors import describe
from torchslim.measure.metrics import kl_divergence
from torchslim.search.space import PRECISION, PRUNE, RANK, SearchSpace, module_work


def _leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and not list(m.children())}


def module_times(model: nn.Module, inputs: Any, repeats: int) -> tuple[dict[str, float], float]:
    """(leaf layer -> median milliseconds per call on ``inputs``, whole forward's median milliseconds)."""
    starts: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    handles = []
    for name, module in _leaves(model).items():
        def before(mod, args, name=name):
            starts[name] = time.perf_counter()

        def after(mod, args, out, name=name):
            samples.setdefault(name, []).append((time.perf_counter() - starts[name]) * 1000)
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    totals = []
    try:
        with torch.inference_mode():
            call_model(model, inputs)  # warm-up
            samples.clear()
            for _ in range(repeats):
                begin = time.perf_counter()
                call_model(model, inputs)
                totals.append((time.perf_counter() - begin) * 1000)
    finally:
        for handle in handles:
            handle.remove()
    return {k: statistics.median(v) * len(v) / repeats for k, v in samples.items()}, statistics.median(totals)


def _scale(base: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> tuple[dict, dict]:
    """Per base leaf, the ratio of work and of parameters after an option (a factorized layer's pair counts as
    the layer); only the leaves that changed."""
    work, params = {}, {}
    for name, (w, p) in base.items():
        parts = [v for k, v in after.items() if k == name or k.startswith(name + ".")]
        w2 = sum(v[0] for v in parts) if parts else 0.0
        p2 = sum(v[1] for v in parts) if parts else 0
        if w and abs(w2 / w - 1) > 1e-9:
            work[name] = round(w2 / w, 6)
        if p and p2 != p:
            params[name] = round(p2 / p, 6)
    return work, params


def output_loss(task: str, outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """The change from ``reference`` to ``outputs`` as the task's distillation loss sees it (0: identical)."""
    outputs, reference = outputs.double(), reference.double()
    if task == "embedding":
        return float(1 - torch.nn.functional.cosine_similarity(outputs, reference, dim=-1).mean())
    if task == "lm":
        nll = outputs[:, 0].sum() / outputs[:, 1].sum()
        return float(nll / (reference[:, 0].sum() / reference[:, 1].sum()) - 1)
    if task == "ctr":
        return float((torch.sigmoid(outputs) - torch.sigmoid(reference)).abs().mean())
    return float(kl_divergence(outputs.float(), reference.float()))


def output_sqnr(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """10 log10(signal power / noise power) of ``outputs`` against ``reference``, in dB (capped at 120)."""
    noise = float((outputs.double() - reference.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return 120.0 if noise <= signal * 1e-12 else min(120.0, 10 * math.log10(signal / noise))


class SensitivityPass:
    """Scores every option of ``space`` on a copy of ``runner``'s model (see the module docstring)."""

    def __init__(self, runner, space: SearchSpace, calibration: CalibrationConfig, float_layers: int,
                 log: Callable = print):
        self.runner, self.space, self.log = runner, space, log
        self.float_layers = float_layers
        data, preprocess = runner.data, runner.bundle.preprocess
        split = calibration.split
        if split == "calib" and not len(data.splits.get("calib", [])):
            split = "train"  # a source with no calibration samples still has training ones
        # Text batches pad to their longest sequence: short batches keep the scored outputs cheap.
        size = min(calibration.batch_size, 16) if runner.bundle.modality == "text" else calibration.batch_size
        self.split = split
        self.batches = [inputs for inputs, _ in data.batches(split, preprocess, size, limit=calibration.samples)]
        self.reference = self._outputs(runner.pristine)
        self.example = runner.bundle.example_inputs(2)
        self.work = module_work(runner.pristine, self.example)

    def _outputs(self, run) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([(call_model(run, b) if isinstance(run, nn.Module) else run(b)).float()
                              for b in self.batches])

    def _score(self, outputs: torch.Tensor) -> dict:
        return {"loss": round(output_loss(self.runner.bundle.task, outputs, self.reference), 8),
                "sqnr": round(output_sqnr(outputs, self.reference), 3)}

    def _structural(self, model: nn.Module) -> dict:
        entry = self._score(self._outputs(model))
        entry["scale"], entry["params_scale"] = _scale(self.work, module_work(model, self.example))
        return entry

    def _prune_options(self, result: dict) -> None:
        from torchslim.graph import analyse_channels, capture
        from torchslim.pruning.channel import ChannelPruningConfig, remove_channels, select_channels

        decisions = [d for d in self.space.decisions if d.kind == PRUNE]
        if not decisions:
            return
        graph = analyse_channels(capture(self.runner.pristine, self.example), model=self.runner.pristine)
        importance = self.space.importance if self.space.importance in ("l1", "l2", "bn") else "l2"
        if importance != self.space.importance:
            result["notes"].append(f"proxy ranks channels by l2 magnitude (space.importance "
                                   f"{self.space.importance} is calibrated; trials use it)")
        for d in decisions:
            for option in d.options:
                if option == d.neutral:
                    continue
                model = copy.deepcopy(self.runner.pristine)
                config = ChannelPruningConfig(ratio=0.0, ratios={layer: option for layer in d.layers},
                                        importance=importance, round_to=self.space.round_to, skip=self.space.skip)
                try:
                    remove_channels(model, graph, select_channels(model, graph, config, 0.0))
                    result["options"].setdefault(d.name, {})[str(option)] = self._structural(model)
                except Exception as error:  # an option this model cannot take is dropped from the plans
                    result["options"].setdefault(d.name, {})[str(option)] = {"error": describe(error)}

    def _rank_options(self, result: dict) -> None:
        from torchslim.factorize.svd import SvdConfig, factorize_svd

        for d in [d for d in self.space.decisions if d.kind == RANK]:
            for option in d.options:
                if option == d.neutral:
                    continue
                model = copy.deepcopy(self.runner.pristine)
                try:
                    factorize_svd(model, SvdConfig(rank_ratio=option, layers=list(d.layers),
                                                          round_to=self.space.round_to), self.example)
                    result["options"].setdefault(d.name, {})[str(option)] = self._structural(model)
                except Exception as error:
                    result["options"].setdefault(d.name, {})[str(option)] = {"error": describe(error)}

    def _precision(self, name: str, skip: list[str], label: str) -> tuple[dict, Any]:
        from torchslim.search.space import _quantize_step
        from torchslim.search.trial import ab_latency

        runner = self.runner
        recipe = runner.recipe
        raw = {"model": recipe.model.to_recipe(), "data": recipe.data.to_recipe(), "seed": recipe.seed,
               "measure": {"batch_size": runner.recipe.measure.batch_size},
               "steps": [{"quantize": _quantize_step(name, skip)}]}
        deployable, context = runner.build(raw, label)
        entry = self._score(self._outputs(deployable))
        timing = ab_latency(deployable, runner.baseline_deployable, runner.batch, max(3, runner.repeats // 2),
                            runner.lock_path)
        from torchslim.measure.size import artifact_bytes

        raw_bytes, shipped = artifact_bytes(deployable.save(runner.workdir / label / "artifact"))
        entry.update(latency_ratio=timing["latency_ratio"], latency_ratio_bs1=timing["latency_ratio_bs1"],
                     size_ratio=round(shipped / runner.baseline["size_bytes"], 6))
        return entry, context

    def _precisions(self, result: dict) -> None:
        if PRECISION not in self.space.names():
            return
        for name in self.space[PRECISION].options:
            if name == "float":
                continue
            try:
                entry, context = self._precision(name, [], f"sensitivity-{name}")
            except Exception as error:
                result["precision"][name] = {"error": describe(error)}
                continue
            result["precision"][name] = entry
            if name == "int8-static" and self.float_layers:
                self._float_layers(result, entry, context)

    def _float_layers(self, result: dict, int8: dict, context) -> None:
        from torchslim.quant.onnx_backend import module_names
        from torchslim.quant.onnx_sensitivity import layer_errors

        folder = context.workdir / "int8-static-onnxruntime"
        float_path = folder / "float.onnx"
        prepared = folder / "float.prepared.onnx"
        feeds = [{f"input_{i}": t.numpy() for i, t in enumerate(b if isinstance(b, (tuple, list)) else (b,))}
                 for b in self.batches[:2]]
        errors = layer_errors(prepared if prepared.exists() else float_path, folder / "int8.onnx", feeds)
        modules = module_names(float_path)
        ranked: dict[str, float] = {}
        for node, db in sorted(errors.items(), key=lambda kv: kv[1], reverse=True):
            layer = modules.get(node)
            if layer and layer not in ranked and not matches(layer, self.space.skip):
                ranked[layer] = round(db, 3)
        chosen = list(ranked)[:self.float_layers]
        for layer in chosen:
            try:
                entry, _ = self._precision("int8-static", [layer], f"sensitivity-float-{layer}")
            except Exception as error:
                result["float_layers"][layer] = {"error": describe(error), "db": ranked[layer]}
                continue
            entry["db"] = ranked[layer]
            result["float_layers"][layer] = entry
        result["layer_sqnr_loss_db"] = ranked

    def run(self) -> dict:
        """Every option's scores and the cost model; a plain dict (stored with the study)."""
        started = time.perf_counter()
        runner = self.runner
        result: dict = {"split": self.split, "samples": int(self.reference.shape[0]), "options": {},
                        "precision": {}, "float_layers": {}, "notes": []}
        self.log(f"sensitivity: timing every layer of the baseline at batch {runner.recipe.measure.batch_size}")
        from filelock import FileLock

        with FileLock(str(runner.lock_path)) if runner.lock_path else _null():
            times, total = module_times(runner.pristine, runner.batch, max(3, runner.repeats))
        work = module_work(runner.pristine, self.example)
        result["leaves"] = {name: {"ms": round(times.get(name, 0.0), 5), "work": w, "params": p}
                            for name, (w, p) in work.items()}
        result["total_ms"] = round(total, 4)
        result["other_ms"] = round(max(0.0, total - sum(times.values())), 4)
        self.log(f"sensitivity: {sum(len(d.options) - 1 for d in self.space.decisions if d.kind in (PRUNE, RANK))}"
                 f" pruning/rank options on {result['samples']} {self.split} samples")
        self._prune_options(result)
        self._rank_options(result)
        self._precisions(result)
        result["seconds"] = round(time.perf_counter() - started, 2)
        return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def add_float_decisions(space: SearchSpace, sensitivity: dict) -> None:
    """Give the measured float-layer options their decisions (under int8-static)."""
    layers = [layer for layer, entry in sensitivity.get("float_layers", {}).items() if "error" not in entry]
    space.add_float_layers(layers, {})
