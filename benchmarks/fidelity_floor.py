"""How much of an int8 model's top-1 agreement the evaluation set itself allows:
`python benchmarks/fidelity_floor.py [--json PATH] [--eval-limit N] [--threads N]`.

EfficientNet-Lite0 on the 640 evaluation crops of builtin:images (the set `quantization.py` scores agreement on).
Each row perturbs the fp32 model or its input by one source of int8 error only, simulated in PyTorch (BatchNorms
folded first, as every int8 runtime does), and reports the top-1 agreement with the unperturbed fp32 model, on all
crops and on the confident ones (fp32's top-1 probability ahead of its top-2 by more than 0.1):

- ``input noise``: uniform noise of +-half a grey level (1/255 of the pixel range) on every input value, the
  rounding a camera pipeline's 8-bit output already carries: what the model does with perturbations smaller than
  any quantizer's;
- ``input rounded to 8 bits``: the first layer's input quantized to 256 levels by the calibrated min-max range,
  with the crops resized off the 8-bit grid (``pixel_grid=False``, torchslim's preprocessing before 2026-12-07)
  and on it (the default now);
- ``weights int8 (nearest)``: every Conv/Linear weight rounded per output channel on [-127, 127];
- ``activations uint8 (min-max)``: every Conv/Linear input rounded per tensor to 256 levels on the calibration
  crops' min-max range;
- ``weights and activations``: both, as a plain int8 runtime computes (no learned rounding, no bias correction).

A goal stated as top-1 agreement is only reachable where the input-noise row leaves room for it.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, write_results  # noqa: E402

from torchslim.data import resolve_data  # noqa: E402
from torchslim.measure import set_threads  # noqa: E402
from torchslim.measure.metrics import CONFIDENT_MARGIN, confident_agreement, top1_agreement  # noqa: E402
from torchslim.quant.adaround import WeightGrid  # noqa: E402
from torchslim.quant.fold import fold_batchnorms  # noqa: E402
from torchslim.quant.observers import make_observer  # noqa: E402
from torchslim.quant.qmath import QScheme, fake_quantize  # noqa: E402
from torchslim.zoo import resolve_model  # noqa: E402

ACTIVATIONS = QScheme(bits=8, signed=False, symmetric=False)


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def input_ranges(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple]:
    """Each Conv/Linear's input range on ``batches`` (min-max observer, per tensor)."""
    observers = {name: make_observer("minmax", ACTIVATIONS) for name in layers(model)}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=name: observers[n].observe(args[0]))
             for name, m in layers(model).items()]
    with torch.inference_mode():
        for batch in batches:
            model(batch)
    for hook in hooks:
        hook.remove()
    return {name: observer.qparams() for name, observer in observers.items()}


def quantize_inputs(model: nn.Module, qparams: dict[str, tuple]) -> nn.Module:
    """A copy of ``model`` whose listed layers read their input rounded to uint8 on the given qparams."""
    model = copy.deepcopy(model)
    modules = layers(model)
    for name, (scale, zero_point) in qparams.items():
        modules[name].register_forward_pre_hook(
            lambda m, args, s=scale, z=zero_point: (fake_quantize(args[0], s, z, ACTIVATIONS),) + args[1:])
    return model


def round_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Conv/Linear weight rounded to nearest on ONNX Runtime's per-channel grid,
    [-127, 127] (`WeightGrid`, the grid torchslim's int8-static writes for it)."""
    model = copy.deepcopy(model)
    grid = WeightGrid()
    with torch.no_grad():
        for m in layers(model).values():
            scale = grid.scale(m.weight)
            m.weight.copy_(grid.codes(m.weight, scale) * scale.reshape(-1, *[1] * (m.weight.dim() - 1)))
    return model


def outputs(model: nn.Module, batches: list[torch.Tensor], perturb: Callable | None = None) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(perturb(b) if perturb else b) for b in batches])


def main() -> None:
    p = parser(__doc__.splitlines()[0], threads=0, seed=0)
    p.add_argument("--eval-limit", type=int, default=0, metavar="N", help="score at most N of the 640 crops")
    args = p.parse_args()
    threads = set_threads(args.threads)
    started = time.perf_counter()
    bundle, data = resolve_model("builtin:efficientnet-lite0"), resolve_data("builtin:images")
    model = bundle.model.eval()
    limit = args.eval_limit
    off_grid = bundle.preprocess.__class__(**{**vars(bundle.preprocess), "pixel_grid": False})
    rows = []
    for grid, preprocess in (("on the 8-bit grid", bundle.preprocess), ("off the grid", off_grid)):
        crops = [x for x, _ in data.batches("test", preprocess, 32, limit=limit)]
        calib = [x for x, _ in data.batches("calib", preprocess, 32, limit=256)]
        folded = copy.deepcopy(model)
        fold_batchnorms(folded, crops[0][:1])
        reference = outputs(folded, crops)
        fragile = float((reference.softmax(-1).topk(2).values.diff(dim=-1).abs() < 0.05).float().mean())
        ranges = input_ranges(folded, calib)
        first = next(iter(layers(folded)))
        generator = torch.Generator().manual_seed(args.seed)
        # uniform on [-0.5, 0.5] grey levels (a level is 1/255 of the pixel range), in normalised units
        noise = lambda x: x + (torch.rand(x.shape, generator=generator) - 0.5) / 255 / torch.tensor(  # noqa: E731
            preprocess.std).view(1, -1, 1, 1)
        cases = {"input noise +-half a grey level": lambda: outputs(folded, crops, noise),
                 "input rounded to 8 bits (first layer)": lambda: outputs(
                     quantize_inputs(folded, {first: ranges[first]}), crops)}
        if grid == "on the 8-bit grid":
            cases.update({
                "weights int8 (nearest, per channel)": lambda: outputs(round_weights(folded), crops),
                "activations uint8 (min-max, per tensor)": lambda: outputs(quantize_inputs(folded, ranges), crops),
                "weights and activations": lambda: outputs(quantize_inputs(round_weights(folded), ranges), crops)})
        for name, run in cases.items():
            out = run()
            confident, count = confident_agreement(out, reference, CONFIDENT_MARGIN)
            rows.append({"crops": grid, "row": name, "agreement": round(top1_agreement(out, reference), 4),
                         "confident_agreement": round(confident, 4), "confident_samples": count,
                         "eval_samples": int(reference.shape[0]), "fragile_fraction": round(fragile, 4)})
            print(f"{grid:18s} {name:42s} agreement {rows[-1]['agreement']:.4f}  confident "
                  f"{rows[-1]['confident_agreement']:.4f} ({count} crops)  top-1/top-2 within 0.05: {fragile:.3f}",
                  flush=True)
    print(f"threads {threads}; {time.perf_counter() - started:.0f} s")
    write_results(args, rows, [], {"confident_margin": CONFIDENT_MARGIN}, threads=threads)


if __name__ == "__main__":
    main()
