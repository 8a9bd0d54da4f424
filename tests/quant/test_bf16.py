"""bfloat16 models: outputs stay float32 and close to the float model's, skipped layers stay float32, tied
weights stay tied, and the saved artifact reloads through torchslim.load to the same outputs."""

from __future__ import annotations

import torch
from torch import nn

import torchslim
from torchslim.quant.bf16 import Bf16Config, to_bf16_


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.mix = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 50, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(self.norm(torch.relu(self.mix(self.embed(ids)))))


def test_bf16_conv_net_keeps_float32_outputs_and_the_skipped_head():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        reference = model(x)
    details = to_bf16_(model, Bf16Config(skip=["head"]))
    assert model.conv.weight.dtype == torch.bfloat16 and model.bn.running_var.dtype == torch.bfloat16
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.head.weight.dtype == torch.float32 and details["float32_layers"] == ["head"]
    assert details["bf16_tensors"] == 6  # conv weight+bias, bn weight, bias, running mean, running var
    with torch.no_grad():
        output = model(x)
    assert output.dtype == torch.float32
    error = (output - reference).norm() / reference.norm()
    assert 0 < float(error) < 0.02  # bfloat16 keeps about 3 significant digits


def test_tied_weights_stay_one_tensor_and_integer_inputs_pass_through():
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        reference = model(ids)
    details = to_bf16_(model)
    assert model.out.weight is model.embed.weight and model.out.weight.dtype == torch.bfloat16
    assert details["bf16_tensors"] == 5  # embedding (= head), mix weight+bias, norm weight+bias
    with torch.no_grad():
        output = model(ids)
    cosine = torch.nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0)
    assert output.dtype == torch.float32 and float(cosine) > 0.999


def test_bf16_artifact_reloads_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 12, 12)
    result = torchslim.apply(model, torchslim.Bf16Config(), example_inputs=x)
    result.save(tmp_path / "bf16")
    with torch.no_grad():
        expected = result.model(x)
    weights = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    loaded = torchslim.load(tmp_path / "bf16", ConvNet())
    assert loaded.conv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    # bfloat16 halves the stored weights (16x3x3x3 + 16 + 4 x 16 + 16x5 + 5 floats, 2 bytes each, plus header)
    assert weights < 4 * (16 * 27 + 16 + 4 * 16 + 16 * 5 + 5)


def _fixed_timing(figures_ms: dict[str, float]):
    """`time_candidates` replaced by fixed latencies per runtime name."""
    def timed(deployables, batch, prefer="balanced", rounds=5):
        return {name: {"latency_ms_bs1": figures_ms[name], "latency_ms_batch": 8 * figures_ms[name],
                       "score": figures_ms[name]} for name in deployables}
    return timed


def test_compiled_runtime_computes_what_eager_computes_and_reloads(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    model = ConvNet().eval()
    eager = torchslim.apply(model, torchslim.Bf16Config(runtime="torch"), example_inputs=x)
    compiled = torchslim.apply(model, torchslim.Bf16Config(runtime="torchinductor"), example_inputs=x)
    assert eager.runtime == "torch" and eager.details["runtime_choice"] == "torch"
    assert compiled.runtime == "torchinductor" and compiled.details["runtime_choice"] == "torchinductor"
    with torch.no_grad():
        reference = eager.model(x)
        output = compiled(x)
    assert output.dtype == torch.float32
    error = float((output - reference).norm() / reference.norm())
    assert error < 0.02 and compiled.details["relative_error"]["torchinductor"] < 0.02
    path = compiled.save(tmp_path / "compiled")  # the artifact is the bfloat16 weights, as for eager
    loaded = torchslim.load(tmp_path / "compiled", ConvNet())
    with torch.no_grad():
        assert torch.equal(loaded(x), reference)
    # reloaded as deployed (compiled again), the outputs are the compiled model's, bit for bit
    assert torch.equal(torch.as_tensor(compiled.deployable.deployable.load_and_run(path, x)), output)


def test_auto_runtime_keeps_the_faster_and_reports_both(monkeypatch):
    from torchslim.quant import choose

    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    monkeypatch.setattr(choose, "time_candidates", _fixed_timing({"torch": 3.0, "torchinductor": 1.0}))
    fast = torchslim.apply(ConvNet().eval(), torchslim.Bf16Config(), example_inputs=x)
    assert fast.runtime == "torchinductor" and fast.details["runtime_choice"].startswith("torchinductor: fastest")
    assert fast.details["candidates"]["torch"]["latency_ms_bs1"] == 3.0
    monkeypatch.setattr(choose, "time_candidates", _fixed_timing({"torch": 1.0, "torchinductor": 3.0}))
    slow = torchslim.apply(ConvNet().eval(), torchslim.Bf16Config(prefer="bs1"), example_inputs=x)
    assert slow.runtime == "torch" and slow.details["runtime_choice"] == "torch: fastest by batch-1 latency"


def test_without_a_compiler_auto_stays_eager_and_torchinductor_is_refused(monkeypatch):
    import pytest

    from torchslim.errors import InputError
    import torchslim.runtime

    monkeypatch.setattr(torchslim.runtime.shutil, "which", lambda name: None)
    x = torch.randn(2, 3, 12, 12)
    result = torchslim.apply(ConvNet().eval(), torchslim.Bf16Config(), example_inputs=x)
    assert result.runtime == "torch" and "needs a C++ compiler" in result.details["runtime_choice"]
    with pytest.raises(InputError, match="runtime: torchinductor: torch.compile needs a C"):
        torchslim.apply(ConvNet().eval(), torchslim.Bf16Config(runtime="torchinductor"), example_inputs=x)


def test_bad_runtime_names_the_field():
    import pytest

    from torchslim._config import FieldError

    with pytest.raises(FieldError, match="runtime"):
        torchslim.Bf16Config(runtime="tensorrt")


def test_auto_keeps_eager_when_the_compiled_model_is_less_faithful(monkeypatch):
    from torchslim.quant import bf16, choose

    monkeypatch.setattr(choose, "time_candidates", _fixed_timing({"torch": 3.0, "torchinductor": 1.0}))
    original = bf16.CompiledTorchDeployable.__call__
    monkeypatch.setattr(bf16.CompiledTorchDeployable, "__call__", lambda self, inputs: original(self, inputs) * 1.1)
    result = torchslim.apply(ConvNet().eval(), torchslim.Bf16Config(), example_inputs=torch.randn(2, 3, 12, 12))
    errors = result.details["relative_error"]
    assert errors["torchinductor"] > 1.5 * errors["torch"] + 0.005 and 0.09 < errors["torchinductor"] < 0.11
    assert result.runtime == "torch" and result.details["runtime_choice"].startswith("torch (compiled: relative")


def test_every_compiled_model_in_a_process_is_really_compiled():
    # torch.compile counts recompilations per code object, 8 at most: compiling modules directly, the ninth model
    # of a search would have run eagerly without a word. Each deployable has a compile cache of its own.
    from torch._dynamo.utils import counters

    from torchslim.quant.bf16 import CompiledTorchDeployable

    x = torch.randn(3, 16)
    graphs = []
    for _ in range(10):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        to_bf16_(model)
        before = counters["stats"]["unique_graphs"]
        CompiledTorchDeployable(model)(x)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1] * 10
