"""The finetune step: feature and attention distillation, bad layer names, and a killed CLI run resuming."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_bundle

from torchslim._context import _StepContext as StepContext
from torchslim.data import resolve_data
from torchslim.errors import InputError
from torchslim.pruning.channel import ChannelPruningConfig
from torchslim.recover.finetune import DistillConfig, FinetuneConfig, LossConfig, finetune
from torchslim.recover.optim import OptimizerConfig
from torchslim.registry import get_method

TESTS = Path(__file__).resolve().parents[1]


def _context(tmp_path) -> StepContext:
    bundle = tiny_bundle()
    return StepContext(model=bundle.model, teacher=copy.deepcopy(bundle.model).requires_grad_(False), bundle=bundle,
                       data=resolve_data("builtin:digits"), seed=0, threads=1, workdir=tmp_path, progress=False,
                       where="test: steps[1].finetune")


def test_feature_distillation_learns_a_projection_to_the_teachers_width(tmp_path):
    context = _context(tmp_path)
    get_method("prune", "channel").handler(context, ChannelPruningConfig(ratio=0.5))
    assert context.model.conv2.out_channels == 4 and context.teacher.conv2.out_channels == 8
    config = FinetuneConfig(epochs=3, batch_size=64, device="cpu", optimizer=OptimizerConfig(name="adamw", lr=3e-3),
                            loss=LossConfig(name="focal", gamma=1.0),
                            distill=DistillConfig(alpha=0.5, features=[["conv2", "conv2"]], feature_weight=5.0))
    details = finetune(context, config).details
    terms = details["loss_terms"]
    assert set(terms) == {"kd", "focal", "feature"}
    assert terms["feature"][-1] < 0.7 * terms["feature"][0]  # the projection and student learn the map
    assert details["train_loss"][-1] < details["train_loss"][0]
    assert len(details["val_metric"]) == 3 and 1 <= details["best_epoch"] <= 3
    assert not any(isinstance(m, torch.nn.Conv2d) and m.in_channels == 4 and m.out_channels == 8
                   for m in context.model.modules())  # the projection trained beside the student, not in it


def test_unknown_feature_layer_names_the_nearest(tmp_path):
    context = _context(tmp_path)
    config = FinetuneConfig(epochs=1, distill=DistillConfig(features=[["conv_2", "conv2"]]))
    with pytest.raises(InputError, match=r"features\[0\]\[0\] \(student\): no layer named 'conv_2'.*nearest: conv2"):
        finetune(context, config)
    config = FinetuneConfig(epochs=1, distill=DistillConfig(teacher="builtin:no-such-model"))
    with pytest.raises(InputError, match="distill.teacher"):
        finetune(context, config)
    config = FinetuneConfig(epochs=1, distill=DistillConfig(attention=True))
    with pytest.raises(InputError, match="attention distillation needs query/key/value"):
        finetune(context, config)


def test_attention_distillation_reads_minilms_last_layer():
    from torchslim.core.modules import call_model
    from torchslim.recover.features import TappedStudent, TappedTeacher, attention_heads, find_attention
    from torchslim.recover.losses import attention_distillation_loss
    from torchslim.zoo import resolve_model

    bundle = resolve_model("builtin:minilm")
    names = find_attention(bundle.model, "test")
    assert names["query"].endswith("layer.5.attention.self.query") and names["value"].endswith("self.value")
    assert attention_heads(bundle.model) == 12
    student_model = copy.deepcopy(bundle.model)
    teacher = TappedTeacher(bundle.model, [], names)
    student = TappedStudent(student_model, [], names, [])
    inputs = bundle.preprocess(["A short sentence.", "Another, somewhat longer sentence about pruning models."])
    with torch.no_grad():
        _, _, s_states = call_model(student, inputs)
        _, _, t_states = teacher(inputs)
        assert float(attention_distillation_loss(s_states, t_states, 12, inputs[1])) == pytest.approx(0, abs=1e-6)
        query = dict(student_model.named_modules())[names["query"]]
        query.weight.add_(0.05 * torch.randn_like(query.weight))
        _, _, s_states = call_model(student, inputs)
        assert float(attention_distillation_loss(s_states, t_states, 12, inputs[1])) > 1e-3


_RUNNER = textwrap.dedent("""
    import os
    import signal
    import sys
    sys.path.insert(0, {tests!r})
    import conftest  # registers builtin:tiny-test-cnn
    from torchslim.cli import main
    from torchslim.recover import checkpoint

    KILL_AT = {kill_at!r}
    if KILL_AT is not None:  # die by SIGKILL as training reaches this step: an event, not a moment on the clock
        write = checkpoint.write_checkpoint

        def write_or_die(root, tensors, state):
            if state["step"] >= KILL_AT:  # the previous checkpoint is the last one on disk
                os.kill(os.getpid(), signal.SIGKILL)
            return write(root, tensors, state)

        checkpoint.write_checkpoint = write_or_die
    sys.exit(main(sys.argv[1:]))
