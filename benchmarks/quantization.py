"""int8 side by side: `python benchmarks/quantization.py [--json PATH] [--eval-limit N] [--models lite0,minilm,resnet18]
[--quick]
[--rows fp32_eager,torchslim_pipeline,torchslim_equalize,torchslim_adaround] [--threads N]`.

For each model (EfficientNet-Lite0 on builtin:images, all-MiniLM-L6-v2 on builtin:sentences, and the
digits-trained ResNet-18 of ``pruning_vs_torch_pruning.py`` on builtin:digits, trained here for 3 epochs by the
same code and seed) this process builds and measures, one after another and by the same code:

  1. fp32 eager PyTorch (the reference every fidelity figure is computed against);
  2. fp32 ONNX Runtime (the same model exported by ``torchslim.export.export_onnx``);
  3. ONNX Runtime's own quantizer, configured as its documentation recommends for this CPU: Lite0:
     ``quant_pre_process`` then ``quantize_static`` (QDQ, MinMax calibration on the same 256 calibration crops,
     per-channel QInt8 weights, QUInt8 activations, ``reduce_range`` where the CPU has no VNNI); MiniLM:
     ``quant_pre_process`` then ``quantize_dynamic`` on MatMul/Gemm (per-channel QInt8, same ``reduce_range``);
  4. ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear`` (eager; on Lite0 that is the classifier only);
  5. torchao int8 compiled by torch.compile: Lite0 through PT2E with the X86InductorQuantizer (its default
     histogram observers, calibrated on the same crops), MiniLM through ``quantize_`` with
     ``Int8DynamicActivationInt8WeightConfig``; compile time (the first call at each timed shape) is separate;
  6. torchslim: the example recipe run by ``torchslim.pipeline.Pipeline`` (Lite0 with ``--set``
     ``steps.0.quantize.runtime=onnxruntime``); its int8 ONNX file is loaded into a fresh session here. Lite0
     also with ``fallback_layers=4``, ``equalize=true``, ``adaround.enabled=true`` (learned weight rounding) and
     ``max_drop=0.01`` with ``fallback_slow_layers=true`` (mixed precision); both models also through
     ``quantize: {method: bf16}`` (bfloat16 units, eager or compiled as its ``runtime: auto`` measures);
     MiniLM also with ``quantize: {method: auto, max_drop: 0.01}`` (int8-static with SmoothQuant, int8-dynamic
     and bf16 built, scored and timed by the step, the fastest within the drop kept; the row is its choice).
     ResNet-18: ``int8-static`` on ONNX Runtime with its defaults through ``torchslim.apply`` (no float layer),
     scored by accuracy on the 539 test digits against fp32's.

Every ONNX file runs in a `torchslim.runtime.OnnxRuntimeDeployable` (CPU provider, intra-op threads = torch's).
Latency: medians of repeated timings (``measure_latency``) at batch 1 and the batched size (Lite0 16, MiniLM 32
at 64 tokens: real test sentences padded/truncated to 64). Fidelity on the test split against fp32 eager: Lite0
top-1 agreement and mean KL(fp32 || row); MiniLM mean and minimum cosine similarity of the embeddings (inputs from
the model's own preprocess, padded to the batch's longest). Artifact bytes: the ONNX file for ONNX rows; for torch
rows the state dict saved with ``torch.save`` into memory (for the PT2E graph: only the tensors it reads).
Prep time: calibration + quantization wall seconds (export included where the row exports).
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import comma_list, deprecated_alias, goal, parser, write_results  # noqa: E402

from torchslim.data import resolve_data  # noqa: E402
from torchslim.errors import describe  # noqa: E402
from torchslim.export import export_onnx  # noqa: E402
from torchslim.measure import measure_latency, set_threads  # noqa: E402
from torchslim.measure.size import artifact_bytes  # noqa: E402
from torchslim.measure.metrics import (CONFIDENT_MARGIN, accuracy, confident_agreement,  # noqa: E402
                                      cosine_similarity_stats, kl_divergence, top1_agreement, topk_agreement)
from torchslim.quant import pt2e_backend  # noqa: E402
from torchslim.core.cpu import has_vnni, int8_features  # noqa: E402
from torchslim.core.modules import call_model  # noqa: E402
from torchslim.zoo import resolve_model  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"
SEQUENCE = 64  # MiniLM's timed sequence length


@dataclass
class Workload:
    """One model with everything every row is fed: the same eval, latency and calibration batches."""

    key: str
    bundle: Any
    task: str  # "classification" or "embedding"
    batch_size: int
    eval_batches: list
    latency_bs1: Any
    latency_batch: Any
    calib_batches: list
    recipe: Path | None  # None: torchslim's rows call `torchslim.apply` (a model trained in this process)
    overrides: list[str]
    eval_labels: torch.Tensor | None = None  # where the test split has labels: accuracy is reported too


@dataclass
class Candidate:
    """A built row: ``run(inputs) -> outputs``, its artifact size and how long it took to build."""

    name: str
    runtime: str
    run: Callable[[Any], torch.Tensor]
    artifact_bytes: int
    prep_s: float
    notes: dict = field(default_factory=dict)
    compiles: bool = False
    path: Path | None = None  # the file, for ONNX rows: its deflated (shipped) size is reported too


def _args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _first(inputs: Any, n: int) -> Any:
    return tuple(t[:n] for t in inputs) if isinstance(inputs, (tuple, list)) else inputs[:n]


def torch_bytes(tensors: dict) -> int:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getbuffer().nbytes


def int8_layers(converted: nn.Module) -> str:
    """How many conv/linear calls of a converted PT2E graph read an int8 weight."""
    total, left = pt2e_backend.float_layers(converted)
    return f"{total - len(left)} of {total} conv/linear"


def eager(module: nn.Module) -> Callable:
    def run(inputs):
        with torch.inference_mode():
            return call_model(module, inputs)
    return run


def onnx_session(path: Path, module: nn.Module, threads: int) -> Callable:
    from torchslim.runtime import OnnxRuntimeDeployable

    return OnnxRuntimeDeployable(path, module, threads)


# ---------------------------------------------------------------------------------------------------- workloads
def lite0_workload(crops: int) -> Workload:
    bundle, data = resolve_model("builtin:efficientnet-lite0"), resolve_data("builtin:images")
    batch = 16
    return Workload(
        key="lite0", bundle=bundle, task="classification", batch_size=batch,
        eval_batches=[x for x, _ in data.batches("test", bundle.preprocess, batch, limit=crops)],
        latency_bs1=data.fill_batch("test", bundle.preprocess, 1),
        latency_batch=data.fill_batch("test", bundle.preprocess, batch),
        calib_batches=[x for x, _ in data.batches("calib", bundle.preprocess, 32, limit=256)],
        recipe=RECIPES / "efficientnet-lite0-int8.yaml", overrides=["steps.0.quantize.runtime=onnxruntime"])


def minilm_workload(limit: int) -> Workload:
    bundle, data = resolve_model("builtin:minilm"), resolve_data("builtin:sentences")
    batch, test = 32, data.splits["test"]
    encoded = bundle.preprocess.tokenizer([test[i % len(test)] for i in range(batch)], padding="max_length",
                                          truncation=True, max_length=SEQUENCE, return_tensors="pt")
    timed = (encoded["input_ids"], encoded["attention_mask"])
    return Workload(
        key="minilm", bundle=bundle, task="embedding", batch_size=batch,
        eval_batches=[x for x, _ in data.batches("test", bundle.preprocess, batch, limit=limit)],
        latency_bs1=_first(timed, 1), latency_batch=timed,
        calib_batches=[x for x, _ in data.batches("calib", bundle.preprocess, 32, limit=256)],
        recipe=RECIPES / "minilm-int8-dynamic.yaml", overrides=[])


def resnet18_workload(limit: int, train_epochs: int = 3, seed: int = 0) -> Workload:
    """The digits-trained ResNet-18 of ``pruning_vs_torch_pruning.py`` (trained here, same recipe and seed),
    scored by accuracy on the 539 test digits; calibration on the first 256 training digits."""
    from pruning_vs_torch_pruning import digits_bundle

    bundle, training = digits_bundle("resnet18", train_epochs, seed)
    data, batch = resolve_data("builtin:digits", seed), 32
    pairs = list(data.batches("test", bundle.preprocess, batch, limit=limit))
    return Workload(
        key="resnet18", bundle=bundle, task="classification", batch_size=batch,
        eval_batches=[x for x, _ in pairs], eval_labels=torch.cat([y for _, y in pairs]),
        latency_bs1=data.fill_batch("test", bundle.preprocess, 1),
        latency_batch=data.fill_batch("test", bundle.preprocess, batch),
        calib_batches=[x for x, _ in data.batches("train", bundle.preprocess, 32, limit=256)],
        recipe=None, overrides=[])


# ---------------------------------------------------------------------------------------------------- rows
def fp32_eager(w: Workload, scratch: Path, threads: int) -> Candidate:
    model = w.bundle.model
    return Candidate("fp32 eager", "torch", eager(model), torch_bytes(model.state_dict()), 0.0)


def fp32_onnx(w: Workload, scratch: Path, threads: int) -> Candidate:
    started = time.perf_counter()
    path = scratch / f"{w.key}-fp32.onnx"
    exporter = export_onnx(w.bundle.model, w.bundle.example_inputs(2), path)
    seconds = time.perf_counter() - started
    return Candidate("fp32 onnxruntime", "onnxruntime", onnx_session(path, w.bundle.model, threads),
                     path.stat().st_size, seconds, {"exporter": exporter, "prep": "export"}, path=path)


class _Feeds:
    """ONNX Runtime CalibrationDataReader over the workload's calibration batches."""

    def __init__(self, batches: list):
        self.batches = batches
        self.rewind()

    def get_next(self):
        batch = next(self.iterator, None)
        return None if batch is None else {f"input_{i}": t.numpy() for i, t in enumerate(_args(batch))}

    def rewind(self):
        self.iterator = iter(self.batches)


