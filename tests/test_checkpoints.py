"""Checkpoint files load their tensors and nothing else (no code from a file runs)."""
import json
import pickle
import warnings
import zipfile

import open_clip
import pytest
import torch

from pearl.checkpoints import is_torchscript_archive, torchscript_state_dict
from pearl.errors import WeightsError
from pearl.loading import TINY_CONFIG as TINY_CFG
from pearl.loading import load_clip

from .conftest import make_tiny


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / "pearl-tiny-test.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder / "pearl-tiny-test.json")
    return "pearl-tiny-test"


class _Node(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _script_archive(state: dict, path, extra: dict | None = None):
    """A real TorchScript archive (torch.jit.save) whose module tree carries ``state`` as parameters."""
    root = _Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not isinstance(getattr(node, name, None), torch.nn.Module):
                node.add_module(name, _Node())
            node = getattr(node, name)
        node.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    for key, value in (extra or {}).items():
        root.register_buffer(key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(root), str(path))
    return path


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating the marker file is the "code execution"


def test_torchscript_archive_is_read_without_torch_jit(tmp_path):
    state = make_tiny(seed=3).state_dict()
    path = _script_archive(state, tmp_path / "weights.pt", extra={"input_resolution": torch.tensor(64)})
    assert is_torchscript_archive(path)
    read = torchscript_state_dict(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference = torch.jit.load(str(path)).state_dict()  # torch's own reader, on a file we made
    assert set(read) == set(reference)
    for key in reference:
        assert torch.equal(read[key], reference[key]), key


def test_load_clip_takes_weights_from_a_torchscript_archive_as_quickgelu(tmp_path, tiny_name):
    source = make_tiny(seed=4)
    path = _script_archive(source.state_dict(), tmp_path / "weights.pt",
                           extra={"context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)})
    model, _ = load_clip(tiny_name, pretrained=str(path))
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)


def test_archive_missing_weights_is_named(tmp_path, tiny_name):
    state = {k: v for k, v in make_tiny().state_dict().items() if not k.startswith("visual.ln_post")}
    path = _script_archive(state, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match=r"partial.pt does not fit the model: 2 weights missing"):
        load_clip(tiny_name, pretrained=str(path))


def test_zip_with_payload_and_a_lookalike_constants_name_runs_nothing(tmp_path, tiny_name):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"weights": _Payload(marker)}, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("evil/xconstants.pkl", b"")  # fooled the old "name ends in constants.pkl" check
    assert not is_torchscript_archive(path)
    with pytest.raises(WeightsError, match=r"evil.pt holds more than tensors"):
        load_clip(tiny_name, pretrained=str(path))
    assert not marker.exists()


def test_torchscript_shaped_archive_with_payload_runs_nothing(tmp_path, tiny_name):
    marker = tmp_path / "marker"
    path = _script_archive(make_tiny().state_dict(), tmp_path / "crafted.pt")
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    root = next(iter(members)).split("/")[0]
    members[f"{root}/data.pkl"] = pickle.dumps(_Payload(marker), protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert is_torchscript_archive(path)
    with pytest.raises(WeightsError, match=r"crafted.pt refers to (io|builtins).open"):
        load_clip(tiny_name, pretrained=str(path))
    assert not marker.exists()


def test_damaged_archive_is_named(tmp_path, tiny_name):
    path = _script_archive(make_tiny().state_dict(), tmp_path / "cut.pt")
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    root = next(iter(members)).split("/")[0]
    members[f"{root}/data/0"] = members[f"{root}/data/0"][:-8]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(WeightsError, match=r"cut.pt: storage 0 holds .* the file is damaged"):
        load_clip(tiny_name, pretrained=str(path))


def test_plain_state_dict_file_still_loads(tmp_path, tiny_name):
    source = make_tiny(seed=5)
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    model, _ = load_clip(tiny_name, pretrained=str(tmp_path / "plain.pth"))
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight)
