"""Manifests and artifact validation: what is refused, what the opt-outs allow, and crafted JSON refused before
any allocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from torchslim._fuzz import READERS, Pristine, _Mlp, _Tiny
from torchslim.errors import ArtifactError, InputError
from torchslim.integrity import FORMAT, read_manifest, verify_manifest


def _pruned_folder(tmp_path):
    folder = tmp_path / "pruned"
    folder.mkdir()
    READERS["pruned"].build(folder)
    return folder


def test_the_manifest_lists_every_file_with_format_size_and_digest(tmp_path):
    folder = _pruned_folder(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == FORMAT == "torchslim.manifest/1" and manifest["torchslim"]
    assert sorted(manifest["files"]) == ["model.safetensors", "model.shapes.json"]
    entry = manifest["files"]["model.shapes.json"]
    assert entry["format"] == "torchslim.model-shapes/1" and entry["size"] == (folder / "model.shapes.json").stat().st_size
    assert manifest["files"]["model.safetensors"]["format"] == "safetensors"
    assert len(entry["sha256"]) == 64 and verify_manifest(folder) == read_manifest(folder)


def test_a_changed_missing_or_added_file_is_refused_by_name_and_the_opt_outs_allow_it(tmp_path, monkeypatch):
    from torchslim import load

    folder = _pruned_folder(tmp_path)
    shapes = folder / "model.shapes.json"
    shapes.write_text(shapes.read_text().replace(" ", "  "))  # same content to a JSON reader, other bytes
    with pytest.raises(ArtifactError, match=r"model.shapes.json: \d[\d,]* bytes, manifest.json records"):
        load(folder, _Tiny())
    assert isinstance(load(folder, _Tiny(), verify=False), torch.nn.Module)
    monkeypatch.setenv("TORCHSLIM_VERIFY", "0")
    assert verify_manifest(folder) is None and isinstance(load(folder, _Tiny()), torch.nn.Module)
    monkeypatch.delenv("TORCHSLIM_VERIFY")
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="extra.bin: not listed in"):
        verify_manifest(folder, ["extra.bin"])
    (folder / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="model.safetensors: listed in manifest.json but missing"):
        verify_manifest(folder)


def test_a_damaged_manifest_is_refused(tmp_path):
    folder = _pruned_folder(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["size"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="the manifest is damaged or was edited"):
        verify_manifest(folder)


def _craft(folder, name, edit):
    document = json.loads((folder / name).read_text())
    edit(document)
    (folder / name).write_text(json.dumps(document))


def test_a_crafted_huge_shape_is_refused_before_any_allocation(tmp_path):
    from torchslim.factorize.svd import _load_factorized as load_factorized
    from torchslim.pruning.channel import _load_pruned as load_pruned

    folder = _pruned_folder(tmp_path)
    _craft(folder, "model.shapes.json", lambda d: d["shapes"].update({"conv.weight": [1 << 30, 1 << 30, 3, 3]}))
    with pytest.raises(ArtifactError, match=r"conv.weight is \[1073741824, 1073741824, 3, 3\], model.safetensors "
                                            r"holds \[4, 1, 3, 3\]"):
        load_pruned(_Tiny(), folder, verify=False)
    _craft(folder, "model.shapes.json", lambda d: d["shapes"].update({"conv.weight": "big"}))
    with pytest.raises(ArtifactError, match="shape of conv.weight must be a list"):
        load_factorized(_Tiny(), folder, verify=False)
    (folder / "model.shapes.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="model.shapes.json: not valid JSON"):
        load_pruned(_Tiny(), folder, verify=False)


@pytest.mark.parametrize("edit, message", [
    (lambda layers: layers["fc1"].update(in_features=1 << 30), r"records a \[64, 536870912\] table"),
    (lambda layers: layers["fc1"].update(bits=3), "bits must be 4 or 8"),
    (lambda layers: layers["fc1"].update(group_size=7), "group_size 7 does not divide in_features 32"),
    (lambda layers: layers["fc1"].update(has_bias="yes"), "has_bias must be a bool"),
    (lambda layers: layers.update(ghost=dict(layers["fc1"])), r"layers.ghost records a \[64, 16\] table"),
])
def test_crafted_weight_only_json_is_refused(tmp_path, edit, message):
    from torchslim.quant.weight_only_step import _load_weight_only as load_weight_only

    folder = tmp_path / "wo"
    folder.mkdir()
    READERS["weight-only"].build(folder)
    _craft(folder, "model.weight_only.json", lambda d: edit(d["layers"]))
    with pytest.raises(ArtifactError, match=message):
        load_weight_only(_Mlp(), folder, verify=False)


def test_an_edited_checkpoint_counter_is_refused(tmp_path):
    from torchslim.recover.checkpoint import CheckpointError, read_checkpoint, write_checkpoint

    folder = write_checkpoint(tmp_path, {"model": {"w": torch.zeros(2)}}, {"fingerprint": "f", "step": 400})
    state = json.loads((folder / "state.json").read_text())
    assert read_checkpoint(tmp_path, "f")[1]["step"] == 400
    state["step"] = 480
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="state.json: checkpoint state is corrupted"):
        read_checkpoint(tmp_path, "f")


def test_cli_no_verify_loads_an_edited_artifact_through_a_file_factory(tmp_path):
    folder = _pruned_folder(tmp_path)
    shapes = folder / "model.shapes.json"
    shapes.write_text(shapes.read_text() + "\n")  # an edit on purpose
    module = tmp_path / "mine.py"
    module.write_text("import torch\nimport torchslim\nfrom torchslim._fuzz import _Tiny\n"
                      f"def make():\n    return torchslim.load({str(folder)!r}, _Tiny())\n"
                      "def example_inputs(n):\n    return torch.zeros(n, 1, 16, 16)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "torchslim.cli"]
    refused = subprocess.run([*command, "profile", f"file:{module}:make", "--json"], capture_output=True,
                             text=True, env=env)
    assert refused.returncode == 2 and "model.shapes.json" in refused.stderr and "--no-verify" in refused.stderr
    loaded = subprocess.run([*command, "--no-verify", "profile", f"file:{module}:make", "--json", "--batch-size",
                             "2"], capture_output=True, text=True, env=env)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert json.loads(loaded.stdout)["params"] == sum(p.numel() for p in _Tiny(4).parameters())


def test_a_pristine_artifact_of_every_reader_loads_to_what_was_saved():
    for name, reader in READERS.items():
        pristine = Pristine(reader)
        assert pristine.expected and all(isinstance(v, torch.Tensor) for v in pristine.expected.values()), name
        assert pristine.run(reader.files[0], pristine.files[reader.files[0]])[0] == "loaded-identical", name


def test_input_error_hierarchy():
    assert issubclass(ArtifactError, InputError)
    from torchslim.compact.artifact import ArtifactError as CompactArtifactError

    assert CompactArtifactError is ArtifactError
