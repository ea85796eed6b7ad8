"""The second vision model (pearl.vfm): DINO and DINOv2 through timm against transcriptions
of their released forwards, the renormalisation from CLIP's statistics, loading and its errors."""
import pytest
import timm
import torch

from pearl.errors import ConfigError, MissingFileError, WeightsError
from pearl.preprocess import OPENAI_NORMALISATION, Normalisation
from pearl.towers import tower_for
from pearl.vfm import dense_features, load_vfm, renormalise

from .reference import dino as ref

IMAGENET = Normalisation((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
SMALL = {"embed_dim": 64, "num_heads": 2, "depth": 3}


def _random_model(architecture: str, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **(SMALL | kwargs)).eval()
    with torch.no_grad():  # layer scales and biases away from their initial constants
        for name, tensor in model.named_parameters():
            if name.endswith(("gamma", "bias")) or "token" in name:
                tensor.normal_(0, 0.2)
    return model


def test_renormalise_turns_clip_statistics_into_imagenet_statistics():
    pixels = torch.tensor([200.0, 10.0, 128.0]).view(1, 3, 1, 1)
    clip = (pixels - torch.tensor(OPENAI_NORMALISATION.mean).view(1, 3, 1, 1)) / torch.tensor(
        OPENAI_NORMALISATION.std).view(1, 3, 1, 1)
    out = renormalise(clip, OPENAI_NORMALISATION, IMAGENET).flatten()
    expected = [(200 - 123.675) / 58.395, (10 - 116.28) / 57.12, (128 - 103.53) / 57.375]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-5)
    zero_padding = renormalise(torch.zeros(1, 3, 1, 1), OPENAI_NORMALISATION, IMAGENET).flatten()  # CLIP's mean
    assert torch.allclose(zero_padding, (torch.tensor(OPENAI_NORMALISATION.mean) - torch.tensor(IMAGENET.mean))
                          / torch.tensor(IMAGENET.std), atol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (48, 80)])
