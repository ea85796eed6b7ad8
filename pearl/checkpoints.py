"""Reading weights from checkpoint files without running code stored in them.

A pickle can name any Python callable, and ``torch.load(weights_only=False)`` calls it. Plain
checkpoints therefore go through ``torch.load(weights_only=True)`` (open_clip's loader does that);
OpenAI's TorchScript archives (``ViT-B-16.pt``), which ``weights_only`` refuses, are read here:
recognised by their real layout and unpickled by an unpickler that builds nothing but tensors,
plain containers and inert stand-ins for TorchScript's own classes. See docs/checkpoints.md.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict

import torch

from .errors import WeightsError

# The storage classes a TorchScript pickle names, by dtype.
_STORAGE_DTYPES = {f"{name}Storage": dtype for name, dtype in {
    "Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16, "Double": torch.float64,
    "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
    "Bool": torch.bool}.items()}


def _torchscript_root(names: list[str]) -> str | None:
    """The archive folder of a TorchScript zip (``<root>/data.pkl``, ``<root>/constants.pkl`` and
    ``<root>/code/`` under one top folder, as ``torch.jit.save`` writes them), else None."""
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1:
        return None
    root = roots.pop()
    members = set(names)
    has_code = any(name.startswith(f"{root}/code/") for name in names)
    return root if {f"{root}/data.pkl", f"{root}/constants.pkl"} <= members and has_code else None


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is laid out as a TorchScript archive (not merely a zip naming a constants.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _torchscript_root(archive.namelist()) is not None
    except (zipfile.BadZipFile, OSError):
        return False


class _ScriptObject:
    """Inert stand-in for a TorchScript class (``__torch__.*``): keeps its attributes, runs nothing."""

    def __setstate__(self, state) -> None:
        self.attributes = state if isinstance(state, dict) else {}


def _passthrough(value, *_):
    return value


_ALLOWED = {("collections", "OrderedDict"): OrderedDict,
            **{("torch.jit._pickle", name): _passthrough for name in
               ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")}}
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")


class _WeightsUnpickler(pickle.Unpickler):
    """Builds tensors from the archive's ``data/<key>`` records; refuses every other callable."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._root, self._path = archive, root, path
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == _REBUILD_TENSOR:
            return _rebuild_tensor
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise WeightsError(f"checkpoint {self._path} refers to {module}.{name}, which a file of weights has no "
                           f"use for; it was not loaded (nothing in it was run). Use a checkpoint from a source you "
                           f"trust, or a .safetensors file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise WeightsError(f"checkpoint {self._path} has a storage reference {pid!r:.80} that is not a tensor's")
        _, dtype, key, _location, numel = pid
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._root}/data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise WeightsError(f"checkpoint {self._path}: storage {key} holds {flat.numel()} values, "
                                   f"its header says {numel}; the file is damaged")
            self._storages[key] = flat
        return self._storages[key]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _collect(node: _ScriptObject, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    for name, value in getattr(node, "attributes", {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out, seen)


def torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name, on the CPU.

    Parameters, buffers and plain tensor attributes alike (the pickle does not tell them apart):
    the caller keeps the names its model has.
    """
    path = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            root = _torchscript_root(archive.namelist())
            if root is None:
                raise WeightsError(f"checkpoint {path} is not a TorchScript archive")
            data = archive.read(f"{root}/data.pkl")
            module = _WeightsUnpickler(data, archive, root, path).load()
    except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise WeightsError(f"checkpoint {path} could not be read ({type(error).__name__}: {error}); the file is "
                           f"damaged or not a TorchScript archive: download it again") from None
    if not isinstance(module, _ScriptObject):
        raise WeightsError(f"checkpoint {path} does not hold a TorchScript module")
    state: dict[str, torch.Tensor] = {}
    _collect(module, "", state, set())
    return state


def load_torchscript_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy a TorchScript archive's weights into ``model`` (every model key must be there, same shape).

    Names the archive has and the model lacks (OpenAI's ``input_resolution``, ``context_length``,
    ``vocab_size``, per-block ``attn_mask``) are ignored, as open_clip's own loader drops them.
    """
    state = torchscript_state_dict(path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    wrong = [f"{key} {tuple(state[key].shape)} ≠ {tuple(value.shape)}" for key, value in expected.items()
             if key in state and state[key].shape != value.shape]
    if missing or wrong:
        detail = (f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})" if missing
                  else f"shapes differ: {'; '.join(wrong[:3])}")
        raise WeightsError(f"checkpoint {path} does not fit the model: {detail}; check model.name")
    model.load_state_dict({key: state[key] for key in expected}, strict=True)


def check_plain_checkpoint_error(path: str | os.PathLike, error: Exception) -> WeightsError | None:
    """A WeightsError for ``torch.load(weights_only=True)`` refusing ``path``, else None."""
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error):
        return WeightsError(f"checkpoint {path} holds more than tensors (its pickle names Python objects to "
                            f"build), so it was not loaded and nothing in it was run. Save its state_dict (or a "
                            f".safetensors file) from a source you trust and pass that file")
    return None
