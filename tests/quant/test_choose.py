"""quantize: {method: auto}: every candidate is built, scored and timed; the fastest within max_drop is kept,
float when none is; a chosen bf16 model reloads; bad configs fail on one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim
from torchslim._config import FieldError
from torchslim.quant import choose
from torchslim.quant.choose import AutoPrecisionConfig


class Mlp(nn.Module):
    def __init__(self, tie: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)
        if tie:  # ten almost equal logits: any rounding flips the top-1 class of many samples
            with torch.no_grad():
                self.fc2.weight.copy_(self.fc2.weight[:1].repeat(10, 1) + 1e-5 * torch.randn(10, 64))
                self.fc2.bias.zero_()

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _batches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 32, generator=generator) for _ in range(4)]


def _fake_timing(speeds: dict[str, float]):
    """time_candidates replaced by fixed figures per runtime ("torch-bf16" for a bfloat16 model, eager or
    compiled)."""
    def timed(deployables, batch, prefer="balanced", rounds=5):
        figures = {}
        for name, deployable in deployables.items():
            key = deployable.runtime  # (the bf16 step's own eager-vs-compiled choice sees equal figures)
            if key in ("torch", "torchinductor") and next(deployable.module.parameters()).dtype == torch.bfloat16:
                key = "torch-bf16"
            figures[name] = {"latency_ms_bs1": speeds[key], "latency_ms_batch": speeds[key] * 10,
                             "score": speeds[key]}
        return figures
    return timed


def test_the_fastest_candidate_within_the_drop_is_kept_and_every_candidate_is_reported(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(choose, "time_candidates", _fake_timing({"torch": 4.0, "onnxruntime": 2.0, "torch-bf16": 1.0}))
    config = AutoPrecisionConfig(candidates=["int8-dynamic", "bf16"], max_drop=0.5)
    result = torchslim.apply(Mlp().eval(), config, _batches())
    details = result.details
    figures = details["candidates"]
    assert set(figures) == {"float", "int8-dynamic", "bf16"}
    assert figures["float"]["drop"] == 0.0 and details["metric"] == "agreement" and details["samples"] == 64
    for name in ("int8-dynamic", "bf16"):
        assert 0.0 <= figures[name]["drop"] <= 0.5 and figures[name]["agreement"] >= 0.5
    assert details["choice"].startswith("bf16: fastest")
    assert result.model.fc1.weight.dtype == torch.bfloat16
    x = _batches(1)[0]
    with torch.no_grad():
        assert result.model(x).dtype == torch.float32


def test_a_candidate_over_the_drop_is_not_kept_even_when_fastest(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(choose, "time_candidates", _fake_timing({"torch": 4.0, "onnxruntime": 2.0, "torch-bf16": 1.0}))
    model = Mlp(tie=True).eval()
    reference = [model(x) for x in _batches()]
    config = AutoPrecisionConfig(candidates=["int8-dynamic", "bf16"], max_drop=0.0)
    result = torchslim.apply(model, config, _batches())
    figures = result.details["candidates"]
    assert figures["bf16"]["drop"] > 0.0 and figures["int8-dynamic"]["drop"] > 0.0  # near-tied logits flip
    assert result.details["choice"].startswith("float: no candidate within the drop")
    with torch.no_grad():
        for x, expected in zip(_batches(), reference):
            assert torch.equal(result.model(x), expected)  # the model is untouched


def test_a_candidate_slower_than_float_is_not_kept(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(choose, "time_candidates", _fake_timing({"torch": 1.0, "torch-bf16": 3.0}))
    result = torchslim.apply(Mlp().eval(), AutoPrecisionConfig(candidates=["bf16"], max_drop=0.5), _batches())
    assert result.details["choice"] == "float: no candidate within the drop is faster than float (max_drop 0.5)"
    assert result.model.fc1.weight.dtype == torch.float32


def test_a_chosen_bf16_model_is_recorded_and_reloads(monkeypatch, tmp_path):
    torch.manual_seed(0)
    monkeypatch.setattr(choose, "time_candidates", _fake_timing({"torch": 4.0, "torch-bf16": 1.0}))
    result = torchslim.apply(Mlp().eval(), AutoPrecisionConfig(candidates=["bf16"], max_drop=0.5), _batches())
    result.save(tmp_path / "auto")
    loaded = torchslim.load(tmp_path / "auto", Mlp())
    x = _batches(2)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert loaded.fc1.weight.dtype == torch.bfloat16


def test_alternating_timing_measures_every_candidate_the_same_number_of_times():
    calls = {"a": 0, "b": 0}

    def runner(name):
        def run(inputs):
            calls[name] += 1
        return run

    figures = choose.time_candidates({"a": runner("a"), "b": runner("b")}, torch.zeros(8, 3), "batch", rounds=4)
    assert calls == {"a": 2 + 4 * 4, "b": 2 + 4 * 4}  # 2 untimed first calls, then 3 at batch 1 + 1 batched a round
    assert set(figures) == {"a", "b"} and all(f["score"] == f["latency_ms_batch"] for f in figures.values())


def test_measured_timing_gives_positive_latencies_for_every_candidate():
    torch.manual_seed(0)
    result = torchslim.apply(Mlp().eval(), AutoPrecisionConfig(candidates=["int8-dynamic", "bf16"], max_drop=0.5),
                             _batches())
    for name, figures in result.details["candidates"].items():
        assert figures["latency_ms_bs1"] > 0 and figures["latency_ms_batch"] > 0 and figures["score"] > 0, name


@pytest.mark.parametrize("raw, field", [
    ({"candidates": ["qat"]}, "candidates[0]"),
    ({"candidates": ["bf16", "bf16"]}, "candidates"),
    ({"max_drop": 1.5}, "max_drop"),
    ({"settings": {"int4-weight": {}}}, "settings.int4-weight"),
    ({"settings": {"int8-static": {"smooth": True}}}, "settings.int8-static.smooth"),
])
def test_bad_configs_name_the_field(raw, field):
    from torchslim._config import from_dict

    with pytest.raises(FieldError) as error:
        from_dict(AutoPrecisionConfig, raw)
    assert error.value.field == field
