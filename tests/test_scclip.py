"""SC-CLIP's last block against the transcription of its released forward (tests/reference/scclip.py)."""
import copy

import pytest
import torch

from pearl.methods.calibration import lof_outliers, purify
from pearl.towers import tower_for

from .conftest import build_method
from .reference import scclip as ref
from .reference import sfp as sfp_ref


def _hidden(model, images):
    with torch.no_grad():
        return sfp_ref.hidden_states(model, images)


@pytest.mark.parametrize("size", [(160, 160), (96, 160)])  # a square window; a non-square whole-image grid
@pytest.mark.parametrize("overrides, reference", [({}, {}), ({"scclip_res_cls": 0.7, "scclip_layers": (8, 2, 3, 11)},
                                                            {"res_cls": 0.7, "layers": (8, 2, 3, 11)})])
def test_scclip_matches_the_released_forward(tiny_model, photos, size, overrides, reference):
    from torchvision.transforms.functional import resize
    image = torch.from_numpy(photos["chelsea"]).permute(2, 0, 1).float() / 255
    images = torch.stack([resize(picture, list(size), antialias=True) for picture in (image, image.flip(-1))])
    hidden, grid = _hidden(tiny_model, (images - 0.45) / 0.27)
    with torch.no_grad():
        ours = build_method("scclip", **overrides).last_block(tower_for(tiny_model.visual), hidden[-1], hidden, grid,
                                                              None)
        for index in range(2):  # each image of the batch on its own, as upstream runs them
            expected, cells = ref.last_block(tiny_model, [h[index:index + 1] for h in hidden], grid, **reference)
            assert cells, "no anomalous token: the test would not exercise their replacement"
            assert torch.allclose(ours[index], expected, atol=1e-4), (ours[index] - expected).abs().max()


def test_lof_outliers_are_the_released_ones(tiny_model):
    torch.manual_seed(0)
    hidden, _ = _hidden(tiny_model, torch.randn(3, 3, 160, 224))
    tokens = hidden[-1][:, 1:]
    found = lof_outliers(tokens)
    for index in range(3):
        assert found[index].nonzero().flatten().tolist() == ref.lof_pytorch(tokens[index])


def test_replacement_uses_row_major_cells_on_a_non_square_grid():
    # grid 2×5, outlier at index 7 = row 1, column 2 (the released index // rows would give row 3: outside)
    tokens = torch.arange(10, dtype=torch.float32).view(1, 10, 1)
    outliers = torch.zeros(1, 10, dtype=torch.bool)
    outliers[0, 7] = True
    out = purify(tokens, outliers, (2, 5), guard=True)
    assert out[0, 7, 0].item() == pytest.approx((1 + 2 + 3 + 6 + 8) / 5)
    assert torch.equal(out[0, torch.arange(10) != 7], tokens[0, torch.arange(10) != 7])


def test_an_anomaly_whose_neighbours_are_all_anomalous_stays_as_it_is(tiny_model):
    # an 8×10 grid (80 patches: the 5 % quantile leaves exactly 4 outliers) with 4 far tokens in the
    # top-left 2×2 corner: the corner cell's three neighbours are all anomalous
    torch.manual_seed(0)
    tokens = torch.randn(1, 81, 64) * 0.1
    for cell, direction in zip((1, 2, 11, 12), range(4)):
        tokens[0, cell, direction * 8:(direction + 1) * 8] += 5.0
    hidden = [tokens.clone() for _ in range(11)]
    with torch.no_grad():
        ours = build_method("scclip").last_block(tower_for(tiny_model.visual), hidden[-1], hidden, (8, 10), None)
        expected, cells = ref.last_block(tiny_model, hidden, (8, 10))
    assert cells == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert torch.isfinite(ours).all() and torch.allclose(ours[0], expected, atol=1e-4)


def test_scclip_needs_twelve_blocks_or_a_layer_map_and_a_cls_token(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.visual.transformer.resblocks = model.visual.transformer.resblocks[:6]
    hidden, grid = _hidden(model, torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="SC-CLIP's released code reads fixed layers .* 6 blocks. Pass scclip_layers"):
        build_method("scclip").last_block(tower_for(model.visual), hidden[-1], hidden, grid, None)
    with pytest.raises(ValueError, match=r"scclip_layers=\[4, 2, 2, 6\]: each layer must be a block output in 1..5"):
        build_method("scclip", scclip_layers=(4, 2, 2, 6)).last_block(tower_for(model.visual), hidden[-1], hidden,
                                                                     grid, None)
    out = build_method("scclip", scclip_layers=(4, 2, 2, 5)).last_block(tower_for(model.visual), hidden[-1], hidden,
                                                                         grid, None)
    assert out.shape == (1, 36, 64) and torch.isfinite(out).all()

    from pearl.towers.open_clip_vit import OpenClipViT

    class WithoutCls(OpenClipViT):  # as a SigLIP tower would be
        has_cls = property(lambda self: False)
    hidden, grid = _hidden(tiny_model, torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="SC-CLIP reads the CLS token.*no CLS token"):
        build_method("scclip").last_block(WithoutCls(tiny_model.visual), hidden[-1], hidden, grid, None)


def test_distances_in_chunks_of_rows_are_the_distances(monkeypatch):
    from pearl.methods import calibration
    torch.manual_seed(0)
    tokens = torch.randn(3, 50, 16)
    whole = calibration.squared_distances(tokens)
    monkeypatch.setattr(calibration, "_DISTANCE_CHUNK_ELEMENTS", 3 * 50 * 16 * 7)  # 7 rows per chunk
    assert torch.equal(calibration.squared_distances(tokens), whole)
    assert torch.allclose(whole[1], torch.cdist(tokens[1], tokens[1]) ** 2, atol=1e-3)
