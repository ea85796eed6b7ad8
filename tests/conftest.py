import os
from pathlib import Path

import open_clip
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from pearl.loading import tiny_clip  # noqa: E402


def make_tiny(seed: int = 0) -> torch.nn.Module:
    return tiny_clip(seed)[0]


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_tower(tiny_model):
    from pearl.towers import tower_for
    return tower_for(tiny_model.visual)


@pytest.fixture(scope="session")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PEARL_CACHE", str(tmp_path_factory.getbasetemp() / "pearl-cache"))


@pytest.fixture(autouse=True)
def _fresh_error_lines(monkeypatch):
    """The CLI prints a repeated error line once per process: each test starts with none printed."""
    from pearl import cli
    monkeypatch.setattr(cli, "_printed", set())


@pytest.fixture(scope="session")
def photos():
    from skimage import data
    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


REPO = Path(__file__).resolve().parents[1]


def build_method(name: str, **overrides):
    """The method ``name`` built with its own config from flat parameter overrides (as Segmentor does);
    ``pa`` and ``arch`` default to off and the method's own."""
    from pearl.methods import get_method
    from pearl.params import build_config, resolve
    cls = get_method(name)
    params = resolve({k: v for k, v in overrides.items() if k not in ("pa", "arch")})
    params.update(pa=overrides.get("pa", False), arch=overrides.get("arch", cls.default_arch))
    return cls(build_config(cls.Config, params, cls.config_prefix))


def compose(overrides: list[str]):
    """run.py's config with ``overrides``, composed as Hydra does for one job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pearl.config import register_config_groups
    register_config_groups()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return hydra_compose("config", overrides=overrides)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Synthetic voc21 (3 images) and ade20k (2 images) in their real layouts, 48×64."""
    from pearl.data.synthetic import write_dataset
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset("voc21", root, num_images=3, size=(48, 64))
    write_dataset("ade20k", root, num_images=2, size=(48, 64), seed=1)
    return root
