"""Optimisers and schedules are torch.optim's, with torchslim's parameter groups."""

import math

import pytest
import torch
from torch import nn

from torchslim._config import FieldError, from_dict
from torchslim.recover.optim import OptimizerConfig, ScheduleConfig, make_optimizer, make_scheduler, optimizer_names


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_every_torch_optimizer_is_available_by_name():
    names = optimizer_names()
    assert {"sgd", "adamw", "adam", "rmsprop", "nadam", "radam", "adagrad"} <= set(names)
    assert names["adamw"] is torch.optim.AdamW
    opt = make_optimizer(_model(), OptimizerConfig(name="RMSprop", lr=0.01, momentum=0.5))
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["momentum"] == 0.5
    with pytest.raises(FieldError, match="unknown optimiser 'lamb'"):
        OptimizerConfig(name="lamb")
    with pytest.raises(FieldError, match="options.betaz: not an argument of torch.optim.AdamW"):
        OptimizerConfig(name="adamw", options={"betaz": [0.9, 0.99]})


def test_norms_and_biases_get_no_weight_decay_and_groups_scale_lr():
    model = _model()
    config = from_dict(OptimizerConfig, {"name": "adamw", "lr": 0.001, "weight_decay": 0.05,
                                         "groups": [{"pattern": "2.*", "lr_scale": 10.0}],
                                         "options": {"betas": [0.9, 0.98]}})
    opt = make_optimizer(model, config)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model[0].weight)]["weight_decay"] == 0.05
    assert by_id[id(model[0].bias)]["weight_decay"] == 0.0
    assert by_id[id(model[1].weight)]["weight_decay"] == 0.0  # LayerNorm scale
    assert by_id[id(model[2].weight)]["lr"] == pytest.approx(0.01)
    assert by_id[id(model[0].weight)]["lr"] == pytest.approx(0.001)
    assert tuple(opt.defaults["betas"]) == (0.9, 0.98)
    assert sum(len(g["params"]) for g in opt.param_groups) == 6


def _lrs(config: ScheduleConfig, total: int, steps_per_epoch: int = 1, lr: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    sched = make_scheduler(opt, config, total, steps_per_epoch)
    values = []
    for _ in range(total):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return values


def test_warmup_then_cosine():
    lrs = _lrs(ScheduleConfig(name="cosine", warmup_fraction=0.1), 100)
    assert lrs[0] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1.0, rel=1e-6) and lrs.index(max(lrs)) == 10
    assert lrs[10 + 45] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)), rel=1e-6)
    assert lrs[-1] < 0.01
    floor = _lrs(ScheduleConfig(name="cosine", min_lr_ratio=0.1), 50)
    assert min(floor) >= 0.1 - 1e-9


def test_onecycle_and_step_schedules():
    lrs = _lrs(ScheduleConfig(name="onecycle", warmup_fraction=0.25), 100)
    assert lrs.index(max(lrs)) in (24, 25) and max(lrs) == pytest.approx(1.0, rel=1e-3)
    assert lrs[0] < 0.05 and lrs[-1] < 1e-3
    steps = _lrs(ScheduleConfig(name="step", step_epochs=2, gamma=0.5), 60, steps_per_epoch=10)
    assert steps[19] == pytest.approx(1.0) and steps[20] == pytest.approx(0.5) and steps[40] == pytest.approx(0.25)
    assert set(_lrs(ScheduleConfig(name="constant"), 10)) == {1.0}
