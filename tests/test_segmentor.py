import hashlib

import numpy as np
import pytest
import torch

import pearl
from pearl.text import load_vocabulary

CLASSES = ["sky, wall, tree", "cat, kitten", "cup", "table"]


def _segmentor(model, tokenizer, method, **kwargs):
    kwargs.setdefault("resize_short", 112)
    return pearl.Segmentor(model, CLASSES, method=method, tokenizer=tokenizer, **kwargs)


def test_tlp_changes_the_logits_and_pa_changes_features(tiny_model, tokenizer, photos):
    base = _segmentor(tiny_model, tokenizer, "pearl", tlp=False, diagnostics=True).predict(photos["chelsea"])
    refined = _segmentor(tiny_model, tokenizer, "pearl", tlp=True, diagnostics=True).predict(photos["chelsea"])
    plain = _segmentor(tiny_model, tokenizer, "pearl", pa=False, tlp=False).predict(photos["chelsea"])
    assert not torch.allclose(base.logits, refined.logits)
    assert not torch.allclose(base.logits, plain.logits)
    assert "pa_orthogonality_error" in base.info and "tlp_cg_relative_residual" in refined.info
    assert isinstance(refined.info["tlp_rho_mean"], float)  # read once, when copied to the CPU
    quiet = _segmentor(tiny_model, tokenizer, "pearl", tlp=True).predict(photos["chelsea"])
    assert set(quiet.info) == {"windows", "nan_windows", "nan_images"}  # none computed unless asked
    assert torch.equal(quiet.labels, refined.labels)


def test_sfp_released_nan_windows_are_counted_and_warned(tiny_model, tokenizer, photos):
    seg = _segmentor(tiny_model, tokenizer, "sfp", slide_crop=64, slide_stride=32)
    with pytest.warns(RuntimeWarning, match="NaN"):
        out = seg.predict(photos["chelsea"])
    assert out.info["nan_windows"] > 0 and torch.isnan(out.logits).any()


def test_defaults_follow_the_method(tiny_model, tokenizer):
    seg = _segmentor(tiny_model, tokenizer, "pearl")
    assert seg.pa and seg.tlp and seg.params["arch"] == "reduced"
    seg = _segmentor(tiny_model, tokenizer, "naclip")
    assert not seg.pa and not seg.tlp and not seg.params["pamr"]