def ort_peer(w: Workload, scratch: Path, threads: int) -> Candidate:
    """ONNX Runtime's own quantizer on the fp32 ONNX file: its pre-processing, calibration and defaults."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = scratch / f"{w.key}-fp32.onnx"
    prepared, int8 = scratch / f"{w.key}-ort-prepared.onnx", scratch / f"{w.key}-ort-int8.onnx"
    reduce_range = not has_vnni()
    started = time.perf_counter()
    # ONNX Runtime's symbolic shape inference leaves sym_shape_infer_temp.onnx (+ data) in the working
    # directory when it fails: keep that out of the caller's folder.
    with contextlib.chdir(scratch):
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
            pre_process = "quant_pre_process"
        except Exception as error:  # as its docstring advises when symbolic inference cannot finish
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            pre_process = ("quant_pre_process(skip_symbolic_shape=True): symbolic shape inference failed "
                           f"({describe(error)})")
    if w.task == "classification":
        quantize_static(str(prepared), str(int8), _Feeds(w.calib_batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        name, notes = "ort quantize_static", {"calibration_samples": sum(len(_args(b)[0]) for b in w.calib_batches),
                                              "format": "QDQ", "calibration": "MinMax"}
    else:
        quantize_dynamic(str(prepared), str(int8), per_channel=True, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        name, notes = "ort quantize_dynamic", {"op_types": ["MatMul", "Gemm"]}
    seconds = time.perf_counter() - started
    notes.update(pre_process=pre_process, per_channel=True, weights="QInt8", activations="QUInt8",
                 reduce_range=reduce_range)
    return Candidate(name, "onnxruntime", onnx_session(int8, w.bundle.model, threads), int8.stat().st_size,
                     seconds, notes, path=int8)


def torch_ao_dynamic(w: Workload, scratch: Path, threads: int) -> Candidate:
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(w.bundle.model), {nn.Linear},
                                                       dtype=torch.qint8)
    seconds = time.perf_counter() - started
    quantized = sum(1 for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized"))
    notes = {"quantized_linear_modules": quantized,
             "deprecated": any(issubclass(c.category, DeprecationWarning) for c in caught)}
    return Candidate("torch.ao quantize_dynamic", "torch", eager(model), torch_bytes(model.state_dict()), seconds,
                     notes)


def torchao_compiled(w: Workload, scratch: Path, threads: int) -> Candidate:
    """torchao's int8 path for the model, compiled by TorchInductor (compile happens on the first calls)."""
    model = copy.deepcopy(w.bundle.model).eval()
    started = time.perf_counter()
    if w.task == "embedding":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        nbytes = torch_bytes(model.state_dict())
        compiled = torch.compile(model)
        notes = {"flow": "quantize_(Int8DynamicActivationInt8WeightConfig) + torch.compile"}
        name = "torchao int8-dyn+compile"

        def run(inputs):
            with torch.no_grad():
                return compiled(*_args(inputs))
    else:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = x86.X86InductorQuantizer().set_global(
            x86.get_default_x86_inductor_quantization_config(reduce_range=not has_vnni()))
        exported = torch.export.export(model, (w.bundle.example_inputs(2),),
                                       dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for batch in w.calib_batches:
                prepared(batch)
        converted = convert_pt2e(prepared)
        nbytes = torch_bytes(pt2e_backend.graph_tensors(converted))  # not the float weights it no longer reads
        # Static shapes (one compile per batch size): the int8 conv lowering does not take a dynamic batch.
        compiled = torch.compile(converted, dynamic=False)
        notes = {"flow": "PT2E X86InductorQuantizer (default histogram observers) + torch.compile, freezing",
                 "reduce_range": not has_vnni(), "int8_weights": int8_layers(converted)}
        name = "torchao pt2e+compile"

        def run(inputs):
            with torch.no_grad(), torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return compiled(inputs)
    seconds = time.perf_counter() - started
    return Candidate(name, "torchinductor", run, nbytes, seconds, notes, compiles=True)


def torchslim_pipeline(w: Workload, scratch: Path, threads: int, extra: tuple[str, ...] = (),
                       label: str = "") -> Candidate:
    """The example recipe through torchslim's pipeline in this process; its int8 ONNX file, reloaded here. A
    workload without a recipe (a model trained in this process) goes through `torchslim.apply` instead."""
    import shutil

    if w.recipe is None:
        return None if extra else torchslim_apply(w, scratch, threads)

    from torchslim.pipeline import Pipeline
    from torchslim.recipe import load_recipe

    # The pipeline measures its own stages too; fewer samples there leave the quantize step untouched.
    recipe = load_recipe(w.recipe, w.overrides + list(extra) + ["measure.max_eval_samples=64", "measure.repeats=3",
                                                  f"measure.threads={threads}"])
    with tempfile.TemporaryDirectory(dir=scratch) as workdir, contextlib.chdir(workdir):
        stages, final, _ = Pipeline(recipe, progress=False, log=lambda message: None).run(Path(workdir))
        path = scratch / f"{w.key}-torchslim-int8{label.replace(' ', '-')}.onnx"
        shutil.copyfile(final.path, path)
    set_threads(threads)
    stage = stages[-1]
    notes = {"recipe": f"{w.recipe.name} {' '.join('--set ' + o for o in w.overrides + list(extra))}".strip(),
             "step": stage["step"], **{k: v for k, v in stage["details"].items()
                                       if k in ("runtime_choice", "weights", "activations", "reduce_range",
                                                "observer", "calibration_samples", "format",
                                                "sensitive_float_nodes_db", "export_seconds",
                                                "ptq_seconds", "equalization")}}
    if "adaround" in stage["details"]:  # its per-layer table stays in the pipeline's report
        notes["adaround"] = {k: v for k, v in stage["details"]["adaround"].items() if k != "layers"}
    if "float_layer_choice" in stage["details"]:  # the per-layer timings stay in the pipeline's report
        choice = stage["details"]["float_layer_choice"]
        notes["float_layer_choice"] = {**{k: v for k, v in choice.items() if k != "layers"},
                                       "float_layers": list(choice["layers"]),
                                       "float_cost_ms_batch": round(sum(
                                           v.get("float_cost_ms_batch", 0.0) for v in choice["layers"].values()), 3)}
    return Candidate(f"torchslim {stage['step'].split(':')[1]}{label}", "onnxruntime",
                     onnx_session(path, w.bundle.model, threads), path.stat().st_size, stage["step_seconds"],
                     notes, path=path)


def torchslim_apply(w: Workload, scratch: Path, threads: int) -> Candidate:
    """``int8-static`` on ONNX Runtime with its defaults through `torchslim.apply`, calibrated on the workload's
    calibration batches; the saved ONNX file, reloaded here."""
    import torchslim

    started = time.perf_counter()
    result = torchslim.apply(copy.deepcopy(w.bundle.model), torchslim.Int8StaticConfig(runtime="onnxruntime"),
                             w.calib_batches, example_inputs=w.calib_batches[0][:1])
    seconds = time.perf_counter() - started
    path = result.save(scratch / f"{w.key}-torchslim-int8", overwrite=True)
    set_threads(threads)
    notes = {"api": "torchslim.apply(model, Int8StaticConfig(runtime='onnxruntime'), calibration batches)",
             **{k: v for k, v in result.details.items() if k in ("weights", "activations", "observer",
                                                                 "calibration_samples", "ptq_seconds")}}
    return Candidate("torchslim int8-static", "onnxruntime", onnx_session(path, w.bundle.model, threads),
                     path.stat().st_size, seconds, notes, path=path)


def torchslim_fallback(w: Workload, scratch: Path, threads: int) -> Candidate | None:
    """Lite0 only: the same recipe keeping its 4 noisiest layers in float (the accuracy / speed trade)."""
    if w.key != "lite0":
        return None
    return torchslim_pipeline(w, scratch, threads, ("steps.0.quantize.fallback_layers=4",), " fallback 4")


def torchslim_equalize(w: Workload, scratch: Path, threads: int) -> Candidate | None:
    """Lite0 only: the same recipe with cross-layer equalization before calibration (``equalize: true``)."""
    if w.key != "lite0":
        return None
    return torchslim_pipeline(w, scratch, threads, ("steps.0.quantize.equalize=true",), " equalize")


def torchslim_adaround(w: Workload, scratch: Path, threads: int) -> Candidate | None:
    """Lite0 only: the same recipe with learned weight rounding (``adaround: {enabled: true}``, its defaults)."""
    if w.key != "lite0":
        return None
    return torchslim_pipeline(w, scratch, threads, ("steps.0.quantize.adaround.enabled=true",), " adaround")


def one_step(w: Workload, scratch: Path, threads: int, step: dict, name: str | None = None):
    """``step`` (a quantize step as a dict) as a one-step recipe on the workload's model and data through the
    pipeline in this process (its own stage measurements cut short); returns (stage record, final deployable,
    its artifact saved under ``scratch`` when ``name`` is given, else None)."""
    from torchslim.pipeline import Pipeline
    from torchslim.recipe import parse_recipe

    data = "builtin:images" if w.key == "lite0" else "builtin:sentences"
    recipe = parse_recipe({"model": w.bundle.spec, "data": data, "steps": [{"quantize": step}],
                           "measure": {"batch_size": w.batch_size, "max_eval_samples": 64, "repeats": 3,
                                       "threads": threads}}, source="benchmarks/quantization.py")
    with tempfile.TemporaryDirectory(dir=scratch) as workdir, contextlib.chdir(workdir):
        stages, final, _ = Pipeline(recipe, progress=False, log=lambda message: None).run(Path(workdir))
        path = final.save(scratch / f"{w.key}-torchslim-{name}") if name else None  # before the folder goes
    set_threads(threads)
    return stages[-1], final, path


def torchslim_auto(w: Workload, scratch: Path, threads: int) -> Candidate | None:
    """MiniLM only: ``quantize: {method: auto, max_drop: 0.01}`` — the step builds int8-static (SmoothQuant),
    int8-dynamic and bf16, scores each on the validation split, times each on its runtime and keeps the fastest
    within the drop (cosine >= 0.99); the row is what it kept."""
    if w.key != "minilm":
        return None
    step = {"method": "auto", "candidates": ["int8-static", "int8-dynamic", "bf16"], "max_drop": 0.01,
            "settings": {"int8-static": {"smoothquant": True}}}
    stage, final, path = one_step(w, scratch, threads, step, "auto")
    details = stage["details"]
    chosen = (details.get("chosen") or {}).get("method", "float")
    notes = {"recipe": f"quantize: {step}", "choice": details.get("choice"),
             "candidates": details.get("candidates")}
    onnx = final.runtime == "onnxruntime"
    run = onnx_session(path, w.bundle.model, threads) if onnx else final  # (bf16 casts inside the model)
    return Candidate(f"torchslim auto ({chosen})", final.runtime, run, path.stat().st_size, stage["step_seconds"],
                     notes, path=path if onnx else None, compiles=final.runtime == "torchinductor")


MAX_DROP = 0.01  # the agreement Lite0's mixed-precision row may lose on the validation split


def torchslim_max_drop(w: Workload, scratch: Path, threads: int) -> Candidate | None:
    """Lite0 only: the same recipe with ``max_drop: 0.01`` (the fewest most sensitive layers kept float for
    top-1 agreement within 0.01 of fp32 on the 128 validation crops) and ``fallback_slow_layers: true``."""
    if w.key != "lite0":
        return None
    return torchslim_pipeline(w, scratch, threads, (f"steps.0.quantize.max_drop={MAX_DROP}",
                                                    "steps.0.quantize.fallback_slow_layers=true"),
                              f" max_drop {MAX_DROP}")


def torchslim_bf16(w: Workload, scratch: Path, threads: int) -> Candidate | None:
    """``quantize: {method: bf16}`` through the pipeline: the CPU's bfloat16 units, on eager PyTorch or compiled by
    TorchInductor, whichever the step's ``runtime: auto`` measured faster."""
    if w.recipe is None:
        return None
    stage, final, _ = one_step(w, scratch, threads, {"method": "bf16"})
    return Candidate("torchslim bf16", final.runtime, final, torch_bytes(final.module.state_dict()),
                     stage["step_seconds"],
                     {"recipe": "quantize: {method: bf16}", **{k: v for k, v in stage["details"].items()
                                                               if isinstance(v, (str, int, float, bool))}},
                     compiles=final.runtime == "torchinductor")


def torchslim_static_smoothquant(w: Workload, scratch: Path, threads: int) -> Candidate | None:
    """MiniLM only: ``quantize: {method: int8-static, runtime: onnxruntime, smoothquant: true}`` — activations
    quantized statically, every weighted MatMul group smoothed on the ONNX graph (post-LN: no LayerNorm fold
    applies), the weighted layers' outputs left float."""
    if w.key != "minilm":
        return None
    step = {"method": "int8-static", "runtime": "onnxruntime", "smoothquant": True}
    stage, final, path = one_step(w, scratch, threads, step, "static-smoothquant")
    smoothing = stage["details"].get("smoothing_onnx", {})
    notes = {"recipe": f"quantize: {step}", "groups_smoothed": len(smoothing.get("smoothed", {})),
             "groups_refused": len(smoothing.get("refused", {})), "ptq_seconds": stage["details"].get("ptq_seconds")}
    return Candidate("torchslim int8-static smoothquant", "onnxruntime", onnx_session(path, w.bundle.model, threads),
                     path.stat().st_size, stage["step_seconds"], notes, path=path)


ROWS = (fp32_eager, fp32_onnx, ort_peer, torch_ao_dynamic, torchao_compiled, torchslim_pipeline, torchslim_fallback,
        torchslim_equalize, torchslim_adaround, torchslim_max_drop, torchslim_static_smoothquant, torchslim_bf16,
        torchslim_auto)


# ---------------------------------------------------------------------------------------------------- measuring
def fidelity(task: str, outputs: torch.Tensor, reference: torch.Tensor) -> dict:
    if task == "embedding":
        mean, minimum = cosine_similarity_stats(outputs, reference)
        scores = {"cosine_mean": round(mean, 5), "cosine_min": round(minimum, 5)}
    else:
        confident, count = confident_agreement(outputs, reference, CONFIDENT_MARGIN)
        scores = {"agreement": round(top1_agreement(outputs, reference), 5),
                  "kl": round(kl_divergence(outputs, reference), 5),
                  "top5_agreement": round(topk_agreement(outputs, reference, 5), 5),
                  "confident_agreement": None if confident is None else round(confident, 5),
                  "confident_samples": count, "confident_margin": CONFIDENT_MARGIN}
    return {**scores, "eval_samples": int(outputs.shape[0])}


def measure(c: Candidate, w: Workload, reference: torch.Tensor | None, repeats: int) -> tuple[dict, torch.Tensor]:
    """The row's latency (batch 1 and batched, medians), artifact size and fidelity, the same for every row."""
    row: dict = {"model": w.key, "row": c.name, "runtime": c.runtime, "artifact_bytes": c.artifact_bytes,
                 "prep_s": round(c.prep_s, 2), "notes": c.notes}
    if c.path is not None:
        row["artifact_bytes_deflate"] = artifact_bytes(c.path)[1]
    if c.compiles:  # the first call at each timed shape compiles; timed on its own
        started = time.perf_counter()
        c.run(w.latency_bs1)
        c.run(w.latency_batch)
        row["compile_s"] = round(time.perf_counter() - started, 1)
    bs1 = measure_latency(c.run, w.latency_bs1, warmup=3, repeats=repeats * 2, min_seconds=0.5)
    batched = measure_latency(c.run, w.latency_batch, warmup=2, repeats=repeats)
    row.update(latency_ms_bs1=round(bs1.median_ms, 3), latency_ms_batch=round(batched.median_ms, 3),
               batch_size=w.batch_size, latency_spread_ms_batch=[round(batched.min_ms, 3), round(batched.max_ms, 3)])
    outputs = torch.cat([c.run(batch).float() for batch in w.eval_batches])
    row.update(fidelity(w.task, outputs, outputs if reference is None else reference))
    if w.eval_labels is not None:
        row["accuracy"] = round(accuracy(outputs, w.eval_labels), 5)
    return row, outputs


def run_workload(w: Workload, scratch: Path, threads: int, repeats: int, log: Callable[[str], None],
                 only: tuple = ROWS, seed: int = 0) -> list[dict]:
    rows, reference = [], None
    for build in (b for b in ROWS if b in only or b is fp32_eager):  # fp32 eager is every row's reference
        torch.manual_seed(seed)
        set_threads(threads)
        log(f"{w.key}: {build.__name__} ...")
        try:
            candidate = build(w, scratch, threads)
            if candidate is None:  # the row does not apply to this model
                continue
        except Exception as error:  # a path that fails on this stack is reported, and the others go on
            rows.append({"model": w.key, "row": build.__name__, "error": describe(error)})
            log(f"  failed: {describe(error)}\n{traceback.format_exc(limit=3)}")
            continue
        try:
            row, outputs = measure(candidate, w, reference, repeats)
            reference = outputs if reference is None else reference
        except Exception as error:
            row = {"model": w.key, "row": candidate.name, "runtime": candidate.runtime,
                   "error": f"measuring: {describe(error)}"}
            log(f"  failed: {describe(error)}\n{traceback.format_exc(limit=3)}")
        rows.append(row)
        del candidate
    base = rows[0]
    onnx_base = next((r for r in rows if r["row"] == "fp32 onnxruntime" and "error" not in r), None)
    for row in rows:
        if "error" in row:
            continue
        row["speedup_bs1"] = round(base["latency_ms_bs1"] / row["latency_ms_bs1"], 3)
        row["speedup_batch"] = round(base["latency_ms_batch"] / row["latency_ms_batch"], 3)
        size_base = onnx_base if row["runtime"] == "onnxruntime" and onnx_base else base
        row["size_reduction"] = round(size_base["artifact_bytes"] / row["artifact_bytes"], 3)
        row["size_reduction_vs"] = size_base["row"]
        if "artifact_bytes_deflate" in row and "artifact_bytes_deflate" in size_base:
            deflated = size_base["artifact_bytes_deflate"] / row["artifact_bytes_deflate"]
            row["size_reduction_deflate"] = round(deflated, 3)
    return rows


# ---------------------------------------------------------------------------------------------------- output
def print_table(rows: list[dict]) -> None:
    head = (f"{'model':7s} {'row':32s} {'runtime':13s} {'bs1 ms':>8s} {'x':>6s} {'batch ms':>14s} {'x':>6s} "
            f"{'MB':>6s} {'size x':>6s} {'deflt x':>7s} {'fidelity':52s} {'prep s':>7s} {'compile s':>9s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:7s} {r['row']:26s} {r.get('runtime', ''):13s} ERROR: {r['error'][:110]}")
            continue
        if "agreement" in r:
            confident = "n/a" if r["confident_agreement"] is None else f"{r['confident_agreement']:.4f}"
            fid = (f"agree {r['agreement']:.4f} conf {confident}/{r['confident_samples']} top5 "
                   f"{r['top5_agreement']:.4f} KL {r['kl']:.4f}")
            if "accuracy" in r:
                fid = f"acc {r['accuracy']:.4f} agree {r['agreement']:.4f} KL {r['kl']:.4f}"
        else:
            fid = f"cos {r['cosine_mean']:.4f} min {r['cosine_min']:.4f}"
        batch = f"{r['latency_ms_batch']:.2f} @{r['batch_size']}"
        print(f"{r['model']:7s} {r['row']:32s} {r['runtime']:13s} {r['latency_ms_bs1']:8.2f} {r['speedup_bs1']:6.2f} "
              f"{batch:>14s} {r['speedup_batch']:6.2f} {r['artifact_bytes'] / 1e6:6.2f} {r['size_reduction']:6.2f} "
              f"{r.get('size_reduction_deflate', ''):>7} {fid:52s} {r['prep_s']:7.1f} {r.get('compile_s', ''):>9}")
    print("x: speed-up vs fp32 eager. size x: fp32 ONNX file / ONNX file for ONNX Runtime rows, fp32 eager "
          "torch.save(state_dict) / row's torch.save bytes for torch rows; deflt x: the same for the files deflated "
          "(zlib 9) as the pipeline's reports count shipped size. prep s: calibration + quantization "
          "(+ export) wall time. conf: top-1 agreement on the crops where fp32's top-1 softmax probability leads "
          "its top-2 by more than 0.1 / how many; top5: fp32's class among the row's five best.")


def goals_for(rows: list[dict], min_crops: int = 500) -> list[dict]:
    find = {(r["model"], r["row"]): r for r in rows if "error" not in r}
    goals = []
    ours = find.get(("lite0", "torchslim int8-static"))
    if ours:
        goals.append(goal("lite0 torchslim speed-up vs fp32 eager at batch 16 (x)", ours["speedup_batch"], ">= 8",
                          ours["speedup_batch"] >= 8))
        goals.append(goal(f"lite0 torchslim top-1 agreement on {ours['eval_samples']} crops", ours["agreement"],
                          f">= 0.97 on >= {min_crops} crops",
                          ours["agreement"] >= 0.97 and ours["eval_samples"] >= min_crops))
        peer = find.get(("lite0", "ort quantize_static"))
        if peer:
            ratio = round(ours["latency_ms_batch"] / peer["latency_ms_batch"], 3)
            goals.append(goal("lite0 torchslim / ort quantize_static latency at batch 16 (agreement "
                              f"{ours['agreement']:.4f} vs {peer['agreement']:.4f})", ratio,
                              "<= 1.0 with agreement >= peer's",
                              ratio <= 1.0 and ours["agreement"] >= peer["agreement"]))
        goals.append(goal("lite0 torchslim artifact vs fp32 ONNX, raw file (x smaller)", ours["size_reduction"],
                          ">= 3.8", ours["size_reduction"] >= 3.8))
        goals.append(goal("lite0 torchslim artifact vs fp32 ONNX, deflated as shipped (x smaller)",
                          ours.get("size_reduction_deflate", 0.0), ">= 3.8",
                          ours.get("size_reduction_deflate", 0.0) >= 3.8))
        ptq = ours["notes"].get("ptq_seconds", ours["prep_s"])
        goals.append(goal(f"lite0 torchslim PTQ time, calibration + quantization of 256 crops (s; the step with its "
                          f"ONNX export: {ours['prep_s']})", ptq, "<= 30", ptq <= 30))
    ours, base = find.get(("resnet18", "torchslim int8-static")), find.get(("resnet18", "fp32 eager"))
    if ours and base:
        drop = round((base["accuracy"] - ours["accuracy"]) * 100, 3)
        goals.append(goal(f"resnet18 (digits) torchslim int8-static, no float layer: accuracy drop (points; "
                          f"{ours['accuracy']:.4f} vs fp32 {base['accuracy']:.4f} on {ours['eval_samples']} digits)",
                          drop, "<= 0.3", drop <= 0.3))
    mixed = find.get(("lite0", f"torchslim int8-static max_drop {MAX_DROP}"))
    if mixed:
        goals.append(goal(f"lite0 torchslim max_drop {MAX_DROP}: top-1 agreement on {mixed['eval_samples']} crops",
                          mixed["agreement"], f">= {1 - MAX_DROP} on >= {min_crops} crops",
                          mixed["agreement"] >= 1 - MAX_DROP and mixed["eval_samples"] >= min_crops))
        goals.append(goal(f"lite0 torchslim max_drop {MAX_DROP}: speed-up vs fp32 eager at batch 16 (x)",
                          mixed["speedup_batch"], ">= 10", mixed["speedup_batch"] >= 10))
    ours = find.get(("minilm", "torchslim int8-dynamic"))
    if ours:
        goals.append(goal("minilm torchslim speed-up vs fp32 eager at batch 32, seq 64 (x)", ours["speedup_batch"],
                          ">= 2.5", ours["speedup_batch"] >= 2.5))
        goals.append(goal("minilm torchslim mean cosine", ours["cosine_mean"], ">= 0.99", ours["cosine_mean"] >= 0.99))
        goals.append(goal("minilm torchslim artifact vs fp32 ONNX (x smaller)", ours["size_reduction"], ">= 3.8",
                          ours["size_reduction"] >= 3.8))
    auto = next((r for r in rows if r["model"] == "minilm" and r["row"].startswith("torchslim auto")
                 and "error" not in r), None)
    if auto:
        goals.append(goal(f"minilm {auto['row']} speed-up vs fp32 eager at batch 32, seq 64 (x; cosine "
                          f"{auto['cosine_mean']})", auto["speedup_batch"], ">= 2.5 at cosine >= 0.99",
                          auto["speedup_batch"] >= 2.5 and auto["cosine_mean"] >= 0.99))
        goals.append(goal(f"minilm {auto['row']} speed-up vs fp32 eager at batch 1 (x)", auto["speedup_bs1"],
                          ">= 2", auto["speedup_bs1"] >= 2))
        for peer_name in ("torchao int8-dyn+compile", "torch.ao quantize_dynamic"):
            peer = find.get(("minilm", peer_name))
            if peer:
                ratio = round(peer["latency_ms_batch"] / auto["latency_ms_batch"], 3)
                goals.append(goal(f"minilm {auto['row']} vs {peer_name}, batch 32 (x faster)", ratio, "> 1.0",
                                  ratio > 1.0))
    return goals


def main() -> None:
    by_name = {build.__name__: build for build in ROWS}
    p = parser(__doc__.splitlines()[0], threads=0, seed=0)  # threads: of torch and every ONNX Runtime session
    p.add_argument("--eval-limit", type=int, default=0, metavar="N",
                   help="score at most N test samples per model, of Lite0's 640 crops and MiniLM's sentences (0: all)")
    deprecated_alias(p, "--crops", "--eval-limit", type=int)
    p.add_argument("--models", type=comma_list(("lite0", "minilm", "resnet18"), "model"),
                   default=["lite0", "minilm", "resnet18"], metavar="A,B",
                   help="comma-separated: lite0, minilm, resnet18 (the digits-trained ResNet-18; default all)")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 eval samples, few repeats")
    p.add_argument("--rows", type=comma_list(list(by_name), "row"), default=[], metavar="A,B",
                   help="comma-separated row functions to run (fp32_eager, the reference, always runs), e.g. "
                        "torchslim_pipeline,torchslim_equalize; default: all")
    args = p.parse_args()
    models = args.models
    only = tuple(by_name[r] for r in args.rows) or ROWS
    limit = args.eval_limit or (64 if args.quick else 0)
    repeats = 3 if args.quick else 10
    threads = set_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log(f"threads {threads}, int8 CPU features {int8_features() or 'none'}, VNNI {has_vnni()}")
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="torchslim-quant-bench-") as scratch:
        for key in models:
            workload = {"lite0": lite0_workload, "minilm": minilm_workload,
                        "resnet18": resnet18_workload}[key](limit)
            rows += run_workload(workload, Path(scratch), threads, repeats, log, only, args.seed)
            del workload
    print(f"\nthreads {threads}; CPU int8 features {', '.join(int8_features()) or 'none'} (VNNI: {has_vnni()}); "
          f"torch {torch.__version__}; {'quick' if args.quick else 'full'} run, {repeats} batched repeats "
          f"(median); {time.perf_counter() - started:.0f} s")
    print_table(rows)
    for r in rows:
        if r.get("notes"):
            print(f"  {r['model']} {r['row']}: " + "; ".join(f"{k}={v}" for k, v in r["notes"].items()))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"FAILED {r['model']} {r['row']}: {r['error']}")
    # Goals that compare rows with each other (the peer, the fp32 ONNX file) appear when both rows ran.
    goals = goals_for(rows)
    notes = {f"{r['model']} {r['row']}": r["notes"] for r in rows if r.get("notes")}
    write_results(args, [{k: v for k, v in r.items() if k != "notes"} for r in rows], goals,
                  {"notes": notes, "vnni": has_vnni()}, threads=threads)


if __name__ == "__main__":
    main()
