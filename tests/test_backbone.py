import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

import pearl
from pearl import backbone
from pearl.backbone import TINY_CONFIG as TINY_CFG
from pearl.backbone import dense_features, embed, positional_embedding
from pearl.blocks import is_plain_block
from pearl.errors import WeightsError

from .conftest import build_method


def test_vanilla_dense_forward_reproduces_stock_open_clip(tiny_model):
    """Embed + blocks + vanilla last block at native size = open_clip's own forward (exactly, fp32)."""
    visual = tiny_model.visual
    images = torch.randn(2, 3, 64, 64)
    feats, _ = dense_features(visual, images, build_method("vanilla"))
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    stock = tokens @ visual.proj
    stock = stock / stock.norm(dim=-1, keepdim=True)
    assert torch.allclose(feats.reshape(2, 16, -1), stock, atol=1e-6)


def _open_clip_blocks(visual, images):
    x, _ = embed(visual, images)
    outputs = []
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)  # open_clip's own forward: nn.MultiheadAttention
        outputs.append(x)
    return outputs


def test_trunk_computes_open_clips_own_blocks(tiny_model):
    """Blocks 1..L−1 with the attention as one SDPA call = open_clip's own block forward (fp32)."""
    images = torch.randn(3, 3, 50, 81)
    shared = backbone.trunk(tiny_model.visual, images, keep_hidden=True)
    expected = _open_clip_blocks(tiny_model.visual, images)
    assert len(shared.hidden) == len(expected) == 11
    for ours, theirs in zip(shared.hidden, expected):
        assert (ours - theirs).abs().max() < 1e-5
    assert torch.equal(shared.x, shared.hidden[-1]) and shared.grid == (3, 5)


def test_trunk_runs_any_other_block_through_its_own_forward():
    """A block that is not open_clip's plain ResidualAttentionBlock (here a subclass changing the
    output) keeps its own forward."""
    class Shifted(open_clip.transformer.ResidualAttentionBlock):
        def forward(self, q_x, *args, **kwargs):
            return super().forward(q_x) + 1.0

    model = backbone.tiny_clip(seed=3)[0]
    blocks = model.visual.transformer.resblocks
    shifted = Shifted(64, 2, act_layer=open_clip.transformer.QuickGELU)
    shifted.load_state_dict(blocks[4].state_dict())
    blocks[4] = shifted.eval()
    images = torch.randn(1, 3, 64, 64)
    ours = backbone.trunk(model.visual, images).x
    assert (ours - _open_clip_blocks(model.visual, images)[-1]).abs().max() < 1e-5
    assert is_plain_block(blocks[3]) and not is_plain_block(shifted)


def test_positional_embedding_plus_point_one_interpolation(tiny_model):
    visual = tiny_model.visual
    pos = visual.positional_embedding.detach().float()
    assert torch.equal(positional_embedding(visual, 4, 4), pos)   # native grid: unchanged
    assert torch.equal(positional_embedding(visual, 2, 8), pos)   # same token count: upstream keeps it too
    out = positional_embedding(visual, 3, 7)
    assert out.shape == (1 + 21, 64)
    assert torch.equal(out[0], pos[0])
    grid = pos[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(3.1 / 4, 7.1 / 4), mode="bicubic", align_corners=False)
    assert torch.allclose(out[1:], expected.permute(0, 2, 3, 1).reshape(21, 64))
    by_size = F.interpolate(grid, size=(3, 7), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(21, 64)
    assert not torch.allclose(out[1:], by_size, atol=1e-4)  # the +0.1 form samples elsewhere


def test_embed_non_square_input_drops_trailing_pixels(tiny_model):
    tokens, grid = embed(tiny_model.visual, torch.randn(1, 3, 50, 81))
    assert grid == (3, 5) and tokens.shape == (1, 16, 64)


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
    monkeypatch.setattr(backbone, "_require_reachable_weights", lambda *args: None)  # as if cached
    pearl.load_clip("ViT-B-16", pretrained="openai")
    assert seen["force_quick_gelu"] is True and seen["name"] == "ViT-B-16"
    pearl.load_clip("ViT-B-16", pretrained="laion2b_s34b_b88k")
    assert seen["force_quick_gelu"] is False


def test_offline_weights_fail_fast_once_naming_the_cache_and_file(tmp_path, monkeypatch):
    probes, creates = [], []
    monkeypatch.setattr(backbone, "_hub_reachable", lambda: probes.append(1) or False)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: creates.append(1))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(backbone, "_unreachable", {})
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
    monkeypatch.setattr(backbone, "_hub_reachable", lambda: pytest.fail("probed although cached"))
    backbone._require_reachable_weights("ViT-B-16", "openai", None)