def test_bad_input_errors(tiny_model, tokenizer, photos):
    with pytest.raises(ValueError, match="unknown method 'nosuchclip'.*valid"):
        _segmentor(tiny_model, tokenizer, "nosuchclip")
    with pytest.raises(ValueError, match="unknown parameter.*slide_size"):
        _segmentor(tiny_model, tokenizer, "pearl", slide_size=3)
    for method in ("sclip", "naclip", "clearclip", "sfp"):
        with pytest.raises(ValueError, match="query·key"):
            _segmentor(tiny_model, tokenizer, method, pa=True)
    with pytest.raises(ValueError, match="empty"):
        pearl.Segmentor(tiny_model, [], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="duplicates class 0"):
        pearl.Segmentor(tiny_model, ["cat", "cat"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="empty name"):
        pearl.Segmentor(tiny_model, ["cat, ", "dog"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tlp_pool"):
        _segmentor(tiny_model, tokenizer, "pearl", tlp_pool="max")
    with pytest.raises(ValueError, match="slide_stride"):
        _segmentor(tiny_model, tokenizer, "pearl", slide_stride=0)
    with pytest.raises(ValueError, match="true or false"):
        _segmentor(tiny_model, tokenizer, "pearl", use_kk="yes")
    seg = _segmentor(tiny_model, tokenizer, "sclip", slide_crop=224)
    grey = photos["coffee"].mean(axis=2).astype(np.uint8)
    assert seg.predict(grey).labels.shape == grey.shape
    rgba = np.dstack([photos["chelsea"], np.full(photos["chelsea"].shape[:2], 255, np.uint8)])
    assert torch.equal(seg.predict(rgba).labels, seg.predict(photos["chelsea"]).labels)
    small = photos["chelsea"][:40, :50]  # rescaled to 112×140: smaller than the 224 crop
    assert seg.predict(small).labels.shape == (40, 50)
    with pytest.raises(ValueError, match="smaller than one 16-pixel patch"):
        _segmentor(tiny_model, tokenizer, "sclip", resize_short=0).predict(small[:8, :8])


def test_class_file_path_and_vocabulary(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background, sky\ncat\n")
    vocab = load_vocabulary(path)
    assert vocab.queries == ("background", "sky", "cat") and vocab.query_to_class == (0, 0, 1)
    with pytest.raises(ValueError, match="does not exist"):
        load_vocabulary(tmp_path / "missing.txt")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@pytest.mark.parametrize("dataset, method, sha, classes, queries", [
    ("voc21", None, "a618275ddc2525ab2fbede9c81649da47b57de76", 21, 56),
    ("voc20", None, "5f1ce8355a724fd73af74adc6022281da9542973", 20, 30),
    ("pc60", None, "a6209938e2a6e57018af0ed6896176a7f1ace54f", 60, 60),
    ("context59", None, "f9fb2a22f62cbd5a5a27cb2677636506fbbbc551", 59, 59),
    ("coco_object", None, "3fdfe261f558b6502f0d5bfe32fdcc466df808ed", 81, 113),
    ("coco_stuff", None, "b76c5a676308c9f328635938cf86f6fd27a985bb", 171, 171),
    ("cityscapes", None, "a1560efb268b4c8a52a68e41df402a4b33171d44", 19, 19),
    ("ade20k", None, "dba5aa2ce0c703b9dbf07dea5ee5e5230c8b51d3", 150, 150),
    ("voc21", "clearclip", "913c968f5a11102741b5fa17cf6aba9c1814b419", 21, 21),
    ("coco_object", "clearclip", "e290149963116c873fe6c54d28337a78bc500d8a", 81, 81),
    ("voc21", "sfp", "e7ecf7d336d07824308b10adabb6afb2cc811f87", 21, 56),
    ("cityscapes", "sfp", "22e9cc2c016a82df8ac5d57c8768eb23a6705152", 19, 19),
])
def test_class_files_are_byte_exact(dataset, method, sha, classes, queries):
    assert _git_blob_sha1(pearl.class_file(dataset, method).read_bytes()) == sha
    lines = pearl.class_names(dataset, method)
    assert len(lines) == classes and len(load_vocabulary(lines).queries) == queries


def test_pc60_keeps_the_trailing_space():
    assert pearl.class_names("context60")[-1] == "wood "


def test_protocols():
    assert pearl.protocol("pearl", "voc21") == dict(resize_short=336, slide_crop=0, slide_stride=112, logit_scale=40,
                                                    prob_thd=0.1, area_thd=0.0, alpha_kk=0.08, tlp_grid=80)
    assert pearl.protocol("pearl", "ade20k")["alpha_kk"] == 0.3
    assert pearl.protocol("pearl", "cityscapes")["tlp_grid"] == 224
    assert pearl.protocol("sclip", "voc21")["area_thd"] == 0.1 and pearl.protocol("sclip", "voc21")["logit_scale"] == 65
    assert pearl.protocol("clearclip", "cityscapes")["slide_stride"] == 224
    assert pearl.protocol("sfp", "ade20k")["resize_short"] == 384
    assert pearl.protocol("naclip", "voc21", profile="naclip_v1")["slide_crop"] == 224
    assert pearl.protocol("naclip", "coco_stuff", profile="naclip_readme")["pamr"] is True
    assert pearl.protocol("sclip", "voc21", profile="pearl")["slide_crop"] == 0
    assert pearl.protocol("vanilla", "voc21", profile="clearclip")["prob_thd"] == 0.2
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        pearl.protocol("pearl", "voc")
    with pytest.raises(ValueError, match="unknown method"):
        pearl.protocol("nosuchclip", "voc21")


def test_text_prototypes_disk_cache(tiny_model, tokenizer, tmp_path):
    from pearl import text
    text._memory_cache.clear()
    first = text.text_prototypes(tiny_model, tokenizer, ["cat", "dog"], torch.device("cpu"), tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    text._memory_cache.clear()
    torch.save(first * 0 + 1, files[0])  # a marked file proves the second call read the disk
    assert torch.all(text.text_prototypes(tiny_model, tokenizer, ["cat", "dog"], torch.device("cpu"), tmp_path) == 1)
    assert torch.allclose(first.norm(dim=1), torch.ones(2), atol=1e-5)
    other = text.text_prototypes(tiny_model, tokenizer, ["dog", "cat"], torch.device("cpu"), tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2 and torch.allclose(other[0], first[1], atol=1e-6)

def test_the_prototype_cache_key_sees_the_activation_and_the_tokenizer(tiny_model, tokenizer, tmp_path):
    """Same weights, GELU instead of QuickGELU (or another context length): other prototypes, so
    another cache file, never the first model's prototypes."""
    import copy

    import open_clip

    from pearl import text
    text._memory_cache.clear()
    cpu = torch.device("cpu")
    first = text.text_prototypes(tiny_model, tokenizer, ["cat", "dog"], cpu, tmp_path)
    assert all(isinstance(block.mlp.gelu, open_clip.model.QuickGELU) for block in tiny_model.transformer.resblocks)
    gelu = copy.deepcopy(tiny_model)
    for block in gelu.transformer.resblocks:
        block.mlp.gelu = torch.nn.GELU()
    direct = text._encode(gelu, tokenizer, ["cat", "dog"], cpu, text.TEMPLATES)
    assert not torch.equal(direct, first)  # the activation changes the prototypes
    assert torch.equal(text.text_prototypes(gelu, tokenizer, ["cat", "dog"], cpu, tmp_path), direct)
    lower = text.text_prototypes(tiny_model, tokenizer, ["Cat", "dog"], cpu, tmp_path)
    cased = open_clip.tokenizer.SimpleTokenizer(clean="whitespace")  # keeps "Cat" as it is: other tokens
    assert not torch.equal(text.text_prototypes(tiny_model, cased, ["Cat", "dog"], cpu, tmp_path), lower)
    assert len(list(tmp_path.glob("*.pt"))) == 4


@pytest.mark.parametrize("damage", ["truncated", "payload", "wrong_shape", "wrong_width", "nan"])
def test_corrupt_text_cache_is_named_deleted_and_rebuilt(tiny_model, tokenizer, tmp_path, damage):
    from pearl import text
    text._memory_cache.clear()
    first = text.text_prototypes(tiny_model, tokenizer, ["cat", "dog"], torch.device("cpu"), tmp_path)
    (cache_file,) = tmp_path.glob("*.pt")
    text._memory_cache.clear()
    marker = tmp_path / "marker"
    if damage == "truncated":
        cache_file.write_bytes(cache_file.read_bytes()[:100])
    elif damage == "payload":
        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))
        torch.save(Payload(), cache_file)
    elif damage == "wrong_shape":
        torch.save(torch.zeros(3, 32), cache_file)
    elif damage == "wrong_width":
        torch.save(torch.zeros(2, 7), cache_file)
    else:
        torch.save(torch.full((2, first.shape[1]), float("nan")), cache_file)
    with pytest.warns(RuntimeWarning, match=rf"cache {cache_file} .*deleted it and encoding the prompts again"):
        again = text.text_prototypes(tiny_model, tokenizer, ["cat", "dog"], torch.device("cpu"), tmp_path)
    assert torch.equal(again, first) and not marker.exists()
    assert torch.equal(torch.load(cache_file, weights_only=True), first)  # rewritten whole



def test_the_documented_parameter_table_is_the_one_generated_from_params():
    from pathlib import Path

    from pearl.params import markdown_table
    page = (Path(__file__).parents[1] / "docs" / "parameters.md").read_text()
    assert markdown_table() in page, "docs/parameters.md's table differs from PARAMS: paste `python -m pearl.params`"
    assert "| `tlp_grid` | `80` | integer ≥ 1 | TLP target grid side" in markdown_table()
    assert "| `tlp_pool` | `'int_stride'` | int_stride, adaptive |" in markdown_table()


def test_windows_of_all_images_share_batched_forwards(tiny_model, tokenizer, photos, monkeypatch):
    from pearl.towers.base import Tower
    calls = []
    original = Tower.trunk

    def counting(tower, images, *args):
        calls.append(images.shape[0])
        return original(tower, images, *args)
    monkeypatch.setattr(Tower, "trunk", counting)
    from pearl.segmentor import default_window_batch_size
    default = _segmentor(tiny_model, tokenizer, "pearl")  # CPU: 8, or as many as hold 8 × 197² attention values
    assert default.windows_per_forward((3, 224, 224)) == 8  # 14² + 1 = 197 tokens
    assert default.windows_per_forward((3, 240, 240)) == 6  # 226 tokens: 8 · 197² // 226² = 6
    assert default.windows_per_forward((3, 336, 448)) == 1  # a whole VOC image, 589 tokens, alone
    assert default_window_batch_size(torch.device("cuda"), 589) == 64
    seg = _segmentor(tiny_model, tokenizer, "pearl", slide_crop=64, slide_stride=32, window_batch_size=64)
    seg.predict(photos["chelsea"])
    assert len(calls) == 1 and calls[0] == 15  # 112×168 → 3 × 5 windows in one forward
    calls.clear()
    seg.predict_batch([photos["chelsea"], photos["coffee"]])
    assert calls == [30]  # both images' windows (same crop shape) in one forward
    calls.clear()
    _segmentor(tiny_model, tokenizer, "pearl", slide_crop=64, slide_stride=32, window_batch_size=8).predict(
        photos["chelsea"])
    assert calls == [8, 7]


def test_post_fusion_tlp_of_equal_size_images_is_one_batched_solve_with_each_images_result(
        tiny_model, tokenizer, photos, monkeypatch):
    from pearl.refine import tlp as module
    chelsea = photos["chelsea"]
    images = [chelsea, chelsea[::-1].copy(), photos["coffee"][:300, :451], chelsea[:, ::-1].copy()]  # all 300×451
    images.insert(2, photos["coffee"])  # another size: refined on its own
    seg = _segmentor(tiny_model, tokenizer, "pearl", tlp_grid=40)
    assert seg.together_values == 0  # on a CPU each image is refined alone (measured faster)
    alone = [seg.predict(image) for image in images]
    seg.together_values = module.BATCHED_TLP_VALUES  # what a GPU segmentor uses
    batches = []
    original = module.propagate  # fp32: every image's TLP input is pooled from its fused logits

    def counting(z, *args, **kwargs):
        batches.append(z.shape[0])
        return original(z, *args, **kwargs)
    monkeypatch.setattr(module, "propagate", counting)
    together = seg.predict_batch(images)
    assert sorted(batches) == [1, 4]  # the four 300×451 images in one solve, coffee alone
    for one, other in zip(alone, together):
        assert torch.equal(one.labels, other.labels)
        assert torch.allclose(one.logits, other.logits, atol=1e-6, rtol=0)
    batches.clear()
    seg.together_values = 2 * seg.vocabulary.num_queries * 300 * 451
    seg.predict_batch(images)
    assert sorted(batches) == [1, 2, 2]  # the budget splits the four into pairs
    batches.clear()
    with_diagnostics = _segmentor(tiny_model, tokenizer, "pearl", tlp_grid=40, diagnostics=True)
    with_diagnostics.together_values = module.BATCHED_TLP_VALUES
    with_diagnostics.predict_batch(images[:2])
    assert batches == [1, 1]  # per-image diagnostics: refined one at a time


def test_fp16_model_runs_and_stays_close_to_fp32(tokenizer, photos):
    from open_clip.model import convert_weights_to_lp

    from .conftest import make_tiny
    fp32 = _segmentor(make_tiny(), tokenizer, "pearl").predict(photos["chelsea"])
    half = make_tiny()
    convert_weights_to_lp(half, torch.float16)
    seg = _segmentor(half, tokenizer, "pearl", precision="fp16")
    assert seg.dtype == torch.float16
    out = seg.predict(photos["chelsea"])
    assert (out.labels == fp32.labels).float().mean() > 0.9
    converted = _segmentor(make_tiny(), tokenizer, "pearl", precision="fp16")
    assert converted.model.visual.conv1.weight.dtype == torch.float16 and converted.dtype == torch.float16
    assert torch.equal(converted.predict(photos["chelsea"]).labels, out.labels)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        _segmentor(make_tiny(), tokenizer, "pearl", precision="fp8")


@pytest.mark.parametrize("method,extra", [("pearl", {}), ("pearl", {"tlp": False}), ("pearl", {"slide_crop": 0}),
                                          ("pearl", {"tlp_pool": "adaptive"}), ("naclip", {"pamr": True}),
                                          ("sclip", {"area_thd": 0.1, "prob_thd": 0.3}), ("clearclip", {}),
                                          ("sfp", {"sfp_nan_guard": True}), ("vanilla", {"slide_crop": 0})])
def test_original_size_in_slabs_matches_the_whole_computation(tiny_model, tokenizer, photos, monkeypatch,
                                                              method, extra):
    from pearl import fused as module
    seg = _segmentor(tiny_model, tokenizer, method, diagnostics=True, **extra)
    whole = seg.predict(photos["coffee"])
    monkeypatch.setattr(module, "FULL_SIZE_BUDGET", 0)     # every image is "too large"
    monkeypatch.setattr(module, "SLAB_VALUES", 40_000)     # a few columns per slab
    tiled = seg.predict(photos["coffee"])
    assert callable(tiled._probs) and callable(tiled._logits)  # nothing Q×H×W was kept
    assert torch.equal(tiled.labels, whole.labels)
    assert torch.equal(tiled.logits, whole.logits) and torch.equal(tiled.probs, whole.probs)
    if seg.tlp:
        assert tiled.info["tlp_rho_mean"] == whole.info["tlp_rho_mean"]


@pytest.mark.parametrize("method, fp16_values", [("clearclip", True), ("naclip", False)])
def test_clearclip_fuses_in_the_model_dtype_and_the_others_in_fp32(tokenizer, photos, method, fp16_values):
    from .conftest import make_tiny
    seg = pearl.Segmentor(make_tiny(), CLASSES, method=method, tokenizer=tokenizer, precision="fp16",
                          resize_short=100, slide_crop=64, slide_stride=48)
    logits = seg.predict(photos["coffee"]).logits
    assert torch.equal(logits.half().float(), logits) is fp16_values  # an fp16 canvas holds fp16 values only


def test_text_cache_key_covers_the_templates(tiny_model, tokenizer, tmp_path):
    from pearl import text
    text._memory_cache.clear()
    first = text.text_prototypes(tiny_model, tokenizer, ["cat", "dog"], torch.device("cpu"), tmp_path)
    text._memory_cache.clear()
    single = text.text_prototypes(tiny_model, tokenizer, ["cat", "dog"], torch.device("cpu"), tmp_path,
                                  text.template_set("single"))
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not torch.allclose(first, single)
    with torch.no_grad():
        expected = tiny_model.encode_text(tokenizer(["a photo of a cat.", "a photo of a dog."]))
    assert torch.allclose(single, expected / expected.norm(dim=-1, keepdim=True), atol=1e-6)


def test_every_parameter_reaches_exactly_one_stage_config():
    from dataclasses import fields

    from pearl.decision import DecisionConfig
    from pearl.methods import get_method
    from pearl.params import PARAMS, config_params
    from pearl.preprocess import WindowConfig
    from pearl.refine import available_refiners, get_refiner
    from pearl.towers import TowerConfig
    stages = {(WindowConfig, ""), (DecisionConfig, ""), (TowerConfig, "")}
    stages |= {(get_method(m).Config, get_method(m).config_prefix) for m in pearl.available_methods()}
    stages |= {(get_refiner(r).Config, get_refiner(r).config_prefix) for r in available_refiners()}
    def declared_by(cls, name: str) -> str:  # a part several configs inherit (ResCLIP's) counts once
        return next(k.__name__ for k in reversed(cls.__mro__) if name in vars(k).get("__annotations__", {}))

    readers: dict[str, set[str]] = {}
    for cls, prefix in stages:
        for name, param in config_params(cls, prefix).items():
            readers.setdefault(param, set()).add(declared_by(cls, name))
    # read by the Segmentor itself: the refiners' on/off switches (tlp= beside PARAMS), the text side
    switches = (set(available_refiners()) - {"tlp"}) | {"text_cache_dir", "templates"}
    assert set(readers) - {"pa"} == set(PARAMS) - switches  # pa: the pa= switch, resolved beside PARAMS
    assert all(len(owners) == 1 for owners in readers.values()), readers
    naclip = get_method("naclip").Config
    assert [f.name for f in fields(naclip) if declared_by(naclip, f.name) == "NACLIPConfig"] == ["gauss_std"]
    assert readers["resclip_sfr_tau"] == {"ResCLIPConfig"}


def test_a_parameter_walks_from_the_flat_name_to_its_stage(tiny_model, tokenizer):
    seg = _segmentor(tiny_model, tokenizer, "naclip", naclip_gauss_std=2.5, tlp=True, tlp_lambda=0.5, prob_thd=0.2)
    assert seg.method.config.gauss_std == 2.5 and seg.refiner("tlp").config.lambda_ == 0.5
    assert seg.decision.config.prob_thd == 0.2 and seg.refiner("pamr") is None
    with pytest.raises(ValueError, match=r"naclip_gauss_std=0.0 is out of range: it must be > 0"):
        _segmentor(tiny_model, tokenizer, "naclip", naclip_gauss_std=0)


def test_joint_predictions_record_no_autograd_graph_and_leave_the_consumer_in_grad_mode(tiny_model, tokenizer,
                                                                                         photos):
    from pearl.joint import predict_jointly
    seg = _segmentor(tiny_model, tokenizer, "pearl", slide_crop=64, slide_stride=48)
    assert any(p.requires_grad for p in tiny_model.parameters())  # a graph would be recorded without no_grad
    for (out,) in predict_jointly([seg], [photos["chelsea"], photos["coffee"]]):
        assert torch.is_grad_enabled()  # no_grad does not leak out to the caller between images
        assert not out.logits.requires_grad and not out.probs.requires_grad