def test_dino_features_are_the_released_forward(size):
    """DINO (ViT-B/8's architecture, small): positions by the "+0.1" scale factor on any other grid,
    last block, final norm, CLS dropped = DINO's get_intermediate_layers(x)[0][:, 1:]."""
    model = _random_model("vit_base_patch8_224.dino", img_size=64)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = tower_for(model).normed_tokens(images)
        theirs = ref.dense_tokens(model.state_dict(), images, patch=8, heads=2, depth=3)
    assert ours.shape == (2, size[0] // 8, size[1] // 8, 64)
    assert (ours.reshape(2, -1, 64) - theirs).abs().max() < 1e-4


def test_dinov2_with_registers_in_the_released_layout_is_what_timm_computes(tmp_path):
    """DINOv2 with registers: the released checkpoint holds the CLS token and its position apart and
    the registers without positions; timm folds the CLS position into the token. A released-layout
    file loaded by load_vfm (timm converts it) computes the released forward."""
    model = _random_model("vit_base_patch14_reg4_dinov2.lvd142m", img_size=56)
    timm_sd = model.state_dict()
    cls_position = torch.randn(1, 1, 64)
    released = {key: value for key, value in timm_sd.items() if key not in ("cls_token", "reg_token", "pos_embed")}
    released |= {"cls_token": timm_sd["cls_token"] - cls_position, "register_tokens": timm_sd["reg_token"],
                 "pos_embed": torch.cat([cls_position, timm_sd["pos_embed"]], dim=1),
                 "mask_token": torch.zeros(1, 64)}
    images = torch.randn(1, 3, 70, 98)
    with torch.no_grad():
        theirs = ref.dense_tokens(released, images, patch=14, heads=2, depth=3, registers=4)
        ours = tower_for(model).normed_tokens(images)
    assert tower_for(model).prefix_tokens == 5 and ours.shape == (1, 5, 7, 64)
    assert (ours.reshape(1, -1, 64) - theirs).abs().max() < 1e-4
    # the same through a file: a base-size released checkpoint, converted on loading
    base = timm.create_model("vit_base_patch14_reg4_dinov2.lvd142m", pretrained=False, num_classes=0)
    base_sd = base.state_dict()
    file_sd = {key: value for key, value in base_sd.items() if key not in ("cls_token", "reg_token", "pos_embed")}
    file_sd |= {"cls_token": base_sd["cls_token"] - 0.5, "register_tokens": base_sd["reg_token"] + 1.0,
                "pos_embed": torch.cat([torch.full((1, 1, 768), 0.5), base_sd["pos_embed"]], dim=1),
                "mask_token": torch.zeros(1, 768)}
    torch.save(file_sd, tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    loaded = load_vfm("dinov2_b14_reg", str(tmp_path / "dinov2_vitb14_reg4_pretrain.pth")).trunk_module
    assert torch.allclose(loaded.cls_token, base_sd["cls_token"], atol=1e-6) and torch.equal(loaded.reg_token,
                                                                                  base_sd["reg_token"] + 1.0)
    assert torch.equal(loaded.blocks[5].attn.qkv.weight, base_sd["blocks.5.attn.qkv.weight"])


def test_dense_features_read_clip_normalised_windows():
    vision = load_vfm("tiny")
    assert torch.allclose(torch.tensor(vision.normalisation), torch.tensor(IMAGENET)) and vision.patch_size == 8
    windows = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ours = dense_features(vision, windows, OPENAI_NORMALISATION)
        direct = vision.normed_tokens(renormalise(windows, OPENAI_NORMALISATION, IMAGENET))
    assert ours.shape == (2, 6, 8, 64) and torch.equal(ours, direct)
    assert not torch.allclose(ours, vision.normed_tokens(windows), atol=1e-3)


def test_loading_errors_are_one_line_and_name_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="vision model 'dino_b9' is not one of dino_b8, .*did you mean 'dino_b8'"):
        load_vfm("dino_b9")
    with pytest.raises(MissingFileError, match="vision-model checkpoint '/no/such.pth' does not exist"):
        load_vfm("dino_b8", "/no/such.pth")
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"vision-model checkpoint .*other.pth does not fit dino_b8"):
        load_vfm("dino_b8", str(tmp_path / "other.pth"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network
    with pytest.raises(WeightsError, match=r"vision-model weights timm/vit_base_patch8_224.dino are not in the "
                                           r"cache folder .*empty.* and the Hub cannot be reached"):
        load_vfm("dino_b8", "hub", cache_dir=str(tmp_path / "empty"))


def test_jobs_on_one_trunk_compute_the_vfm_once(tiny_model, tokenizer, photos, monkeypatch):
    """Two ProxyCLIP jobs that differ in β share the trunk and the vision model's features of each
    window batch, and get what each gets alone."""
    import pearl
    from pearl import vfm as vfm_module
    from pearl.joint import predict_jointly
    vision = load_vfm("tiny")
    segs = [pearl.Segmentor(tiny_model, ["sky, wall", "cat", "cup"], method="proxyclip", tokenizer=tokenizer,
                            vfm=vision, proxyclip_beta=beta, resize_short=100, slide_crop=64,
                            slide_stride=48) for beta in (1.2, 0.9)]
    calls = []
    compute = vfm_module.VisionFeatures._read
    monkeypatch.setattr(vfm_module.VisionFeatures, "_read", lambda *args: calls.append(1) or compute(*args))
    together = list(predict_jointly(segs, [photos["coffee"]]))[0]
    shared = len(calls)
    alone = [seg.predict(photos["coffee"]) for seg in segs]
    assert shared >= 1 and len(calls) - shared == 2 * shared
    for one, joint in zip(alone, together):
        assert torch.equal(one.labels, joint.labels) and torch.allclose(one.probs, joint.probs, atol=1e-6)
    assert not torch.equal(alone[0].probs, alone[1].probs)


def test_lposs_jobs_on_one_trunk_run_the_vfm_once_per_image(tiny_model, tokenizer, photos, monkeypatch):
    """LPOSS reads the vision model at the fusion: two jobs that differ in the graph (k) compute its
    projections of an image's windows once, and get what each gets alone."""
    import pearl
    from pearl import vfm as vfm_module
    from pearl.joint import predict_jointly
    vision = load_vfm("tiny")
    segs = [pearl.Segmentor(tiny_model, ["sky, wall", "cat", "cup"], method="lposs", tokenizer=tokenizer,
                            vfm=vision, lposs_k=k, resize_short=100, slide_crop=64, slide_stride=48)
            for k in (10, 40)]
    calls = []
    compute = vfm_module.projection_features
    monkeypatch.setattr(vfm_module, "projection_features", lambda *args: calls.append(1) or compute(*args))
    images = [photos["coffee"], photos["chelsea"]]
    together = list(predict_jointly(segs, images))
    assert len(calls) == len(images)  # once per image, not per job
    for image, joint in zip(images, together):
        for seg, shared in zip(segs, joint):
            alone = seg.predict(image)
            assert torch.equal(alone.labels, shared.labels) and torch.allclose(alone.logits, shared.logits, atol=1e-6)
    assert len(calls) == 3 * len(images)
    assert not torch.equal(together[0][0].logits, together[0][1].logits)


def test_dinov3_features_are_timms_own_forward_at_any_grid():
    """DINOv3 (rotary positions built for each grid, no absolute table, CLS and 4 registers): its timm
    port's own forward, which builds the rotary table for any input size (the released code is not
    transcribed here)."""
    model = _random_model("vit_base_patch16_dinov3.lvd1689m")
    tower = tower_for(model)
    assert tower.prefix_tokens == 5 and tower.patch_size == 16
    for size in ((224, 224), (96, 160), (80, 48)):
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            ours = tower.normed_tokens(images)
            theirs = model.forward_features(images)[:, 5:]
        assert ours.shape == (2, size[0] // 16, size[1] // 16, 64)
        assert (ours.reshape(2, -1, 64) - theirs).abs().max() < 1e-5


def test_cass_jobs_on_one_trunk_share_the_keys_and_the_image_embedding(tiny_model, tokenizer, photos, monkeypatch):
    """Two CASS jobs that differ in the prompt weights share the trunk, the vision model's keys of each
    window batch (CASS's own input rule) and the whole image's CLS embedding (one forward per image),
    and get what each gets alone."""
    import pearl
    from pearl import vfm as vfm_module
    from pearl.joint import predict_jointly
    from pearl.segmentor import Segmentor
    vision = load_vfm("tiny")
    segs = [pearl.Segmentor(tiny_model, ["sky, wall", "cat", "cup"], method="cass", tokenizer=tokenizer,
                            vfm=vision, cass_global_weight=weight, cass_mean_vector_weight=0.1, resize_short=100,
                            slide_crop=64, slide_stride=48) for weight in (0.1, 0.4)]
    keys, embeddings = [], []
    read, embed = vfm_module.VisionFeatures._read, Segmentor._whole_image_embedding
    monkeypatch.setattr(vfm_module.VisionFeatures, "_read", lambda *args: keys.append(args[0].kind) or read(*args))
    monkeypatch.setattr(Segmentor, "_whole_image_embedding", lambda *args: embeddings.append(1) or embed(*args))
    images = [photos["coffee"], photos["chelsea"]]
    together = list(predict_jointly(segs, images))
    assert embeddings == [1, 1] and set(keys) == {"k"}  # once per image, and the keys once per window batch
    shared_batches = len(keys)
    for image, joint in zip(images, together):
        for seg, shared in zip(segs, joint):
            alone = seg.predict(image)
            assert torch.equal(alone.labels, shared.labels) and torch.allclose(alone.logits, shared.logits, atol=1e-6)
    assert len(embeddings) == 2 + 2 * len(images) and len(keys) > shared_batches
    assert not torch.equal(together[0][0].logits, together[0][1].logits)


@pytest.mark.parametrize("patch, side", [(8, 96), (16, 96), (14, 518)])
def test_cass_vision_input_is_its_pil_and_torchvision_pipeline(photos, patch, side):
    """CASS's vision input of a non-square (whole-image) CLIP input: the undone uint8 image squashed to a
    square of its short side by PIL's default resize, for DINOv2 (patch 14) then torchvision's
    Resize((518, 518)), ToTensor, ImageNet's Normalize, cropped to a multiple of the patch."""
    import types

    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from pearl.methods.cass import released_pixels, vision_input
    from pearl.preprocess import normalise
    window = normalise(np.ascontiguousarray(photos["coffee"][:96, :150]))[None]
    vfm = types.SimpleNamespace(patch_size=patch, normalisation=load_vfm("tiny").normalisation, dtype=torch.float32)
    ours = vision_input(vfm, window, None)
    image = Image.fromarray(released_pixels(window)[0].permute(1, 2, 0).numpy()).resize((96, 96))
    steps = ([transforms.Resize((518, 518))] if patch == 14 else []) + [
        transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    expected = transforms.Compose(steps)(image)
    usable = side - side % patch
    assert ours.shape == (1, 3, usable, usable)
    assert torch.allclose(ours[0], expected[:, :usable, :usable], atol=1e-6)


def test_glaclip_batches_each_image_s_windows_together_and_shares_the_trunk_with_proxyclip(tiny_model, tokenizer,
                                                                                          photos, monkeypatch):
    """GLA-CLIP's last block reads all windows of an image at once: the joint trunk's batches are then one
    image's windows each (whatever window_batch_size says), a ProxyCLIP job on the same trunk shares its
    vision features and gets what it gets alone, and attending across the windows changes the result."""
    import pearl
    from pearl import vfm as vfm_module
    from pearl.joint import JointPrediction
    vision = load_vfm("tiny")
    common = dict(tokenizer=tokenizer, vfm=vision, resize_short=100, slide_crop=56, slide_stride=28,
                  window_batch_size=2)
    gla = pearl.Segmentor(tiny_model, ["sky, wall", "cat", "cup"], method="glaclip", **common)
    proxy = pearl.Segmentor(tiny_model, ["sky, wall", "cat", "cup"], method="proxyclip", **common)
    images = [photos["coffee"], photos["chelsea"]]
    joint = JointPrediction([gla, proxy])
    batches = [[(image, window) for image, window, _ in chunk]
               for chunk in joint._window_batches([gla.prepare_image(image) for image in images])]
    windows = [len(gla.prepare_image(image).windows) for image in images]
    assert batches == [[(index, window) for window in range(count)] for index, count in enumerate(windows)]
    calls = []
    read = vfm_module.VisionFeatures._read
    monkeypatch.setattr(vfm_module.VisionFeatures, "_read", lambda *args: calls.append(1) or read(*args))
    together = list(joint.predict(images))
    assert len(calls) == len(images)  # one batch per image, shared by both jobs
    for image, (gla_out, proxy_out) in zip(images, together):
        for seg, shared in ((gla, gla_out), (proxy, proxy_out)):
            alone = seg.predict(image)
            assert torch.equal(alone.labels, shared.labels) and torch.allclose(alone.logits, shared.logits, atol=1e-6)
    apart = pearl.Segmentor(tiny_model, ["sky, wall", "cat", "cup"], method="glaclip", glaclip_across_windows=False,
                            **common).predict(images[0])
    assert not torch.allclose(apart.logits, together[0][0].logits, atol=1e-3)
