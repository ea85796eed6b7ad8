"""The tower interface and its open_clip ViT implementation against open_clip's own forward."""
import open_clip
import pytest
import torch
import torch.nn.functional as F

from pearl.errors import ConfigError
from pearl.loading import tiny_clip
from pearl.towers import available_towers, tower_for
from pearl.towers.open_clip_vit import OpenClipBlock, positional_embedding

from .conftest import build_method


def test_vanilla_dense_forward_reproduces_stock_open_clip(tiny_model):
    """Embed + blocks + vanilla last block at native size = open_clip's own forward (exactly, fp32)."""
    visual = tiny_model.visual
    images = torch.randn(2, 3, 64, 64)
    feats, _ = tower_for(visual).dense_features(images, build_method("vanilla"))
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    stock = tokens @ visual.proj
    stock = stock / stock.norm(dim=-1, keepdim=True)
    assert torch.allclose(feats.reshape(2, 16, -1), stock, atol=1e-6)


def _open_clip_blocks(visual, images):
    x, _ = tower_for(visual).embed(images)
    outputs = []
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)  # open_clip's own forward: nn.MultiheadAttention
        outputs.append(x)
    return outputs


def test_trunk_computes_open_clips_own_blocks(tiny_model):
    """Blocks 1..L−1 with the attention as one SDPA call = open_clip's own block forward (fp32)."""
    images = torch.randn(3, 3, 50, 81)
    shared = tower_for(tiny_model.visual).trunk(images, keep_hidden=True)
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

    model = tiny_clip(seed=3)[0]
    blocks = model.visual.transformer.resblocks
    shifted = Shifted(64, 2, act_layer=open_clip.transformer.QuickGELU)
    shifted.load_state_dict(blocks[4].state_dict())
    blocks[4] = shifted.eval()
    images = torch.randn(1, 3, 64, 64)
    ours = tower_for(model.visual).trunk(images).x
    assert (ours - _open_clip_blocks(model.visual, images)[-1]).abs().max() < 1e-5
    assert OpenClipBlock(blocks[3]).is_plain() and not OpenClipBlock(shifted).is_plain()


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
    tokens, grid = tower_for(tiny_model.visual).embed(torch.randn(1, 3, 50, 81))
    assert grid == (3, 5) and tokens.shape == (1, 16, 64)


def test_a_tower_of_another_family_is_refused_naming_it():
    """CoCa's attention-pooled ViT and any non-open_clip module are not the open_clip ViT family: a
    one-line error that names the module type and the supported towers, not an AttributeError later."""
    coca_like = tiny_clip()[0].visual
    coca_like.attn_pool = torch.nn.Identity()
    for visual in (coca_like, torch.nn.Linear(2, 2)):
        with pytest.raises(ConfigError, match=f"image tower {type(visual).__name__} is not supported; "
                                              f"supported: {available_towers()[0]}"):
            tower_for(visual)


def test_tower_facts_come_from_the_model(tiny_model):
    tower = tower_for(tiny_model.visual)
    assert (tower.patch_size, tower.prefix_tokens, tower.has_cls, tower.num_blocks) == (16, 1, True, 12)
    assert tower.dtype == torch.float32 and tower.device == torch.device("cpu")
    laion = tiny_clip()[0].visual
    laion.image_mean, laion.image_std = (0.5,) * 3, (0.5,) * 3
    assert tower_for(laion).normalisation == ((127.5,) * 3, (127.5,) * 3)