""")
EPOCHS, STEPS_PER_EPOCH, EVERY, KILL_AT = 4, 68, 10, 150  # 1,078 training digits in batches of 16


def _recipe(tmp_path) -> Path:
    recipe = {
        "model": "builtin:tiny-test-cnn", "data": "builtin:digits",
        "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                  {"finetune": {"epochs": EPOCHS, "batch_size": 16, "checkpoint_every": EVERY, "device": "cpu",
                                "optimizer": {"name": "sgd", "lr": 0.02}}}],
        "measure": {"batch_size": 16, "warmup": 1, "repeats": 2, "max_eval_samples": 256, "threads": 1},
    }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(tmp_path, recipe: Path, out: Path, *extra: str, kill_at: int | None = None):
    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER.format(tests=str(TESTS), kill_at=kill_at))
    command = [sys.executable, str(runner), "compress", str(recipe), "--out", str(out), "--quiet", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_killed_cli_run_resumes_and_ends_with_the_uninterrupted_metric(tmp_path):
    from torchslim.cli import main

    recipe = _recipe(tmp_path)
    assert main(["compress", str(recipe), "--out", str(tmp_path / "full"), "--quiet"]) == 0  # uninterrupted, here
    expected = json.loads((tmp_path / "full" / "report.json").read_text())

    out = tmp_path / "killed"
    killed = _run(tmp_path, recipe, out, kill_at=KILL_AT)  # killed mid-epoch, between two checkpoints
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = out.with_name("killed.checkpoints") / "step1-finetune" / "latest" / "state.json"
    step = json.loads(state.read_text())["step"]
    assert KILL_AT - EVERY <= step < KILL_AT and step % STEPS_PER_EPOCH, "the run was not killed mid-training"
    assert not out.exists()  # nothing half-written

    respelled = f"{tmp_path}/../{tmp_path.name}/./{recipe.name}"  # the same recipe, its path spelled otherwise
    resumed = _run(tmp_path, respelled, out)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][-1]
    assert stage["details"]["resumed_from"]["step"] == step
    assert stage["details"]["optimizer_steps"] == expected["stages"][-1]["details"]["optimizer_steps"]
    assert stage["score"] == pytest.approx(expected["stages"][-1]["score"], abs=1e-9)
    assert stage["details"]["train_loss"] == pytest.approx(expected["stages"][-1]["details"]["train_loss"], rel=1e-4)
    assert not out.with_name("killed.checkpoints").exists()  # removed once the run completed


def test_a_corrupted_checkpoint_stops_the_cli_with_exit_2(tmp_path, capsys):
    from torchslim.cli import main
    from torchslim.recover.checkpoint import write_checkpoint

    recipe = _recipe(tmp_path)
    root = tmp_path / "out.checkpoints" / "step1-finetune"
    write_checkpoint(root, {"model": {"w": torch.zeros(2)}}, {"fingerprint": "from-another-recipe"})
    assert main(["compress", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    stderr = capsys.readouterr().err
    assert "checkpoint was written by a different run" in stderr and "--fresh" in stderr
    assert stderr.index("run the recipe as it was") < stderr.index("--fresh")  # not the first remedy
    assert not (tmp_path / "out").exists()


def test_iterative_pruning_finetunes_between_steps_with_the_same_trainer(tmp_path):
    from torchslim._config import from_dict

    context = _context(tmp_path)
    config = from_dict(ChannelPruningConfig, {"ratio": 0.5, "steps": 3, "finetune": {
        "epochs": 1, "batch_size": 64, "device": "cpu", "optimizer": {"name": "adamw", "lr": 0.003}}})
    details = get_method("prune", "channel").handler(context, config).details
    assert len(details["finetune_train_loss"]) == 2  # after steps 1 and 2, not after the last
    assert context.model.conv2.out_channels == 4  # the same final widths as one step
    assert details["macs_after"] < 0.5 * details["macs_before"]


def test_docs_finetune_example_parses():
    from torchslim.recipe import parse_recipe

    page = (TESTS.parent / "docs" / "recovery.md").read_text()
    block = page.split("A `finetune` step with every setting:")[1].split("```yaml")[1].split("```")[0]
    recipe = parse_recipe({"model": "builtin:digits-cnn", "data": "builtin:digits", "steps": yaml.safe_load(block)})
    config = recipe.steps[0].config
    assert config.optimizer.groups[0].lr_scale == 10.0 and config.distill.features == [["blocks.5", "blocks.5"]]
    assert config.loss.label_smoothing == 0.1 and config.early_stop.keep_best
