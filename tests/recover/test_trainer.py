"""The trainer: resume equivalence, corrupted checkpoints, accumulation, early stopping, precision, DDP parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from torchslim._config import FieldError
from torchslim.recover.checkpoint import (CheckpointError, flatten_optimizer, read_checkpoint, unflatten_optimizer,
                                          write_checkpoint)
from torchslim.recover.optim import OptimizerConfig, ScheduleConfig
from torchslim.recover.trainer import EarlyStopConfig, SplitDataset, TrainConfig, Trainer

_DIGITS = load_digits()
X = (_DIGITS.data / 16.0).astype(np.float32)
Y = _DIGITS.target.astype(np.int64)


def _collate(items):
    return torch.from_numpy(np.stack([x for x, _ in items])), torch.tensor([y for _, y in items])


def _mlp(dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 10))


def _loss(outputs, inputs, labels):
    return {"cross_entropy": F.cross_entropy(outputs, labels)}


def _trainer(model, config, **kwargs):
    return Trainer(model, _loss, SplitDataset(list(X[:600]), Y[:600]), _collate, config, progress=False,
                   fingerprint="test-run", **kwargs)


def _config(**overrides):
    base = dict(epochs=3, batch_size=32, device="cpu",
                optimizer=OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.01),
                schedule=ScheduleConfig(name="cosine", warmup_fraction=0.1))
    base.update(overrides)
    return TrainConfig(**base)


def _validate(model, device):
    with torch.no_grad():
        return float((model(torch.from_numpy(X[600:900])).argmax(1).numpy() == Y[600:900]).mean())


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    reference = _mlp()
    _trainer(reference, _config(checkpoint_every=5)).fit()

    class Killed(Exception):
        pass

    steps = {"n": 0}

    def kill_at_step_43():  # mid-epoch 2 (19 steps an epoch), 3 steps after the last checkpoint
        steps["n"] += 1
        if steps["n"] == 43:
            raise Killed

    model = _mlp()
    with pytest.raises(Killed):
        _trainer(model, _config(checkpoint_every=5), checkpoint_dir=tmp_path, after_step=kill_at_step_43).fit()
    state = json.loads((tmp_path / "latest" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (2, 40)

    resumed = _mlp()  # a fresh process: fresh weights, then the checkpoint
    result = _trainer(resumed, _config(checkpoint_every=5), checkpoint_dir=tmp_path).fit()
    assert result.resumed_from == {"epoch": 2, "step": 40}
    assert result.steps == 57
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_corrupted_or_foreign_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    model = _mlp()
    _trainer(model, _config(epochs=1), checkpoint_dir=tmp_path).fit()
    with pytest.raises(CheckpointError, match="different run"):
        Trainer(_mlp(), _loss, SplitDataset(list(X[:600]), Y[:600]), _collate, _config(epochs=1),
                checkpoint_dir=tmp_path, fingerprint="another-run", progress=False).fit()
    weights = tmp_path / "latest" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: checkpoint file is corrupted"):
        _trainer(_mlp(), _config(epochs=1), checkpoint_dir=tmp_path).fit()
    (tmp_path / "latest" / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        _trainer(_mlp(), _config(epochs=1), checkpoint_dir=tmp_path).fit()


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    _trainer(_mlp(), _config(epochs=1), checkpoint_dir=tmp_path).fit()
    wider = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.2), nn.Linear(48, 10))
    with pytest.raises(CheckpointError, match="does not match this model"):
        _trainer(wider, _config(epochs=1), checkpoint_dir=tmp_path).fit()


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    model = _mlp(0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    tensors, rest = flatten_optimizer(opt.state_dict())
    write_checkpoint(tmp_path, {"optimizer": tensors}, {"fingerprint": "f", "optimizer": rest})
    loaded, state = read_checkpoint(tmp_path, "f")
    restored = torch.optim.AdamW(_mlp(0.0).parameters(), lr=1.0)
    restored.load_state_dict(unflatten_optimizer(loaded["optimizer"], state["optimizer"]))
    assert restored.param_groups[0]["betas"] == (0.8, 0.95) and restored.param_groups[0]["lr"] == 1e-3
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(value, restored.state_dict()["state"][0][key])


def test_gradient_accumulation_equals_the_larger_batch():
    config = dict(epochs=2, device="cpu", optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9,
                                                                     weight_decay=0.0))
    big, small = _mlp(0.0), _mlp(0.0)
    _trainer(big, TrainConfig(batch_size=40, **config)).fit()
    _trainer(small, TrainConfig(batch_size=20, accumulate=2, **config)).fit()
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_dropout_override_trains_like_a_model_without_dropout_and_is_undone():
    config = dict(epochs=2, device="cpu", batch_size=32, optimizer=OptimizerConfig(name="sgd", lr=0.05,
                                                                                   weight_decay=0.0))
    noisy, reference, kept = _mlp(0.5), _mlp(0.0), _mlp(0.5)
    result = _trainer(noisy, TrainConfig(dropout=0.0, **config)).fit()
    _trainer(reference, TrainConfig(**config)).fit()
    _trainer(kept, TrainConfig(**config)).fit()
    assert result.dropout == {"p": 0.0, "modules": 1} and result.details()["dropout"]["modules"] == 1
    assert noisy[2].p == 0.5  # the model's own probability is back
    gap = max(float((a - b).abs().max()) for a, b in zip(noisy.parameters(), reference.parameters()))
    kept_gap = max(float((a - b).abs().max()) for a, b in zip(kept.parameters(), reference.parameters()))
    assert gap == 0.0 and kept_gap > 1e-3  # dropout 0.5 left alone trains to other weights
    with pytest.raises(FieldError, match="dropout"):
        TrainConfig(dropout=1.0)


def test_early_stopping_keeps_the_best_epoch():
    model = _mlp()
    # A learning rate that diverges after the first epochs: validation stops improving.
    config = _config(epochs=12, optimizer=OptimizerConfig(name="sgd", lr=3.0, momentum=0.9, weight_decay=0.0),
                     schedule=ScheduleConfig(name="constant"), early_stop=EarlyStopConfig(patience=2))
    result = _trainer(model, config, validate=_validate).fit()
    assert result.stopped_early and len(result.history) < 12
    assert len(result.val_history) == len(result.history)
    best = max(result.val_history)
    assert result.best_epoch == max(i + 1 for i, v in enumerate(result.val_history) if v == best)  # ties: later
    assert _validate(model, "cpu") == pytest.approx(max(result.val_history))


def test_bf16_autocast_on_cpu_trains_like_fp32():
    config = dict(epochs=6, optimizer=OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.0))
    fp32 = _trainer(_mlp(0.0), _config(precision="fp32", **config), validate=_validate).fit()
    bf16 = _trainer(_mlp(0.0), _config(precision="bf16", **config), validate=_validate).fit()
    assert bf16.history[-1]["total"] < 0.3 * bf16.history[0]["total"]
    assert bf16.history[-1]["total"] == pytest.approx(fp32.history[-1]["total"], rel=0.2)
    assert bf16.val_history[-1] > 0.8 and abs(bf16.val_history[-1] - fp32.val_history[-1]) < 0.03


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _mlp(0.0)
    result = _trainer(model, _config(epochs=2, batch_size=32), validate=_validate).fit()
    if rank == 0:
        torch.save({"state": model.state_dict(), "loss": result.history[-1]["total"], "val": result.val_history},
                   out)
    dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    single = _mlp(0.0)
    torch.set_num_threads(1)
    expected = _trainer(single, _config(epochs=2, batch_size=32), validate=_validate).fit()
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    # 600 samples split evenly: every global batch of 32 is the same 32 samples in both runs.
    for name, value in single.state_dict().items():
        assert torch.allclose(value, got["state"][name], atol=1e-5), name
    assert got["loss"] == pytest.approx(expected.history[-1]["total"], rel=1e-5)
    assert got["val"] == pytest.approx(expected.val_history, abs=1e-9)


def test_checkpoints_store_tied_tensors_and_read_them_back(tmp_path):
    shared = torch.arange(6.0).reshape(2, 3)  # e.g. GPT-2's lm_head.weight is wte.weight
    write_checkpoint(tmp_path, {"model": {"wte.weight": shared, "lm_head.weight": shared, "b": torch.ones(2)}},
                     {"fingerprint": "f"})
    tensors, state = read_checkpoint(tmp_path, "f")
    assert torch.equal(tensors["model"]["wte.weight"], shared)
    assert torch.equal(tensors["model"]["lm_head.weight"], shared)
    assert state["fingerprint"] == "f"
