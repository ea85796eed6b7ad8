"""Loading open_clip models: local checkpoints, tags, the offline cache."""
import json

import open_clip
import pytest
import torch

import pearl
from pearl import loading
from pearl.errors import WeightsError
from pearl.loading import TINY_CONFIG as TINY_CFG


def test_load_clip_local_checkpoint_and_errors(tmp_path, monkeypatch):
    config = tmp_path / "Tiny-Test-ViT.json"
    config.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(str(config))
    source = open_clip.create_model("Tiny-Test-ViT")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), checkpoint)
    model, tokenizer = pearl.load_clip("Tiny-Test-ViT", pretrained=str(checkpoint))
    assert not model.training
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight)
    assert tokenizer("a cat").shape == (1, 77)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        pearl.load_clip("ViT-B-16", pretrained=str(tmp_path / "missing.pt"))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(RuntimeError, match="hf-cache"):
        pearl.load_clip("ViT-B-16", pretrained="openai")
    with pytest.raises(ValueError, match="precision"):
        pearl.load_clip("ViT-B-16", pretrained=None, precision="fp8")


def test_load_clip_openai_tag_asks_for_quick_gelu(monkeypatch):
    seen = {}

    def fake_create(name, pretrained=None, **kwargs):
        seen.update(kwargs, name=name)
        return torch.nn.Linear(1, 1)
    monkeypatch.setattr(open_clip, "create_model", fake_create)
    monkeypatch.setattr(loading, "_require_reachable_weights", lambda *args: None)  # as if cached
    pearl.load_clip("ViT-B-16", pretrained="openai")
    assert seen["force_quick_gelu"] is True and seen["name"] == "ViT-B-16"
    pearl.load_clip("ViT-B-16", pretrained="laion2b_s34b_b88k")
    assert seen["force_quick_gelu"] is False


def test_offline_weights_fail_fast_once_naming_the_cache_and_file(tmp_path, monkeypatch):
    probes, creates = [], []
    monkeypatch.setattr(loading, "hub_reachable", lambda: probes.append(1) or False)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: creates.append(1))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(loading, "_unreachable", {})
    for _ in range(3):  # three jobs of one sweep
        with pytest.raises(WeightsError) as error:
            pearl.load_clip("ViT-B-16", pretrained="openai")
        message = str(error.value)
        assert "empty-cache" in message and "timm/vit_base_patch16_clip_224.openai" in message
        assert "open_clip_model.safetensors" in message
    assert probes == [1] and creates == []  # asked the Hub once, never tried to download


def test_cached_weights_skip_the_hub_probe(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"x")
    (cache / "models--timm--vit_base_patch16_clip_224.openai" / "refs").mkdir()
    (cache / "models--timm--vit_base_patch16_clip_224.openai" / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(loading, "hub_reachable", lambda: pytest.fail("probed although cached"))
    loading._require_reachable_weights("ViT-B-16", "openai", None)
