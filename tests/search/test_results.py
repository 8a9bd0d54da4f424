"""The search's post-search re-measurement rebuilds a front point from its artifact on the runtime its trial
measured."""

from __future__ import annotations

import torch


def test_a_bf16_point_is_rebuilt_on_its_runtime_for_remeasuring(tmp_path):
    from types import SimpleNamespace

    import torchslim
    from torchslim.quant.bf16 import CompiledTorchDeployable
    from torchslim.runtime import TorchDeployable
    from torchslim.search.results import _reload

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(5, 16)
    result = torchslim.apply(model, torchslim.Bf16Config(runtime="torch"), example_inputs=x)
    artifact = result.save(tmp_path / "trial")
    runner = SimpleNamespace(pristine=model, teacher=model, threads=1)
    steps = [{"quantize": {"method": "bf16"}}]
    with torch.no_grad():
        expected = result.model(x)
    for runtime, kind in (("torchinductor", CompiledTorchDeployable), ("torch", TorchDeployable)):
        rebuilt = _reload(runner, {"artifact": str(artifact), "recipe": {"steps": steps}, "runtime": runtime})
        assert type(rebuilt) is kind and rebuilt.module[0].weight.dtype == torch.bfloat16
        error = float((rebuilt(x) - expected).norm() / expected.norm())
        assert error < 0.02 if kind is CompiledTorchDeployable else error == 0.0
    other = [{"quantize": {"method": "int8-weight"}}]  # not rebuilt from its file alone: keeps the trial's figures
    assert _reload(runner, {"artifact": str(artifact), "recipe": {"steps": other}}) is None
