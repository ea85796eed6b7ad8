"""python -m pearl.attention and the attention weights the methods' last blocks hand back."""
import numpy as np
import pytest
import torch
from PIL import Image

from pearl.attention import attention_maps, main, patch_of_point
from pearl.methods import available_methods
from pearl.methods.base import ATTENTION
from pearl.preprocess import normalise
from pearl.vfm import VisionFeatures, load_vfm

from .conftest import build_method
from .reference import blocks as ref


@pytest.fixture(scope="module")
def trunk_out(tiny_tower, photos):
    picture = np.ascontiguousarray(photos["chelsea"][:96, :128])  # a 6×8 grid of 16-pixel patches
    return tiny_tower.trunk(normalise(picture)[None], keep_hidden=True)


@pytest.mark.parametrize("name", available_methods())
def test_every_method_hands_back_the_weights_it_multiplies_the_values_with(name, tiny_model, tiny_tower,
                                                                           trunk_out):
    method = build_method(name)
    blocks = tiny_model.visual.transformer.resblocks
    asked = {ATTENTION: None}
    vision = None  # ProxyCLIP: the tiny vision model's features of the window (8-pixel patches: a 12×16 grid)
    if method.vfm_in_last_block:
        vision = VisionFeatures(load_vfm("tiny"), tiny_tower.normalisation, method.vfm_feature,
                                method.prepare_vfm_input).on(trunk_out.images)
    with torch.no_grad():
        out = method.last_block(tiny_tower, trunk_out.x, trunk_out.hidden, trunk_out.grid, asked, vision)
        plain = method.last_block(tiny_tower, trunk_out.x, trunk_out.hidden, trunk_out.grid, None, vision)
    weights = asked[ATTENTION]
    # SFP's, SC-CLIP's and CASS's attention is over the patches only; ProxyCLIP's and GLA-CLIP's over the vision model's
    tokens = 12 * 16 if name in ("proxyclip", "glaclip") else 6 * 8 + (0 if name in ("sfp", "scclip", "cass") else 1)
    assert weights.shape == (1, ref.HEADS, tokens, tokens) and (weights >= 0).all()
    row_sums = torch.full((1, ref.HEADS, tokens), 2.0 if name == "sclip" else 1.0)  # SCLIP: two softmaxes summed
    assert torch.allclose(weights.sum(-1), row_sums, atol=1e-5)
    assert torch.equal(out, plain)  # asking for the weights changes nothing
    if name in ("naclip", "clearclip", "pearl"):  # reduced blocks: out_proj(A·v) is the whole output
        _, _, v = ref.qkv(blocks[-1], trunk_out.x)
        assert torch.allclose(out, ref.out_proj(blocks[-1], weights @ v)[:, 1:], atol=1e-5)
    if name == "cass":  # reduced, over the patches alone
        _, _, v = ref.qkv(blocks[-1], trunk_out.x)
        assert torch.allclose(out, ref.out_proj(blocks[-1], weights @ v[:, :, 1:]), atol=1e-5)


def test_vanilla_attention_is_open_clips_own_last_block_attention(tiny_model, tiny_tower, trunk_out):
    block = tiny_model.visual.transformer.resblocks[-1]
    asked = {ATTENTION: None}
    with torch.no_grad():
        build_method("vanilla").last_block(tiny_tower, trunk_out.x, [], trunk_out.grid, asked)
        y = block.ln_1(trunk_out.x)
        _, expected = block.attn(y, y, y, need_weights=True, average_attn_weights=False)  # torch's own MHA
    assert torch.allclose(asked[ATTENTION], expected, atol=1e-6)


