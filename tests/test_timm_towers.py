"""timm towers (EVA02, PE-Core, SigLIP) against timm's own forward, on seeded random tiny models of each
family (``pearl.tiny``): the architecture of the real tower at width 64 (docs/architecture.md §2.1)."""
import sys

import pytest
import timm
import torch

import pearl
from pearl.errors import ConfigError
from pearl.loading import load_tokenizer, prepare_model
from pearl.tiny import TIMM_FAMILIES, tiny_clip, tiny_config
from pearl.towers import TowerConfig, tower_for

from .conftest import build_method

CLASSES = ["sky, wall", "cat", "cup"]


@pytest.fixture(scope="module", params=list(TIMM_FAMILIES))
def family_model(request):
    return request.param, tiny_clip(0, tiny_config(request.param))[0]


def _unit(feats: torch.Tensor) -> torch.Tensor:
    return feats / feats.norm(dim=-1, keepdim=True)


def _stock_head(visual, tokens: torch.Tensor) -> torch.Tensor:
    trunk = visual.trunk
    return _unit(visual.head(trunk.head(trunk.fc_norm(tokens))))


def test_skip_head_features_are_timms_own_tokens_through_the_projection(family_model):
    """Embed + blocks + vanilla last block + final norm at the native size = timm's forward_features
    (its patch tokens), then fc_norm and the heads: the tower's stock computation, exactly."""
    _, model = family_model
    visual = model.visual
    images = torch.randn(2, 3, 64, 64)
    tower = tower_for(visual, TowerConfig(pool_head="skip"))
    with torch.no_grad():
        ours, _ = tower.dense_features(images, build_method("vanilla"))
        stock = _stock_head(visual, visual.trunk.forward_features(images)[:, tower.prefix_tokens:])
    assert ours.shape == (2, 4, 4, stock.shape[-1])
    assert (ours.reshape(2, 16, -1) - stock).abs().max() < 1e-6


def test_value_head_features_are_the_pooling_head_on_each_token_alone(family_model):
    """pool_head=value: a patch's feature is what the tower's attention-pool head gives when that token
    is the only one it attends over (its softmax is then 1): timm's AttentionPoolLatent itself, run on
    one-token sequences. Towers without such a head (EVA02) are unaffected."""
    family, model = family_model
    visual = model.visual
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, _ = tower_for(visual, TowerConfig(pool_head="value")).dense_features(images, build_method("vanilla"))
        skip, _ = tower_for(visual, TowerConfig(pool_head="skip")).dense_features(images, build_method("vanilla"))
        tokens = visual.trunk.forward_features(images)[:, visual.trunk.num_prefix_tokens:]
        pool = visual.trunk.attn_pool
        if pool is None:
            assert family == "eva02" and torch.equal(ours, skip)
            return
        alone = pool(tokens.reshape(-1, 1, tokens.shape[-1])).reshape(2, 16, -1)
        expected = _stock_head(visual, alone)
    assert (ours.reshape(2, 16, -1) - expected).abs().max() < 1e-5
    assert (ours - skip).abs().max() > 1e-2


def test_the_trunk_at_any_grid_is_timms_dynamic_size_forward(family_model):
    """A non-square window of another size: the absolute table resampled by size with antialiasing
    and (EVA02, PE-Core) the rotary table built for the grid = timm's own dynamic-size model."""
    family, model = family_model
    visual = model.visual
    trunk = visual.trunk
    dynamic = timm.create_model(f"pearl_tiny_{family}", dynamic_img_size=True, num_classes=trunk.num_classes,
                                global_pool=trunk.global_pool).eval()
    dynamic.load_state_dict(trunk.state_dict())
    images = torch.randn(1, 3, 80, 144)
    tower = tower_for(visual)
    with torch.no_grad():
        shared = tower.trunk(images, positions="size_antialias")
        ours = trunk.norm(tower.block(-1, shared.grid)(shared.x))
        theirs = dynamic.forward_features(images)
    assert shared.grid == (5, 9) and ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-5
    # the "+0.1" rule resamples the absolute table elsewhere: a different trunk on this grid
    assert not torch.allclose(tower.trunk(images).x, shared.x, atol=1e-4)


def test_patch_tokens_alone_are_rotated_as_in_the_whole_sequence():
    """SC-CLIP and SFP attend over the patches alone: the rotary embedding follows the patch tokens,
    not their position in the sequence (a rotation starting at token 0 would differ)."""
    model = tiny_clip(0, tiny_config("eva02"))[0]
    tower = tower_for(model.visual)
    shared = tower.trunk(torch.randn(1, 3, 48, 80))
    block = tower.block(-1, shared.grid)
    with torch.no_grad():
        y = block.norm(shared.x)
        q_all, k_all, v_all = block.qkv(y)
        q_patch, k_patch, v_patch = block.qkv(y[:, 1:])
        unrotated = torch.nn.functional.linear(y[:, 1:], model.visual.trunk.blocks[-1].attn.q_proj.weight,
                                               model.visual.trunk.blocks[-1].attn.q_proj.bias)
    assert torch.allclose(q_patch, q_all[:, :, 1:], atol=1e-6) and torch.allclose(k_patch, k_all[:, :, 1:], atol=1e-6)
    assert torch.equal(v_patch, v_all[:, :, 1:])
    assert not torch.allclose(q_patch, unrotated.reshape(1, 15, block.heads, -1).transpose(1, 2), atol=1e-3)


