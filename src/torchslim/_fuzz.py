"""Damage for the artifact readers: small valid artifacts of every kind, ways to break them, and the outcome.

Used by ``tests/test_fuzz.py`` (cases drawn by hypothesis) and ``benchmarks/fuzz.py`` (N seeded cases per reader,
outcome counts written as JSON). A case takes one pristine artifact folder, damages one of its files (a bit
flip, a truncation, appended bytes, or a crafted JSON document / header whose own checksums are made right),
loads it, and classifies what happened:

* ``rejected``: `ArtifactError` (or another `InputError` subclass, e.g. `CheckpointError`) with a message;
* ``loaded-identical``: it loaded, and every tensor (or output) equals the undamaged one;
* ``loaded-different``: it loaded something else (a silent corruption);
* ``crash``: any other exception (a traceback for the user).
"""

from __future__ import annotations

import json
import random
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from torchslim.errors import InputError

OUTCOMES = ("rejected", "loaded-identical", "loaded-different", "crash")
KINDS = ("flip", "truncate", "append", "craft")


class _Tiny(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4).flatten(1))


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class Reader:
    """One artifact reader: ``build(folder)`` writes a valid artifact there (with its manifest); ``load(folder,
    verify)`` reads it back into something `same` can compare; ``files`` are the files a case may damage."""

    name: str
    files: tuple[str, ...]
    build: Callable[[Path], None]
    load: Callable[[Path, bool], Any]


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _save(deployable, folder: Path) -> None:
    """The deployable's artifact and the manifest over it, as a run's output step writes them."""
    from torchslim.integrity import write_manifest

    deployable.save(folder)
    write_manifest(folder)


# -- builders and loaders ------------------------------------------------------------------------------------
def _build_pruned(folder: Path) -> None:
    from torchslim.runtime import TorchDeployable

    _seeded()
    _save(TorchDeployable(_Tiny(width=4)), folder)  # a "pruned" model: fewer channels than the class's default


def _load_pruned(folder: Path, verify: bool) -> Any:
    from torchslim.pruning.channel import _load_pruned as load_pruned

    return _state(load_pruned(_Tiny(), folder, verify=verify))


def _build_factorized(folder: Path) -> None:
    from torchslim.factorize.svd import factorized_layers
    from torchslim.runtime import TorchDeployable

    _seeded()
    model = _Mlp()
    model.fc1 = factorized_layers(model.fc1, 8)
    _save(TorchDeployable(model), folder)


def _load_factorized(folder: Path, verify: bool) -> Any:
    from torchslim.factorize.svd import _load_factorized as load_factorized

    return _state(load_factorized(_Mlp(), folder, verify=verify))


def _build_weight_only(folder: Path) -> None:
    from torchslim.quant.groupwise import quantize_rtn
    from torchslim.quant.weight_only import WeightOnlyLinear
    from torchslim.quant.weight_only_step import WeightOnlyDeployable

    _seeded()
    model = _Mlp()
    model.fc1 = WeightOnlyLinear.from_quantized(quantize_rtn(model.fc1.weight.detach(), 4, 16), model.fc1.bias)
    model.fc2 = WeightOnlyLinear.from_quantized(quantize_rtn(model.fc2.weight.detach(), 8, 0), model.fc2.bias)
    _save(WeightOnlyDeployable(model), folder)


def _load_weight_only(folder: Path, verify: bool) -> Any:
    from torchslim.quant.weight_only_step import _load_weight_only as load_weight_only

    return _state(load_weight_only(_Mlp(), folder, verify=verify))


def _build_compact(folder: Path) -> None:
    from torchslim.compact.artifact import Storage, round_to_storage_, write_artifact
    from torchslim.compact.sharing import share_weights_
    from torchslim.integrity import write_manifest

    _seeded()
    model = _Tiny()
    with torch.no_grad():
        model.fc.weight[model.fc.weight.abs() < 0.05] = 0  # pruned weights: the positions stream has gaps
    share_weights_(model, {"fc": 4, "conv": 3})
    storage = Storage(other="int8")
    round_to_storage_(model, storage)
    write_artifact(model, folder / "model.tslim", storage)
    write_manifest(folder)


