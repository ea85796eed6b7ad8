"""The core behaviour of every registered method and tower, parametrized over the registries: a method
added as its module and its protocol file is tested here without editing a test (shapes and
probabilities on a photograph, batched = one at a time, TLP after it, a run's record, the segment
CLI); a tower added as its module names the families it computes in ``TOWER_EXAMPLES`` (each a
``pearl.tiny`` family) and gets the interface's checks and every method run on each; a refiner added as
its module (and its parameters) is switched on by its name, changes the logits, and refines images
together as alone."""
import functools

import numpy as np
import pytest
import torch

import pearl
import pearl.errors
from pearl.loading import tiny_clip
from pearl.methods import available_methods, get_method
from pearl.refine import available_refiners
from pearl.tiny import tiny_config
from pearl.towers import available_towers, tower_for
from pearl.vfm import load_vfm

from .conftest import compose

CLASSES = ["sky, wall", "cat", "cup", "table"]
# the tower families each registered tower computes (``pearl.tiny``: seeded random models built offline)
TOWER_EXAMPLES = {"open_clip_vit": ("vit",), "timm_vit": ("eva02", "pe_core", "siglip")}
EXAMPLES = [(tower, family) for tower, families in TOWER_EXAMPLES.items() for family in families]


@functools.cache
def _example(family: str):
    return tiny_clip(0, tiny_config(family))[0]


def _vision(method: str) -> dict:
    """The second vision model a method needs (the seeded random tiny one), as a Segmentor argument."""
    return {"vfm": load_vfm("tiny")} if get_method(method).needs_vfm else {}


def _segmentor(model, tokenizer, method: str, **params) -> pearl.Segmentor:
    return pearl.Segmentor(model, CLASSES, method=method, tokenizer=tokenizer, text_cache_dir="", **_vision(method),
                           **(pearl.protocol(method, "context60") | {"resize_short": 112} | params))


@pytest.mark.parametrize("method", available_methods())
def test_a_prediction_has_the_image_s_shape_and_probabilities(tiny_model, tokenizer, photos, method):
    image = photos["chelsea"]
    out = _segmentor(tiny_model, tokenizer, method).predict(image)
    height, width = image.shape[:2]
    assert out.labels.shape == (height, width) and out.labels.dtype == torch.long
    assert 0 <= int(out.labels.min()) and int(out.labels.max()) < len(CLASSES)
    assert out.probs.shape == (len(CLASSES), height, width) and out.logits.shape[1:] == (height, width)
    decided = torch.isfinite(out.probs).all(dim=0)  # SFP's released purification may leave NaN windows
    assert decided.float().mean() > (0.5 if out.info["nan_windows"] else 0.999)
    probs = out.probs[:, decided]
    queries = sum(len(line.split(", ")) for line in CLASSES)
    # a class's probability is its best name's share of a softmax over all names: in [0, 1], the top ≥ 1/Q
    assert probs.min() >= 0 and probs.max() <= 1 and (probs.max(dim=0).values >= 1 / queries - 1e-6).all()


@pytest.mark.parametrize("method", available_methods())
def test_images_predicted_together_get_what_each_gets_alone(tiny_model, tokenizer, photos, method):
    seg = _segmentor(tiny_model, tokenizer, method)
    images = [photos["chelsea"], photos["coffee"]]
    together = seg.predict_batch(images)
    for image, joint in zip(images, together):
        alone = seg.predict(image)
        assert (joint.labels == alone.labels).float().mean() >= 0.999
        both = torch.isfinite(alone.probs) & torch.isfinite(joint.probs)
        assert torch.allclose(joint.probs[both], alone.probs[both], atol=1e-4)


@pytest.mark.parametrize("method", available_methods())
def test_tlp_runs_after_the_method_and_changes_its_logits(tiny_model, tokenizer, photos, method):
    plain = _segmentor(tiny_model, tokenizer, method, tlp=False).predict(photos["chelsea"])
    refined = _segmentor(tiny_model, tokenizer, method, tlp=True).predict(photos["chelsea"])
    assert refined.labels.shape == plain.labels.shape
    assert torch.isfinite(refined.logits).all() and not torch.allclose(refined.logits, plain.logits)


