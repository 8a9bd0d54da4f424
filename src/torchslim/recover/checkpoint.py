"""Training checkpoints in safetensors + JSON (no pickle), written atomically, verified when read.

A checkpoint is a folder ``<root>/latest`` holding one ``.safetensors`` file per tensor group (model, optimiser
state, RNG states, best model) and ``state.json`` (counters, histories, scheduler state, the SHA-256 of every
file, and a fingerprint of the run that wrote it). It is written to a temporary folder beside it and renamed into
place, so a process killed mid-write leaves the previous checkpoint intact. Reading checks every digest and the
fingerprint: a corrupted or foreign checkpoint is an error naming the folder, never a silent fresh start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from torchslim.errors import InputError
from torchslim.integrity import sha256_file

FORMAT = "torchslim-checkpoint"
VERSION = 2  # 2: state.json carries the SHA-256 of its own content ("state_sha256"); 1 is still read
LATEST = "latest"


class CheckpointError(InputError):
    """A checkpoint exists but cannot be used (corrupted, incomplete, or written by a different run)."""


def _state_digest(state: dict) -> str:
    """SHA-256 of ``state``'s canonical JSON (sorted keys), without its own ``state_sha256``."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"checkpoint state holds a {type(value).__name__}, which has no JSON form")


def _unshared(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of ``group`` in which no two tensors share memory (safetensors refuses aliases): a tensor tied
    to an earlier one (GPT-2's lm_head and wte) is stored as a copy of its own; loading both names into the
    model's one tied parameter restores it."""
    seen, out = set(), {}
    for key, value in group.items():
        tensor = value.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def write_checkpoint(root: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write ``<root>/latest`` atomically.

    Args:
        tensors: file stem -> flat name -> tensor (each saved as ``<stem>.safetensors``).
        state: JSON-serialisable counters and settings (saved as ``state.json`` with the file digests).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{LATEST}.partial-"))
    try:
        digests = {}
        for stem, group in tensors.items():
            path = tmp / f"{stem}.safetensors"
            save_file(_unshared(group), str(path))
            digests[path.name] = sha256_file(path)
        body = json.loads(json.dumps({"format": FORMAT, "version": VERSION, "files": digests, **state},
                                     default=_json_default))
        body["state_sha256"] = _state_digest(body)  # counters and histories are checked too, not only tensors
        with open(tmp / "state.json", "w") as handle:
            json.dump(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        final, old = root / LATEST, root / f".{LATEST}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``latest``, or the previous one if a write was cut
    between its two renames), or None."""
    root = Path(root)
    for name in (LATEST, f".{LATEST}.old"):
        if (root / name / "state.json").exists():
            return root / name
    if (root / LATEST).exists():
        raise CheckpointError(f"{root / LATEST}: checkpoint has no state.json (incomplete); remove the folder "
                              f"or rerun with --fresh to start over")
    return None


def read_checkpoint(root: Path, fingerprint: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
    """Read and verify the checkpoint under ``root``; None when there is none.

    Raises:
        CheckpointError: unreadable JSON, a missing or altered tensor file, or a different run's fingerprint.
    """
    from safetensors.torch import load_file

    folder = find_checkpoint(root)
    if folder is None:
        return None
    hint = "remove the folder or rerun with --fresh to start over"
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}/state.json: unreadable checkpoint ({error}); {hint}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{folder}/state.json: not a torchslim checkpoint; {hint}")
    if type(state.get("version")) is not int or state["version"] not in (1, VERSION):
        raise CheckpointError(f"{folder}/state.json: checkpoint format version {str(state.get('version'))[:20]}, this "
                              f"torchslim reads 1 and {VERSION}; {hint}")
    # a digest present is always checked: a version-2 state relabelled 1 must not skip its own digest
    if (state["version"] >= 2 or "state_sha256" in state) and state.get("state_sha256") != _state_digest(state):
        raise CheckpointError(f"{folder}/state.json: checkpoint state is corrupted (checksum mismatch); {hint}")
    if not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{folder}/state.json: 'files' must map file names to digests; {hint}")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{folder}: checkpoint was written by a different run ({state.get('describe', '?')}: "
                              f"the recipe's content, model or step changed since); to resume it, run the recipe as "
                              f"it was; to keep it and start this one, choose another --out; --fresh discards it")
    tensors = {}
    for name, digest in state.get("files", {}).items():
        path = folder / name
        if not isinstance(name, str) or "/" in name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{folder}/state.json: lists {str(name)[:60]!r}, not a tensor file; {hint}")
        if not path.exists():
            raise CheckpointError(f"{path}: checkpoint file missing; {hint}")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: checkpoint file is corrupted (checksum mismatch); {hint}")
        try:
            tensors[name.removesuffix(".safetensors")] = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable checkpoint file ({error}); {hint}") from None
    return tensors, state


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state_dict into tensors (``"<param>.<key>"``) and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for param, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}.{key}"] = value
            else:
                scalars.setdefault(str(param), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of `flatten_optimizer`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        param, key = name.split(".", 1)
        state.setdefault(int(param), {})[key] = value
    for param, entries in rest["scalars"].items():
        state.setdefault(int(param), {}).update(entries)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, torch.Tensor]:
    """The torch RNG states (CPU, and every CUDA device's)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{index}"] = value
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
