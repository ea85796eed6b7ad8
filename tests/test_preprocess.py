import numpy as np
import pytest
from PIL import Image

from pearl.preprocess import normalise, rescale, rescaled_size, sliding_windows, to_rgb_uint8


@pytest.mark.parametrize("hw, short, expected", [
    ((375, 500), 336, (336, 448)),     # docs/protocol.md §2 worked examples (H, W)
    ((333, 500), 336, (336, 505)),
    ((480, 640), 336, (336, 448)),
    ((1024, 2048), 560, (560, 1120)),
    ((7, 13), 336, (336, 624)),        # 13·48 = 624 exactly
    ((13, 7), 10, (19, 10)),           # f = 10/7: 13·1.4286 = 18.57 → int(19.07) = 19
    ((3, 2000), 336, (3, 2048)),       # long-side cap binds: f = 2048/2000 = 1.024 → 3.072 + .5 → 3
    ((4, 9), 2, (2, 5)),               # 9·0.5 = 4.5: int(4.5 + 0.5) = 5 (round() would give 4, half-to-even)
    ((4, 13), 2, (2, 7)),              # 6.5 → 7 (round(): 6)
])
def test_rescaled_size_rule(hw, short, expected):
    assert rescaled_size(*hw, short) == expected


def test_rescale_is_cv2_bilinear_uint8():
    import cv2
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    out = rescale(image, 20)
    assert out.dtype == np.uint8 and out.shape == (20, 28, 3)  # 47·20/33 = 28.48 → 28
    assert np.array_equal(out, cv2.resize(image, (28, 20), interpolation=cv2.INTER_LINEAR))
    assert rescale(image, 0) is image


def _mmseg_windows(h_img, w_img, crop, stride):
    """Independent transcription of MMSeg slide_inference's loop (docs/protocol.md §6.2)."""
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    out = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def test_window_examples():
    assert len(sliding_windows(336, 448, 224, 112)) == 6
    windows = sliding_windows(336, 505, 224, 112)
    assert sorted({w.x1 for w in windows}) == [0, 112, 224, 281]
    assert sliding_windows(300, 451, 0, 112) == [(0, 300, 0, 451)]


@pytest.mark.parametrize("h, w, crop, stride", [(337, 505, 224, 112), (221, 999, 224, 112), (449, 673, 448, 224),
                                                 (100, 150, 224, 112), (561, 1121, 224, 224), (225, 225, 224, 112)])
def test_window_placement_matches_mmseg_on_odd_sizes(h, w, crop, stride):
    windows = sliding_windows(h, w, crop, stride)
    assert [tuple(x) for x in windows] == _mmseg_windows(h, w, crop, stride)
    cover = np.zeros((h, w), int)
    for y1, y2, x1, x2 in windows:
        assert y2 - y1 == min(crop, h) and x2 - x1 == min(crop, w)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1


def test_to_rgb_converts_grey_rgba_pil_and_rejects_bad_shapes():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb_uint8(grey).shape == (3, 4, 3)
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 7
    rgba[..., 3] = 255
    rgb = to_rgb_uint8(rgba)
    assert rgb.shape == (3, 4, 3) and rgb[0, 0, 0] == 7
    assert to_rgb_uint8(Image.fromarray(grey, "L")).shape == (3, 4, 3)
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        to_rgb_uint8(np.full((3, 4, 3), -1.0))


def test_normalise_uses_clip_mean_std_in_rgb_order():
    image = np.zeros((1, 1, 3), np.uint8)
    image[0, 0] = (122, 117, 104)
    out = normalise(image)[:, 0, 0].numpy()
    expected = (np.array([122, 117, 104]) - np.array([122.771, 116.746, 104.094])) / np.array([68.501, 66.632, 70.323])
    assert np.allclose(out, expected, atol=1e-6)


def test_the_mean_and_std_come_from_the_model():
    """open_clip sets visual.image_mean/std from the pretrained config: OpenAI's give the released
    configs' rounded constants (bit for bit), another tag's (LAION ViT-L-14: 0.5/0.5) its own."""
    import open_clip

    from pearl.preprocess import CLIP_MEAN, CLIP_STD, model_normalisation
    openai = open_clip.create_model("ViT-B-16", pretrained=None).visual  # open_clip's default: OpenAI's
    assert tuple(openai.image_mean) == (0.48145466, 0.4578275, 0.40821073)
    assert model_normalisation(openai) == (CLIP_MEAN, CLIP_STD)
    laion = type("Tower", (), {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)})()
    assert open_clip.get_pretrained_cfg("ViT-L-14", "laion2b_s32b_b82k")["mean"] == (0.5, 0.5, 0.5)
    assert model_normalisation(laion) == ((127.5,) * 3, (127.5,) * 3)
    image = np.full((1, 1, 3), 255, np.uint8)
    assert np.allclose(normalise(image, model_normalisation(laion))[:, 0, 0].numpy(), 1.0)
    assert model_normalisation(object()) == (CLIP_MEAN, CLIP_STD)  # a tower that states none


def test_a_segmentor_normalises_with_its_model_s_mean_and_std(tiny_model, tokenizer, photos):
    import copy

    import pearl
    half = copy.deepcopy(tiny_model)
    half.visual.image_mean, half.visual.image_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    seg = pearl.Segmentor(half, ["cat", "dog"], tokenizer=tokenizer, text_cache_dir="")
    prepared = seg.preprocess(photos["chelsea"])
    from pearl.preprocess import rescale
    expected = (rescale(photos["chelsea"], 336).astype(np.float32) - 127.5) / 127.5
    assert np.allclose(prepared.input.permute(1, 2, 0).numpy(), expected, atol=1e-6)