def test_methods_that_read_the_cls_token_are_refused_on_a_tower_without_one(tokenizer):
    model = tiny_clip(0, tiny_config("siglip"))[0]
    for method, reads in (("scclip", "SC-CLIP reads the CLS token"), ("sfp", "SFP reads the CLS token")):
        with pytest.raises(ConfigError, match=f"{reads}.*timm_vit has 0 prefix tokens and no CLS token"):
            pearl.Segmentor(model, CLASSES, method=method, tokenizer=tokenizer, text_cache_dir="")


def test_a_timm_tower_in_fp16_computes_the_fp32_features(tokenizer, photos):
    """open_clip's conversion of a timm model (every tensor, fp32 LayerNorms kept) gives the fp32
    segmentation's features to fp16 rounding."""
    fp32 = tiny_clip(0, tiny_config("eva02"))[0]
    fp16 = prepare_model(tiny_clip(0, tiny_config("eva02"))[0], "cpu", "fp16")
    assert tower_for(fp16.visual).dtype == torch.float16
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = tower_for(fp16.visual).dense_features(images, build_method("naclip"))[0].float()
        reference = tower_for(fp32.visual).dense_features(images, build_method("naclip"))[0]
    assert (ours * reference).sum(dim=-1).min() > 0.999
    out = pearl.Segmentor(fp16, CLASSES, method="naclip", tokenizer=tokenizer, text_cache_dir="",
                          resize_short=64).predict(photos["chelsea"])
    assert torch.isfinite(out.probs).all()


def test_an_unsupported_timm_block_is_refused_naming_it():
    model = tiny_clip(0, tiny_config("siglip"))[0]
    model.visual.trunk.blocks[3].attn.gate = torch.nn.Linear(64, 64)
    with pytest.raises(ConfigError, match=r"image tower TimmModel \(gated or grouped-query attention\) is not "
                                          r"supported; supported: open_clip_vit, timm_vit"):
        tower_for(model.visual)


def test_a_siglip_tokenizer_without_its_library_fails_in_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as where it is not installed
    with pytest.raises(ConfigError, match=r"the tokenizer of ViT-B-16-SigLIP2 needs the Python package "
                                          r"'transformers': pip install 'pearl-ovss\[siglip\]'"):
        load_tokenizer("ViT-B-16-SigLIP2")
    with pytest.raises(ConfigError, match="needs the Python package 'transformers'"):
        pearl.load_clip("ViT-B-16-SigLIP2", pretrained="webli")  # before any weights are looked for


def test_a_run_on_a_timm_tower_records_the_tower_and_its_pool_head(synthetic, tmp_path):
    """The record names the tower (the model config) and the pool_head it ran with; the other
    pool_head is another job, never answered by this record."""
    from omegaconf import OmegaConf

    from pearl.runner import run

    from .conftest import compose

    def job(pool_head: str):
        cfg = compose(["model=tiny", "method=naclip", f"data_root={synthetic}", f"results_dir={tmp_path}",
                       "progress=false", "slide_crop=32", "slide_stride=16", f"pool_head={pool_head}"])
        cfg.model.config = OmegaConf.create(tiny_config("siglip"))
        return run(cfg)

    value = job("value")
    assert value.params["pool_head"] == "value"
    assert value.model["config"]["vision_cfg"]["timm_model_name"] == "pearl_tiny_siglip"
    skip = job("skip")
    assert skip.params["pool_head"] == "skip" and skip.config_hash != value.config_hash
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    assert skip.mIoU != value.mIoU or skip.per_class_iou != value.per_class_iou or skip.aAcc != value.aAcc


@pytest.mark.parametrize("family", ["eva02", "siglip"])
def test_resclip_runs_on_a_timm_tower_and_changes_its_host(tokenizer, photos, family):
    """ResCLIP's RCS reads blocks 6–9's attention (rotary q/k on EVA02) and its first pass cuts the
    windows into the tower's patches; on a tower with and without a CLS token."""
    model = tiny_clip(0, tiny_config(family))[0]
    outs = [pearl.Segmentor(model, CLASSES, method="naclip", tokenizer=tokenizer, text_cache_dir="", resize_short=64,
                            resclip=resclip).predict(photos["chelsea"]) for resclip in (False, True)]
    assert all(torch.isfinite(out.probs).all() for out in outs)
    assert not torch.allclose(outs[0].logits, outs[1].logits, atol=1e-4)