def test_attention_maps_of_a_query_patch_sum_to_one_over_the_keys(tiny_model, photos):
    maps = attention_maps(tiny_model, photos["chelsea"], "pearl", short_side=64)
    assert maps.grid == (64 // 16, round(451 * 64 / 300) // 16) and maps.has_cls  # chelsea is 300×451
    assert maps.image.shape == (64, maps.grid[1] * 16, 3)
    per_head, cls_share = maps.query_map(1, 2)
    assert per_head.shape == (ref.HEADS, *maps.grid)
    assert torch.allclose(per_head.sum(dim=(1, 2)) + cls_share, torch.ones(ref.HEADS), atol=1e-5)
    sclip = attention_maps(tiny_model, photos["chelsea"], "sclip", short_side=64)
    sclip_head, sclip_cls = sclip.query_map(1, 2)
    assert torch.allclose(sclip_head.sum(dim=(1, 2)) + sclip_cls, torch.ones(ref.HEADS), atol=1e-5)  # halved
    aligned = attention_maps(tiny_model, photos["chelsea"], "pearl", pa=False, short_side=64)
    assert not torch.allclose(aligned.weights, maps.weights, atol=1e-4)  # PA changes where it attends
    with pytest.raises(Exception, match="outside the 4×6 grid"):
        maps.query_map(4, 0)


def test_a_point_in_pixels_is_the_patch_under_it():
    # 300×450 image rescaled to 64×96: x=449 → 95.8 → column 5, y=150 → 32 → row 2 (16-pixel patches)
    assert patch_of_point(449, 150, (300, 450), (64, 96), 16) == (2, 5)
    assert patch_of_point(0, 0, (300, 450), (64, 96), 16) == (0, 0)
    with pytest.raises(Exception, match="outside the 450×300 image"):
        patch_of_point(450, 10, (300, 450), (64, 96), 16)


def test_cli_writes_one_panel_per_method_or_per_head(tmp_path, photos, capsys):
    image = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"]).save(image)
    out = tmp_path / "out"
    common = [str(image), "--model", "tiny", "--short-side", "64", "--out", str(out)]
    assert main(common + ["--patch", "1,2", "--methods", "vanilla,naclip,pearl:pa=false", "--save-maps"]) == 0
    assert "attention of patch 1,2 (3 methods)" in capsys.readouterr().out
    figure = Image.open(out / "chelsea_attention_r1c2.png")
    titles = figure.text["panels"].splitlines()
    assert [t.split(" (CLS ")[0] for t in titles] == ["vanilla", "naclip", "pearl:pa=false"]
    maps = np.load(out / "chelsea_attention_r1c2.npy")
    assert maps.shape == (3, 1, 4, 6) and maps.dtype == np.float32
    assert main(common + ["--point", "449,299", "--methods", "naclip,sfp", "--all-heads"]) == 0
    capsys.readouterr()
    figure = Image.open(out / "chelsea_attention_r3c5.png")  # the bottom-right patch
    assert [t.split(" (CLS ")[0] for t in figure.text["panels"].splitlines()] == ["naclip h0", "naclip h1",
                                                                                  "sfp h0", "sfp h1"]
    assert figure.height > 2 * 240  # one row per method
    assert not (np.asarray(figure)[-14:] == 255).all()  # the random-weight footnote beneath


@pytest.mark.parametrize("arguments, message", [
    (["--patch", "9,0"], "patch 9,0 is outside the 4×6 grid"),
    (["--patch", "1"], "--patch '1': expected two numbers"),
    (["--point=-1,3"], "point -1,3 is outside the 451×300 image"),
    (["--patch", "1,1", "--methods", "nosuchclip"], "unknown method 'nosuchclip'"),
    (["--patch", "1,1", "--methods", "naclip:pa=true"], "pa=True has no meaning for method 'naclip'"),
])
def test_cli_bad_input_is_one_line(tmp_path, photos, capsys, arguments, message):
    image = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"]).save(image)
    assert main([str(image), "--model", "tiny", "--short-side", "64", "--out", str(tmp_path), *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_only_last_block_parameters_are_options():
    from pearl.attention import last_block_params
    params = last_block_params()
    assert params[:6] == ["arch", "alpha_kk", "use_kk", "pa_solver", "pa_iters", "naclip_gauss_std"]
    assert {"gem_iters", "gem_temperature", "gem_residual", "gem_depth", "sfp_outlier", "sfp_purify", "sfp_res_cls",
            "sfp_nan_guard", "sfp_layers", "scclip_res_cls", "scclip_layers"} <= set(params)
    assert not [name for name in params if name.startswith(("tlp", "pamr", "slide", "resize", "resclip"))
                or name in ("logit_scale", "prob_thd", "area_thd", "templates", "text_cache_dir")]


def test_cli_missing_or_broken_image_and_bad_precision(tmp_path, photos, capsys):
    assert main([str(tmp_path / "nope.jpg"), "--patch", "1,1", "--model", "tiny"]) == 2
    assert f"image {tmp_path / 'nope.jpg'} does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert main([str(broken), "--patch", "1,1", "--model", "tiny"]) == 2
    assert f"cannot decode image {broken}" in capsys.readouterr().err
    image = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"]).save(image)
    assert main([str(image), "--patch", "1,1", "--model", "tiny", "--precision", "fp8"]) == 2
    assert "precision 'fp8' is not one of fp32, fp16, bf16" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["proxyclip", "cass"])
def test_the_tool_refuses_a_method_whose_last_block_reads_a_second_vfm(tiny_model, photos, method):
    from pearl.errors import UserError
    with pytest.raises(UserError, match=f"method={method} reads a second vision model in its last block, which"):
        attention_maps(tiny_model, photos["chelsea"], method, short_side=64)