@pytest.mark.parametrize("method", available_methods())
def test_a_run_writes_a_valid_record_of_the_method_s_own_protocol(synthetic, tmp_path, method):
    from pearl import runner
    from pearl.records import load_records
    status, record = runner.run_job(compose(["model=tiny", f"data_root={synthetic}", f"results_dir={tmp_path}",
                                             "progress=false", "loader_workers=0", f"method={method}"]))
    assert status == "ran" and record.method == method and record.deviations == {}
    published = pearl.protocol(method, "voc21")
    assert {name: record.params[name] for name in published} == published  # the released settings, as run
    assert [r.config_hash for r in load_records(tmp_path)] == [record.config_hash]


@pytest.mark.parametrize("method", available_methods())
def test_the_segment_cli_runs_the_method(tmp_path, photos, method, capsys):
    from PIL import Image

    from pearl.segment import main
    Image.fromarray(photos["coffee"]).save(tmp_path / "coffee.png")
    out = tmp_path / "out"
    assert main([str(tmp_path / "coffee.png"), "--classes", "; ".join(CLASSES), "--model", "tiny", "--method",
                 method, "--resize_short", "112", "--out", str(out)]) == 0
    labels = np.asarray(Image.open(out / "coffee_labels.png"))
    assert labels.shape == photos["coffee"].shape[:2] and labels.max() < len(CLASSES)
    assert f"segmented with {method}" in capsys.readouterr().out


def test_every_registered_tower_has_an_example_model():
    assert set(available_towers()) == set(TOWER_EXAMPLES)