def _load_compact(folder: Path, verify: bool) -> Any:
    from torchslim.compact.artifact import read_artifact

    return read_artifact(folder / "model.tslim", verify=verify)


def _onnx_input() -> "np.ndarray":
    import numpy as np

    return np.linspace(-1, 1, 2 * 16, dtype=np.float32).reshape(2, 16)


def _build_onnx(folder: Path) -> None:
    """A two-layer perceptron built with onnx's helpers (exporting a torch model costs a minute on a busy
    machine; the reader is the same)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from torchslim.integrity import write_manifest

    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((16, 8)), "b1": rng.standard_normal(8), "w2": rng.standard_normal((8, 4)),
               "b2": rng.standard_normal(4)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(folder / "model.onnx"))
    write_manifest(folder)


def _load_onnx(folder: Path, verify: bool) -> Any:
    from torchslim.runtime import onnx_session

    session = onnx_session(folder / "model.onnx", threads=1, verify=verify)
    feed = {session.get_inputs()[0].name: _onnx_input()}
    return {"output": torch.from_numpy(session.run(None, feed)[0])}


def _build_checkpoint(folder: Path) -> None:
    from torchslim.recover.checkpoint import write_checkpoint

    _seeded()
    write_checkpoint(folder, {"model": _state(_Tiny()), "rng": {"cpu": torch.get_rng_state()}},
                     {"fingerprint": "fuzz", "step": 400, "history": [0.5, 0.25]})
    latest = folder / "latest"
    for path in latest.iterdir():  # flatten: the cases address files by name in one folder
        path.rename(folder / path.name)
    latest.rmdir()


def _load_checkpoint(folder: Path, verify: bool) -> Any:
    from torchslim.recover.checkpoint import read_checkpoint

    root = folder.parent / f"{folder.name}-root"
    (root / "latest").mkdir(parents=True)
    for path in folder.iterdir():
        (root / "latest" / path.name).write_bytes(path.read_bytes())
    tensors, state = read_checkpoint(root, "fuzz")
    flat = {f"{group}/{k}": v for group, values in tensors.items() for k, v in values.items()}
    flat["state"] = torch.tensor([state["step"], *state["history"]], dtype=torch.float64)
    return flat


READERS = {reader.name: reader for reader in (
    Reader("pruned", ("model.safetensors", "model.shapes.json", "manifest.json"), _build_pruned, _load_pruned),
    Reader("factorized", ("model.safetensors", "model.shapes.json"), _build_factorized, _load_factorized),
    Reader("weight-only", ("model.safetensors", "model.weight_only.json"), _build_weight_only, _load_weight_only),
    Reader("compact", ("model.tslim",), _build_compact, _load_compact),
    Reader("onnx", ("model.onnx",), _build_onnx, _load_onnx),
    Reader("checkpoint", ("model.safetensors", "state.json"), _build_checkpoint, _load_checkpoint),
)}


# -- damage ---------------------------------------------------------------------------------------------------
_CRAFTED = [None, True, -1, 0, 1, 2 ** 31, 2 ** 62, 10 ** 30, 1.5, float("nan"), "", "x" * 300, "float32", [],
            [-1], [2 ** 40, 2 ** 40], [[1]], {}, {"a": 1}]


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [path] + [leaf for k, v in value.items() for leaf in _leaves(v, path + (k,))]
    if isinstance(value, list):
        return [path] + [leaf for i, v in enumerate(value) for leaf in _leaves(v, path + (i,))]
    return [path]


def _replaced(document: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(document))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return copy


def craft_json(document: Any, rng: random.Random) -> Any:
    """``document`` with one node (a leaf, a list or a mapping) replaced by a value of another kind."""
    return _replaced(document, rng.choice(_leaves(document)), rng.choice(_CRAFTED))


def _craft_safetensors(data: bytes, rng: random.Random) -> bytes:
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + length])
    text = json.dumps(craft_json(header, rng)).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def _craft_tslim(data: bytes, rng: random.Random) -> bytes:
    from torchslim.compact.artifact import MAGIC, PREAMBLE, VERSION

    _, _, length, _ = PREAMBLE.unpack_from(data)
    header = json.loads(zlib.decompress(data[PREAMBLE.size:PREAMBLE.size + length], -15))
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = packer.compress(json.dumps(craft_json(header, rng)).encode()) + packer.flush()
    return PREAMBLE.pack(MAGIC, VERSION, len(body), zlib.crc32(body)) + body + data[PREAMBLE.size + length:]


def _craft(name: str, data: bytes, rng: random.Random) -> bytes | None:
    """A crafted version of ``name`` whose own framing (length, CRC) is consistent, or None for opaque files."""
    if name.endswith(".json"):
        return json.dumps(craft_json(json.loads(data), rng)).encode()
    if name.endswith(".safetensors"):
        return _craft_safetensors(data, rng)
    if name.endswith(".tslim"):
        return _craft_tslim(data, rng)
    return None


def damage(data: bytes, name: str, kind: str, rng: random.Random) -> bytes:
    """``data`` (the file ``name``) damaged one way: ``flip`` one bit, ``truncate``, ``append`` bytes, or
    ``craft`` its JSON / header (falls back to a flip for opaque formats). The result always differs."""
    if kind == "craft":
        crafted = _craft(name, data, rng)
        if crafted is not None and crafted != data:  # a value replaced by itself is no damage: flip instead
            return crafted
        kind = "flip"
    if kind == "flip":
        position = rng.randrange(len(data))
        return data[:position] + bytes([data[position] ^ (1 << rng.randrange(8))]) + data[position + 1:]
    if kind == "truncate":
        return data[:rng.randrange(len(data))]
    return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


# -- outcomes -------------------------------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Equal tensors under equal keys (NaN equal to NaN)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(
            torch.nan_to_num(a[k].float(), nan=1e30) if a[k].is_floating_point() else a[k],
            torch.nan_to_num(b[k].float(), nan=1e30) if b[k].is_floating_point() else b[k]) for k in a)


class Pristine:
    """A reader's undamaged artifact (its files' bytes) and what it loads to."""

    def __init__(self, reader: Reader):
        self.reader = reader
        with tempfile.TemporaryDirectory(prefix="torchslim-fuzz-") as scratch:
            folder = Path(scratch) / "artifact"
            folder.mkdir()
            reader.build(folder)
            self.files = {p.name: p.read_bytes() for p in folder.iterdir()}
            self.expected = reader.load(folder, True)

    def run(self, name: str, data: bytes, verify: bool = True) -> tuple[str, str]:
        """Load the artifact with ``name`` replaced by ``data``; returns ``(outcome, message or error type)``."""
        with tempfile.TemporaryDirectory(prefix="torchslim-fuzz-") as scratch:
            folder = Path(scratch) / "artifact"
            folder.mkdir()
            for file, content in self.files.items():
                (folder / file).write_bytes(data if file == name else content)
            try:
                loaded = self.reader.load(folder, verify)
            except InputError as error:
                return "rejected", str(error)
            except Exception as error:  # what the readers must never let through
                return "crash", f"{type(error).__name__}: {str(error)[:200]}"
        return ("loaded-identical" if same(loaded, self.expected) else "loaded-different"), ""

    def case(self, name: str, kind: str, rng: random.Random, verify: bool = True) -> tuple[str, str]:
        return self.run(name, damage(self.files[name], name, kind, rng), verify)