@pytest.mark.parametrize("tower_name, family", EXAMPLES)
def test_the_tower_s_tokens_and_block_pieces_are_what_the_interface_states(tower_name, family):
    torch.manual_seed(0)
    tower = tower_for(_example(family).visual)
    assert tower.name == tower_name
    patch = tower.patch_size
    shared = tower.trunk(torch.randn(2, 3, 3 * patch + patch // 2, 5 * patch), keep_hidden=True)
    tokens = tower.prefix_tokens + 3 * 5
    assert shared.grid == (3, 5) and shared.x.shape[:2] == (2, tokens) and len(shared.hidden) == tower.num_blocks - 1
    # norm → qkv → softmax(s·q kᵀ)v → project → residuals recombine to the block's own forward
    block = tower.block(-1, shared.grid)
    q, k, v = block.qkv(block.norm(shared.x))
    assert q.shape[:3] == (2, block.heads, tokens) and block.scale == q.shape[-1] ** -0.5
    attended = torch.softmax(block.scale * q @ k.transpose(-1, -2), dim=-1) @ v
    with torch.no_grad():
        recombined = block.mlp_residual(block.attention_residual(shared.x, block.project(attended)))
        assert (recombined - block(shared.x)).abs().max() < 1e-4
        feats = tower.final(recombined[:, tower.prefix_tokens:])
    assert feats.shape[:2] == (2, 15)


@pytest.mark.parametrize("tower_name, family", EXAMPLES)
@pytest.mark.parametrize("method", available_methods())
def test_every_method_segments_on_every_tower(tokenizer, photos, tower_name, family, method):
    """Every method on every family, or (a method that reads the CLS token, on a tower without one)
    refused in one line; images predicted together get what each gets alone."""
    model = _example(family)
    if get_method(method).reads_cls and not tower_for(model.visual).has_cls:
        with pytest.raises(pearl.errors.ConfigError, match="reads the CLS token"):
            _segmentor(model, tokenizer, method)
        return
    images = [photos["coffee"][::4, ::4], photos["chelsea"][::4, ::4]]
    # SFP's released purification turns some tiny random windows NaN: its guard keeps them finite here
    seg = _segmentor(model, tokenizer, method, resize_short=64, **({"sfp_nan_guard": True} if method == "sfp" else {}))
    alone = [seg.predict(image) for image in images]
    for image, one, together in zip(images, alone, seg.predict_batch(images)):
        assert one.labels.shape == image.shape[:2] and one.probs.shape == (len(CLASSES), *image.shape[:2])
        assert torch.isfinite(one.probs).all() and 0 <= one.probs.min() and one.probs.max() <= 1
        assert (one.labels == together.labels).float().mean() >= 0.999  # random weights: a near-tie may flip
        # a probability moves with logit_scale × the logits' rounding (LPOSS: scale 100 on propagated scores)
        tolerance = 1e-5 * seg.decision.config.logit_scale / 40 * max(1.0, one.logits.abs().max().item())
        assert torch.allclose(one.probs, together.probs, atol=tolerance)


def test_refiners_run_in_their_order_and_each_is_switched_by_a_boolean_parameter_of_its_name(tiny_model, tokenizer):
    assert available_refiners() == ["pamr", "tlp", "lposs_plus"]  # PAMR first, as NACLIP applies it
    seg = _segmentor(tiny_model, tokenizer, "naclip", tlp=True, pamr=True, lposs_plus=True)
    assert all(seg.params[name] is True for name in available_refiners())
    assert [one.name for one in seg.refiners] == available_refiners()


@pytest.mark.parametrize("refiner", available_refiners())
def test_the_refiner_changes_the_fused_logits_and_refines_images_together_as_alone(tiny_model, tokenizer, photos,
                                                                                  refiner):
    chelsea = photos["chelsea"]
    images = [chelsea, chelsea[::-1].copy(), chelsea[:, ::-1].copy()]
    off = {"tlp": False, "pamr": False, "lposs_plus": False}
    plain = _segmentor(tiny_model, tokenizer, "naclip", **off).predict(chelsea)
    seg = _segmentor(tiny_model, tokenizer, "naclip", **{**off, refiner: True})
    assert [one.name for one in seg.refiners] == [refiner]
    alone = [seg.predict(image) for image in images]
    assert alone[0].logits.shape == plain.logits.shape and torch.isfinite(alone[0].logits).all()
    assert not torch.allclose(alone[0].logits, plain.logits, atol=1e-3)
    seg.together_values = 2 ** 26  # as on a GPU: equal-size images go to the refiner in one call
    for one, together in zip(alone, seg.predict_batch(images)):
        assert torch.equal(one.labels, together.labels)
        assert torch.allclose(one.logits, together.logits, atol=1e-6, rtol=0)



GEOMETRIES = {"head width 80": {"width": 160, "head_width": 80},    # ViT-L/14, ViT-H/14's head width
              "head width 104": {"width": 208, "head_width": 104},  # ViT-bigG/14's
              "patch 14": {"patch_size": 14, "image_size": 56}}     # the /14 towers' grids


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def other_geometry(request):
    import copy

    from pearl.loading import TINY_CONFIG
    config = copy.deepcopy(TINY_CONFIG)
    config["vision_cfg"].update(GEOMETRIES[request.param])
    return tiny_clip(0, config)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_runs_on_other_head_widths_and_patch_sizes(other_geometry, photos, method):
    model, tokenizer = other_geometry
    image = photos["chelsea"]
    head_dim = model.visual.transformer.width // model.visual.transformer.resblocks[0].attn.num_heads
    if method == "cass" and head_dim != 32:  # the tiny vision model's heads are 2 of 32
        with pytest.raises(pearl.errors.ConfigError, match=f"2 heads of 32, CLIP's 2 of {head_dim}; use a vision"):
            pearl.Segmentor(model, CLASSES, method=method, tokenizer=tokenizer, text_cache_dir="", **_vision(method))
        return
    seg = pearl.Segmentor(model, CLASSES, method=method, tokenizer=tokenizer, text_cache_dir="", resize_short=112,
                          slide_crop=64, slide_stride=32, **({"sfp_nan_guard": True} if method == "sfp" else {}),
                          **_vision(method))
    patch = model.visual.patch_size[0]
    assert seg.tower.patch_size == patch
    out = seg.predict(image)
    assert out.labels.shape == image.shape[:2] and torch.isfinite(out.probs).all()
    assert out.info["windows"] == len(seg.prepare_image(image).windows)


@pytest.mark.parametrize("host", ["sclip", "naclip", "clearclip"])
def test_resclip_runs_on_other_head_widths_and_patch_sizes(other_geometry, photos, host):
    model, tokenizer = other_geometry  # its first pass cuts the windows into the tower's patches
    out = pearl.Segmentor(model, CLASSES, method=host, tokenizer=tokenizer, text_cache_dir="", resize_short=112,
                          slide_crop=64, slide_stride=32, resclip=True).predict(photos["chelsea"])
    assert out.labels.shape == photos["chelsea"].shape[:2] and torch.isfinite(out.probs).all()
